"""The `bpr` command: lists every job, each subcommand has --help under its `bpr X` name, a
refine without inputs is an error (never a silent demo), and import-official converts a state
dict with the official layout into a checkpoint the pipeline loads."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from jobs import cli

from ..core.test_official_import import official_state


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    monkeypatch.setenv("BPR_CLI", "")  # cli.main sets it; monkeypatch restores the original afterwards


def test_installed_bpr_lists_every_subcommand():
    exe = shutil.which("bpr", path=os.path.dirname(sys.executable)) or shutil.which("bpr")
    assert exe, "the bpr console script is not installed (pip install -e .)"
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for name in cli.COMMANDS:
        assert f"\n  {name} " in p.stdout


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: bpr {name}")


def test_unknown_command_and_refine_without_inputs_are_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["refien"])
    assert e.value.code == 2 and "unknown command 'refien'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["refine"])
    assert e.value.code == 2
    assert "error: missing --images, --coarse, --image-info, --out" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # no demo data generated, nothing written


def test_import_official_through_the_cli(tmp_path, capsys):
    from bpr_core.refiner import load_checkpoint

    src = tmp_path / "hrnet18s_coco.pth"
    torch.save({"meta": {}, "state_dict": official_state(2)}, src)
    with pytest.raises(SystemExit) as e:
        cli.main(["import-official", str(src), str(tmp_path / "m.pt"), "--name", "paper-coco"])
    assert e.value.code == 0
    assert load_checkpoint(tmp_path / "m.pt").model_card["name"] == "paper-coco"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(SystemExit) as e:
        cli.main(["import-official", str(tmp_path / "other.pth"), str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not an official BPR HRNet-18s" in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()
