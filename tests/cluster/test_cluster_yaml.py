"""cluster.yaml checked offline with Ray's own schema and config validation (never `ray up`)."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


def _load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _check(config):
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_ray_validation():
    config = _load()
    _check(config)
    types = config["available_node_types"]
    assert types["gpu_workers"]["resources"]["GPU"] == 1 and types["head"]["resources"]["CPU"] == 0


def test_unknown_field_fails():
    config = _load()
    config["available_node_types"]["gpu_workers"]["gpus_please"] = 1
    with pytest.raises(jsonschema.ValidationError):
        _check(config)


def test_head_type_missing_from_node_types_fails():
    config = _load()
    config["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="no_such_type|head_node_type"):
        _check(config)


def test_every_node_can_reach_s3_has_disk_and_the_same_image():
    types = _load()["available_node_types"]
    images = {t["node_config"]["ImageId"] for t in types.values()}
    assert len(images) == 1  # one image (the Deep Learning AMI: NVIDIA driver on the GPU workers)
    for name, t in types.items():
        assert t["node_config"]["IamInstanceProfile"], name  # workers read images and write parts themselves
        (disk,) = t["node_config"]["BlockDeviceMappings"]
        assert disk["Ebs"]["VolumeSize"] >= 200, name
    assert types["head"]["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 300  # spill files


def test_token_auth_is_consistent_and_the_token_travels_to_every_node():
    config = _load()
    (remote,) = [r for r, local in config["file_mounts"].items() if local.endswith("ray_auth_token")]
    for cmd in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={remote} " in cmd, cmd
    assert config["file_mounts"]["/home/ubuntu/bpr"] == "."
    assert {".venv", "data", "demo_out", ".git"} <= set(config["rsync_exclude"])  # not 1.9 GB of .venv per node


def test_setup_commands_fail_loudly_and_run_in_a_scratch_directory(tmp_path):
    """Nothing hides a failure (no `|| true`); every command parses; the venv step and the final
    import check run here with /home/ubuntu replaced by a scratch directory (pip needs the network
    and a GPU image, so the two install lines are checked for syntax only)."""
    import subprocess
    import sys

    cmds = _load()["setup_commands"]
    assert not [c for c in cmds if "|| true" in c or "; true" in c]
    for c in cmds:
        assert subprocess.run(["bash", "-n", "-c", c]).returncode == 0, c
    home = str(tmp_path)
    venv = cmds[0].replace("/home/ubuntu", home)
    assert subprocess.run(["bash", "-c", venv], timeout=120).returncode == 0
    assert (tmp_path / "venv" / "bin" / "python").exists()
    assert subprocess.run(["bash", "-c", venv], timeout=60).returncode == 0  # again: the venv is kept
    check = cmds[-1].replace("/home/ubuntu/venv/bin/python", sys.executable)
    r = subprocess.run(["bash", "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("bpr ok, torch"), r.stderr
    broken = cmds[0].replace("/home/ubuntu", home + "/nope").replace("python3 -m venv", "false &&")
    assert subprocess.run(["bash", "-c", broken]).returncode != 0  # a failing step is a failing command


def test_device_auto_asks_for_gpus_the_autoscaler_can_add(tmp_path, monkeypatch):
    """--device auto on a head that `ray up` started: no GPU node is up yet, but the config's
    gpu_workers declare GPUs, so the refinement actors ask for one (and the autoscaler adds nodes)."""
    from pipeline.graph import autoscaler_gpus

    assert autoscaler_gpus(str(ROOT / "cluster.yaml")) == 4  # gpu_workers: GPU 1 x max_workers 4
    cpu_only = _load()
    del cpu_only["available_node_types"]["gpu_workers"]
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(cpu_only))
    assert autoscaler_gpus(str(tmp_path / "cpu.yaml")) == 0
    assert autoscaler_gpus(str(tmp_path / "absent.yaml")) == 0
    monkeypatch.setenv("BPR_AUTOSCALER_CONFIG", str(ROOT / "cluster.yaml"))
    assert autoscaler_gpus() == 4
