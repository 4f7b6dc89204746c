"""A refinement actor dies mid-run (its process exits on its k-th batch); Ray restarts it and
retries the batch, and the job's output equals an undisturbed run's."""

import json
import os
import time

from ..pipeline.conftest import run_refine_subprocess


def test_killed_refine_actor_is_restarted_and_output_is_identical(tmp_path, synth30):
    common = ["--images", str(synth30 / "images"), "--coarse", str(synth30 / "coarse.json"),
              "--image-info", str(synth30 / "annotations.json"), "--refiner", "guided-filter", "--shard-size", "30",
              "--batch-size", "8", "--num-cpus", "2"]
    temp = f"/tmp/bprt-fault-{os.getpid()}-{int(time.time())}"
    rc, log = run_refine_subprocess(common + ["--out", str(tmp_path / "clean")], {"BPR_RAY_TEMP_DIR": temp + "a"})
    assert rc == 0, log
    marker = tmp_path / "actor-died"
    rc, log = run_refine_subprocess(common + ["--out", str(tmp_path / "faulty")],
                                    {"BPR_RAY_TEMP_DIR": temp + "b", "BPR_FAIL_ON_BATCH": "3", "BPR_FAULT_MARKER": str(marker)})
    assert rc == 0, log
    assert marker.exists(), "the injected failure did not happen"
    clean = (tmp_path / "clean" / "refined.json").read_bytes()
    assert (tmp_path / "faulty" / "refined.json").read_bytes() == clean
    m = json.loads((tmp_path / "faulty" / "manifest.json").read_text())
    assert m["invariant"]["ok"] and m["counts"]["quarantined"] == 0
