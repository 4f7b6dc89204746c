"""Real job submission: `ray start --head` on 127.0.0.1 in a private temp dir, `ray job submit
--working-dir . -- python -m jobs.refine ...` (and a short jobs.train), outputs checked; the
cluster is stopped by killing exactly the processes of that temp dir."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpr_core.synthetic import write_dataset

from ..pipeline.conftest import kill_temp_dir_processes
from .ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp = f"/tmp/bprt-js-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    gcs, dash, listen, grpc, runtime_env, metrics = free_ports(6)
    # Every port explicit: another Ray on the same machine must not make this one half-start.
    ports = [f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
                    f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--disable-usage-stats", *ports], env=env, check=True, capture_output=True,
                   timeout=120)
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{dash}"
    try:
        yield env
    finally:
        kill_temp_dir_processes(temp)


def _submit(env, *cmd, timeout=400):
    runtime_env = json.dumps({"excludes": [".venv", ".git", "demo_out", "*.pyc", "__pycache__"],
                              "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    deadline = time.time() + 90
    while True:
        r = subprocess.run([RAY, "job", "submit", "--working-dir", str(ROOT), "--runtime-env-json", runtime_env, "--", *cmd],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        # the job agent comes up a few seconds after `ray start` returns
        if "No available agent" not in r.stderr + r.stdout or time.time() > deadline:
            return r
        time.sleep(2)


def test_submit_refine_and_train(cluster, tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 10, seed=77, min_size=160, max_size=224)
    out = tmp_path / "out"
    r = _submit(cluster, sys.executable, "-m", "jobs.refine", "--images", str(data / "images"), "--coarse", str(data / "coarse.json"),
                "--image-info", str(data / "annotations.json"), "--out", str(out), "--refiner", "guided-filter")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded" in (r.stdout + r.stderr).lower()
    manifest = json.loads((out / "manifest.json").read_text())
    coarse = json.loads((data / "coarse.json").read_text())
    assert manifest["invariant"]["ok"] and manifest["counts"]["input"] == len(coarse)
    assert len(json.loads((out / "refined.json").read_text())) == len(coarse)

    val = tmp_path / "val"
    write_dataset(val, 4, seed=78, min_size=160, max_size=224)
    tout = tmp_path / "train"
    r = _submit(cluster, sys.executable, "-m", "jobs.train", "--data", str(data), "--val", str(val), "--out", str(tout),
                "--iters", "10", "--eval-every", "5", "--batch-size", "8", "--workers", "2", "--cpus-per-worker", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tout / "model.pt").is_file() and json.loads((tout / "model_card.json").read_text())["steps"] >= 5
