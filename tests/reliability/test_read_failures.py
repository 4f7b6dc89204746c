"""Images that cannot be read: never a silent permanent skip.

One missing image: every input detection is still in refined.json (its instances pass through
with their coarse masks, status and reason), the command says so (exit 3, last line), the shard
is not marked done, and once the image is back a re-run refines it, ending byte-identical to a run
that never lost it. No image readable: a systemic failure, exit non-zero naming the cause, nothing
committed. Transient errors are retried; reprocess does not mark such a file done.
"""

import json
import shutil

import pytest

from bpr_core.formats import JobFailed
from jobs import refine
from pipeline.reprocess import reprocess
from pipeline.refine_job import RefineOptions


def _copy(synth30, dst):
    shutil.copytree(synth30, dst)
    return dst


def _args(data, out, images=None):
    return ["--images", str(images or data / "images"), "--coarse", str(data / "coarse.json"), "--image-info",
            str(data / "annotations.json"), "--out", str(out), "--refiner", "guided-filter", "--shard-size", "10"]


def test_missing_image_passes_through_then_a_rerun_refines_it(ray_session, tmp_path, synth30, capsys):
    data = _copy(synth30, tmp_path / "data")
    assert refine.main(_args(data, tmp_path / "reference")) == 0
    reference = (tmp_path / "reference" / "refined.json").read_bytes()
    coarse = json.loads((data / "coarse.json").read_text())
    index = {im["id"]: im["file_name"] for im in json.loads((data / "annotations.json").read_text())["images"]}
    lost_id = 14
    lost = data / "images" / index[lost_id]
    shutil.move(lost, tmp_path / "kept.png")
    capsys.readouterr()

    out = tmp_path / "out"
    assert refine.main(_args(data, out)) == refine.EXIT_READ_FAILURES
    text = capsys.readouterr()
    n_lost = sum(1 for c in coarse if c["image_id"] == lost_id)
    assert text.out.strip().splitlines()[-1] == (f"quarantined {n_lost}: {n_lost} image unreadable (retried by the next run) "
                                                 "(each reason in quarantine.parquet)")
    assert f"warning: {n_lost} instances are on images that could not be read" in text.err
    entries = json.loads((out / "refined.json").read_text())
    assert len(entries) == len(coarse)  # every input detection
    for e in entries:
        if e["image_id"] == lost_id:
            c = coarse[e["instance_id"]]
            assert e["bpr_status"] == "quarantined" and "unreadable" in e["bpr_reason"] and index[lost_id] in e["bpr_reason"]
            assert e["segmentation"]["counts"] == c["segmentation"]["counts"]  # its coarse mask
    marker = json.loads((out / "_commits" / "shard-00001.json").read_text())
    assert marker["read_failures"] == n_lost  # committed, but not done

    shutil.move(tmp_path / "kept.png", lost)
    assert refine.main(_args(data, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timings"]["shards_run"] == 1 and manifest["timings"]["shards_skipped"] == 2  # only the failed shard
    assert (out / "refined.json").read_bytes() == reference
    assert capsys.readouterr().out.strip().splitlines()[-1] == "quarantined: none"


def test_no_image_readable_fails_the_job_naming_the_cause(ray_session, tmp_path, synth30):
    empty = tmp_path / "no-images"
    empty.mkdir()
    with pytest.raises(JobFailed) as e:
        refine.main(_args(synth30, tmp_path / "out", images=empty))
    msg = str(e.value)
    assert msg.startswith("shard-00000: 10 of 10 images could not be read (more than 25%, --max-unreadable-share): "
                          "a systemic failure")
    assert f"First error: image {empty}/" in msg and "unreadable: FileNotFoundError" in msg
    assert not (tmp_path / "out" / "_commits").exists() and not (tmp_path / "out" / "refined.json").exists()


def test_transient_errors_are_retried_and_a_missing_file_is_not(tmp_path, monkeypatch):
    import cv2
    import numpy as np

    from pipeline import stages

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    calls, failures_left = [], [2]
    real = stages.read_bytes

    def flaky(loc):
        calls.append(loc.uri)
        if failures_left[0]:
            failures_left[0] -= 1
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
        return real(loc)

    monkeypatch.setattr(stages, "read_bytes", flaky)
    reader = stages.ImageReader(str(tmp_path), retries=3, backoff=0.0)
    image, _, _ = reader.read("a.png")
    assert image.shape == (8, 8, 3) and len(calls) == 3
    calls.clear()
    with pytest.raises(stages.ImageUnusable, match="unreadable: FileNotFoundError"):
        reader.read("missing.png")
    assert len(calls) == 1  # not retried: it is not there
    calls.clear()
    monkeypatch.setattr(stages, "read_bytes", lambda loc: (calls.append(1), (_ for _ in ()).throw(OSError("reset")))[1])
    with pytest.raises(stages.ImageUnusable, match="unreadable: OSError: reset"):
        reader.read("a.png")
    assert len(calls) == 4  # the first try and 3 retries
    assert stages.is_read_failure(f"image {tmp_path}/a.png unreadable: OSError: reset")


def test_reprocess_does_not_mark_a_file_with_unread_images_done(ray_session, tmp_path, synth30):
    data = _copy(synth30, tmp_path / "data")
    dets = tmp_path / "detections"
    dets.mkdir()
    shutil.copy(data / "coarse.json", dets / "batch.json")
    index = {im["id"]: im["file_name"] for im in json.loads((data / "annotations.json").read_text())["images"]}
    shutil.move(data / "images" / index[3], tmp_path / "kept.png")
    template = RefineOptions(images=str(data / "images"), coarse="", image_info=str(data / "annotations.json"),
                             out=str(tmp_path / "refined"), method="guided-filter", shard_size=15)
    first = reprocess(str(dets), template)
    assert first["retry"] == ["batch.json"] and first["refined"] == []
    shutil.move(tmp_path / "kept.png", data / "images" / index[3])
    second = reprocess(str(dets), template)
    assert second["refined"] == ["batch.json"] and second["retry"] == []
    assert reprocess(str(dets), template)["up_to_date"] == ["batch.json"]


def test_a_replaced_image_is_refined_again(ray_session, tmp_path, synth30):
    """Image identity (size and modification time, from one listing) is part of the shard key: an
    unchanged re-run does nothing, a replaced image redoes exactly its shard."""
    import os

    import cv2
    import numpy as np

    data = _copy(synth30, tmp_path / "data")
    out = tmp_path / "out"
    assert refine.main(_args(data, out)) == 0
    assert refine.main(_args(data, out)) == 0
    assert json.loads((out / "manifest.json").read_text())["timings"]["shards_run"] == 0
    index = {im["id"]: im["file_name"] for im in json.loads((data / "annotations.json").read_text())["images"]}
    path = data / "images" / index[25]
    old = cv2.imread(str(path))
    cv2.imwrite(str(path), np.ascontiguousarray(old[:, ::-1]))  # another picture, same name and size
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    before = (out / "refined.json").read_bytes()
    assert refine.main(_args(data, out)) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["timings"]["shards_run"] == 1 and m["timings"]["shards_skipped"] == 2
    assert (out / "refined.json").read_bytes() != before  # the guided filter saw the new picture
