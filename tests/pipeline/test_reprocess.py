import json
import time

from pipeline.refine_job import RefineOptions
from pipeline.reprocess import LEASE, reprocess, safe_name


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
    m = json.loads((out / "batch-003.json" / "manifest.json").read_text())
    assert m["invariant"]["ok"] and m["counts"]["input"] > 0
    assert not (out / LEASE).exists()  # released


def test_live_lease_blocks_and_expired_lease_is_taken_over(ray_session, tmp_path, synth30):
    dets, out = tmp_path / "detections", tmp_path / "refined"
    dets.mkdir()
    out.mkdir()
    _split(synth30, dets, {"a.json": {1, 2}})
    (out / LEASE).write_text(json.dumps({"owner": "someone-else", "host": "h", "pid": 1, "expires_at": time.time() + 600}))
    blocked = reprocess(str(dets), _template(synth30, out))
    assert blocked["skipped_lease"] and not (out / "a.json").exists()
    (out / LEASE).write_text(json.dumps({"owner": "crashed", "host": "h", "pid": 1, "expires_at": time.time() - 1}))
    taken = reprocess(str(dets), _template(synth30, out))
    assert taken["refined"] == ["a.json"]


def test_safe_name_cannot_escape_the_prefix():
    for bad in ("../../etc/passwd", "..", "/abs/path.json", "a/../../b.json", ".hidden"):
        name = safe_name(bad)
        assert "/" not in name and name not in (".", "..") and not name.startswith(".")
