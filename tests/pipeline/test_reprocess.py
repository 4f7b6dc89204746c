import json
import time

from pipeline.refine_job import RefineOptions
from pipeline.reprocess import LEASE, output_folder, reprocess, safe_name


def _template(data, out):
    return RefineOptions(images=str(data / "images"), coarse="", image_info=str(data / "annotations.json"), out=str(out),
                         method="guided-filter", shard_size=15)


def _split(data, dets_dir, parts):
    coarse = json.loads((data / "coarse.json").read_text())
    for name, ids in parts.items():
        (dets_dir / name).write_text(json.dumps([c for c in coarse if c["image_id"] in ids]))


def test_reprocess_is_idempotent_and_refines_only_new_outputs(ray_session, tmp_path, synth30):
    dets, out = tmp_path / "detections", tmp_path / "refined"
    dets.mkdir()
    _split(synth30, dets, {"batch-001.json": set(range(1, 11)), "batch-002.json": set(range(11, 21))})
    first = reprocess(str(dets), _template(synth30, out))
    assert sorted(first["refined"]) == ["batch-001.json", "batch-002.json"]
    second = reprocess(str(dets), _template(synth30, out))
    assert second["refined"] == [] and sorted(second["up_to_date"]) == ["batch-001.json", "batch-002.json"]
    _split(synth30, dets, {"batch-003.json": set(range(21, 31))})
    third = reprocess(str(dets), _template(synth30, out))
    assert third["refined"] == ["batch-003.json"]
    m = json.loads((out / "files" / "batch-003.json" / "manifest.json").read_text())
    assert m["invariant"]["ok"] and m["counts"]["input"] > 0
    assert not (out / LEASE).exists()  # released


def test_live_lease_blocks_and_expired_lease_is_taken_over(ray_session, tmp_path, synth30):
    dets, out = tmp_path / "detections", tmp_path / "refined"
    dets.mkdir()
    out.mkdir()
    _split(synth30, dets, {"a.json": {1, 2}})
    (out / LEASE).write_text(json.dumps({"owner": "someone-else", "host": "h", "pid": 1, "expires_at": time.time() + 600}))
    blocked = reprocess(str(dets), _template(synth30, out))
    assert blocked["skipped_lease"] and not (out / "files").exists()
    (out / LEASE).write_text(json.dumps({"owner": "crashed", "host": "h", "pid": 1, "expires_at": time.time() - 1}))
    taken = reprocess(str(dets), _template(synth30, out))
    assert taken["refined"] == ["a.json"]


def test_safe_name_cannot_escape_the_prefix():
    for bad in ("../../etc/passwd", "..", "/abs/path.json", "a/../../b.json", ".hidden"):
        name = safe_name(bad)
        assert "/" not in name and name not in (".", "..") and not name.startswith(".")


def test_output_folders_never_collide(tmp_path):
    from pipeline import storage

    out = storage.resolve(str(tmp_path))
    names = ["cam1/batch.json", "cam1_batch.json", "a b.json", "a_b.json", "_lease.json", "x/../y.json"]
    folders = [output_folder(out, n).path for n in names]
    assert len(set(folders)) == len(names)
    assert all(f.startswith(str(tmp_path / "files") + "/") for f in folders)
    assert output_folder(out, "cam1/batch.json").path == str(tmp_path / "files" / "cam1" / "batch.json")


def test_unchanged_files_are_not_read_again_and_touched_ones_are_hashed(ray_session, tmp_path, synth30, monkeypatch):
    import os

    from pipeline import reprocess as rp

    dets, out = tmp_path / "detections", tmp_path / "refined"
    dets.mkdir()
    _split(synth30, dets, {"a.json": {1, 2}})
    assert reprocess(str(dets), _template(synth30, out))["refined"] == ["a.json"]
    hashed = []
    real = rp.storage.sha256_hex
    monkeypatch.setattr(rp.storage, "sha256_hex", lambda loc: (hashed.append(loc.uri), real(loc))[1])
    assert reprocess(str(dets), _template(synth30, out))["up_to_date"] == ["a.json"] and hashed == []  # size+mtime
    st = os.stat(dets / "a.json")
    os.utime(dets / "a.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    again = reprocess(str(dets), _template(synth30, out))
    assert again["up_to_date"] == ["a.json"] and again["refined"] == [] and len(hashed) == 1


def test_heartbeat_renews_the_lease_and_notices_a_takeover(tmp_path):
    from pipeline import storage
    from pipeline.lease import Lease

    out = storage.resolve(str(tmp_path))
    lease = Lease(out, "me", seconds=3.0)
    assert lease.acquire()[0]
    first = json.loads((tmp_path / LEASE).read_text())["expires_at"]
    lease.start_heartbeat(every=0.2)
    time.sleep(0.7)
    assert json.loads((tmp_path / LEASE).read_text())["expires_at"] > first  # renewed during the work
    (tmp_path / LEASE).write_text(json.dumps({"owner": "other", "host": "h", "pid": 1, "expires_at": time.time() + 60}))
    time.sleep(0.7)
    assert lease.lost
    lease.release()
    assert json.loads((tmp_path / LEASE).read_text())["owner"] == "other"  # not ours to delete


def test_refine_refuses_an_output_another_run_is_writing(ray_session, tmp_path, synth30):
    import os
    import subprocess

    import pytest

    from bpr_core.formats import JobFailed
    from jobs import refine

    args = ["--images", str(synth30 / "images"), "--coarse", str(synth30 / "coarse.json"), "--image-info",
            str(synth30 / "annotations.json"), "--out", str(tmp_path / "out"), "--refiner", "identity", "--shard-size", "15"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LEASE).write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 60}))
    with pytest.raises(JobFailed, match=r"another run is writing to .*out \(elsewhere pid 1, until .* UTC\)"):
        refine.main(args)
    assert not (tmp_path / "out" / "refined.json").exists()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid of this host that no longer runs: a killed run's lease is free
    import socket

    (tmp_path / "out" / LEASE).write_text(json.dumps({"owner": "x", "host": socket.gethostname(), "pid": gone.pid,
                                                      "expires_at": time.time() + 60}))
    assert refine.main(args) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "complete"
    assert not (tmp_path / "out" / LEASE).exists() and os.path.exists(tmp_path / "out" / "refined.json")


def test_a_different_checkpoint_with_the_same_card_redoes_the_work(ray_session, tmp_path, synth30):
    import torch

    from bpr_core import BPRConfig, save_checkpoint
    from bpr_core.model import build_model
    from pipeline.refine_job import RefineOptions, run

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        p = tmp_path / f"m{seed}.pt"
        save_checkpoint(p, build_model("hrnet_lite"), BPRConfig(model="hrnet_lite", input_size=64), {"name": "same", "version": "1"})
        paths.append(p)
    opts = dict(images=str(synth30 / "images"), coarse=str(synth30 / "coarse.json"), image_info=str(synth30 / "annotations.json"),
                out=str(tmp_path / "out"), method="network", shard_size=15)
    first = run(RefineOptions(**opts, checkpoint=str(paths[0])))
    again = run(RefineOptions(**opts, checkpoint=str(paths[0])))
    other = run(RefineOptions(**opts, checkpoint=str(paths[1])))
    assert first["timings"]["shards_run"] == 2 and again["timings"]["shards_skipped"] == 2
    assert other["timings"]["shards_run"] == 2 and other["timings"]["shards_skipped"] == 0
