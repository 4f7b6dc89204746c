import json
import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from bpr_core.synthetic import write_dataset
from pipeline.refine_job import RefineOptions, run

from .conftest import kill_tree, run_refine_subprocess


def _opts(data: Path, out: Path, **kw) -> RefineOptions:
    return RefineOptions(images=str(data / "images"), coarse=str(data / "coarse.json"),
                         image_info=str(data / "annotations.json"), out=str(out), **kw)


def _segs(path: Path) -> list:
    return [(d["image_id"], d["segmentation"]) for d in json.loads(path.read_text())]


def test_identity_refiner_returns_coarse_input_bit_for_bit_on_200_images(ray_session, tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 200, seed=8, min_size=128, max_size=224)
    m = run(_opts(data, tmp_path / "out", method="identity", shard_size=100))
    coarse = json.loads((data / "coarse.json").read_text())
    refined = json.loads((tmp_path / "out" / "refined.json").read_text())
    assert m["invariant"]["ok"] and m["counts"]["input"] == len(coarse) == len(refined)
    assert m["counts"]["refined"] > 0.9 * len(coarse)
    # every instance, bit for bit, in input order (instance_id = position in the input file)
    assert [r["instance_id"] for r in refined] == list(range(len(coarse)))
    for c, r in zip(coarse, refined):
        assert r["segmentation"] == c["segmentation"] and r["image_id"] == c["image_id"] and r["score"] == c["score"]
    # overlapping instances were present
    assert len({c["image_id"] for c in coarse}) == 200
    parts = pq.read_table(tmp_path / "out" / "parts")
    assert parts.num_rows == len(coarse) and set(parts.column("status").to_pylist()) <= {"refined", "passed_through"}
    assert (parts.column("coarse_area").to_numpy() == parts.column("refined_area").to_numpy()).all()


def test_rerun_does_no_work_and_new_detections_refine_only_the_new_shard(ray_session, tmp_path, synth30):
    data = tmp_path / "data"
    shutil.copytree(synth30, data)
    out = tmp_path / "out"
    first = run(_opts(data, out, method="guided-filter", shard_size=10))
    assert first["timings"]["shards_run"] == 3 and first["invariant"]["ok"]
    before = (out / "refined.json").read_bytes()
    again = run(_opts(data, out, method="guided-filter", shard_size=10))
    assert again["timings"]["shards_run"] == 0 and again["timings"]["shards_skipped"] == 3
    assert (out / "refined.json").read_bytes() == before
    # new detector outputs land: 5 more images (ids 31-35) and their detections
    extra = tmp_path / "extra"
    write_dataset(extra, 35, seed=21)  # same seed: images 1-30 identical, 31-35 new
    gt, coarse = (json.loads((extra / f).read_text()) for f in ("annotations.json", "coarse.json"))
    for im in gt["images"][30:]:
        shutil.copy(extra / "images" / im["file_name"], data / "images" / im["file_name"])
    (data / "annotations.json").write_text(json.dumps(gt))
    (data / "coarse.json").write_text(json.dumps(coarse))
    third = run(_opts(data, out, method="guided-filter", shard_size=10))
    assert third["timings"]["shards_run"] == 1 and third["timings"]["shards_skipped"] == 3
    assert third["counts"]["input"] == len(coarse) and third["invariant"]["ok"]
    assert (out / "refined.json").read_bytes().startswith(before[: before.rfind(b"}") + 1])


def test_missing_image_is_quarantined_and_the_rest_completes(ray_session, tmp_path, synth30, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(synth30, data)
    os.remove(data / "images" / "000004.png")  # image_id 5
    m = run(_opts(data, tmp_path / "out", method="identity", shard_size=15))
    coarse = json.loads((data / "coarse.json").read_text())
    lost = [c for c in coarse if c["image_id"] == 5]
    assert lost and m["counts"]["quarantined"] == len(lost) and m["invariant"]["ok"]
    q = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert {r["image_id"] for r in q} == {5} and all("000004.png" in r["reason"] for r in q)
    entries = json.loads((tmp_path / "out" / "refined.json").read_text())
    assert len(entries) == len(coarse)  # every detection, the lost image's with their coarse masks
    assert sorted(e["bpr_status"] == "quarantined" for e in entries).count(True) == len(lost)
    # The outputs assembled from shard summaries made in Ray tasks (as large jobs do) are the same bytes.
    import pipeline.outputs as outputs

    tasks = []
    ray_summaries = outputs.ray_summaries
    monkeypatch.setattr(outputs, "PARALLEL_ASSEMBLY_INSTANCES", 0)
    monkeypatch.setattr(outputs, "ray_summaries", lambda *a: (tasks.append(s) or s for s in ray_summaries(*a)))
    m2 = run(_opts(data, tmp_path / "out2", method="identity", shard_size=15))
    assert len(tasks) == 2 and not isinstance(tasks[0]["text"], str)  # the texts stayed in the object store
    assert m2["counts"] == m["counts"] and m2["invariant"] == m["invariant"]
    for name in ("refined.json", "quarantine.parquet"):
        assert (tmp_path / "out2" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_killed_run_resumes_to_the_same_output_without_duplicates(tmp_path, synth30):
    common = ["--images", str(synth30 / "images"), "--coarse", str(synth30 / "coarse.json"),
              "--image-info", str(synth30 / "annotations.json"), "--refiner", "guided-filter", "--shard-size", "2",
              "--instances-per-part", "4", "--num-cpus", "2"]
    ref_out, out = tmp_path / "undisturbed", tmp_path / "killed"
    temp = f"/tmp/bprt-{os.getpid()}-{int(time.time())}"
    rc, log = run_refine_subprocess(common + ["--out", str(ref_out)], {"BPR_RAY_TEMP_DIR": temp + "a"})
    assert rc == 0, log
    # a clean run: progress with rate and ETA, and not one ERROR, WARNING or Ray INFO line
    lines = log.splitlines()
    assert not [l for l in lines if "ERROR" in l or "WARNING" in l or "\tINFO " in l or "core_worker" in l], log
    assert any(l.startswith("30/30 images (100%)") and "img/s" in l and "ETA 0s" in l for l in lines), log
    # The killed run reads a copy of the images in which the last shard's last image is a FIFO: its
    # extraction blocks until killed, so the run is always killed mid-flight, whatever the timing.
    images = tmp_path / "images"
    shutil.copytree(synth30 / "images", images)
    index = json.loads((synth30 / "annotations.json").read_text())["images"]
    last = images / max(index, key=lambda im: im["id"])["file_name"]
    last.unlink()
    os.mkfifo(last)
    common = [images if a == str(synth30 / "images") else a for a in common]
    common = [str(a) for a in common]
    proc = run_refine_subprocess(common + ["--out", str(out)], {"BPR_RAY_TEMP_DIR": temp + "b"}, wait=False)
    try:
        deadline = time.time() + 240
        while not (out / "_commits").is_dir() or not any((out / "_commits").iterdir()):  # killed at its first commit
            assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
            time.sleep(0.2)
    finally:
        kill_tree(proc, temp + "b")
    commits = sorted(p.name for p in (out / "_commits").iterdir())
    assert 1 <= len(commits) < 15 and "shard-00014.json" not in commits
    assert json.loads((out / "manifest.json").read_text())["status"] == "in_progress"
    last.unlink()
    shutil.copy2(synth30 / "images" / last.name, last)
    rc, log = run_refine_subprocess(common + ["--out", str(out)], {"BPR_RAY_TEMP_DIR": temp + "c"})
    assert rc == 0, log
    assert f"({len(commits)} already done)" in log and "30/30 images (100%)" in log
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timings"]["shards_skipped"] == len(commits) and manifest["invariant"]["ok"]
    assert (out / "refined.json").read_bytes() == (ref_out / "refined.json").read_bytes()
    ids = [(d["image_id"], d["instance_id"]) for d in json.loads((out / "refined.json").read_text())]
    assert len(ids) == len(set(ids))
    shutil.rmtree(temp + "a", ignore_errors=True)
    shutil.rmtree(temp + "b", ignore_errors=True)
    shutil.rmtree(temp + "c", ignore_errors=True)


def test_one_flow_serves_every_shard_with_actors_started_once_and_gives_the_same_output(ray_session, tmp_path, synth30):
    """Six shards run through one Ray Data flow: one refinement actor and at most the extraction
    pool's actors serve the whole job (a flow per shard would start them six times), and the output
    does not depend on how the images are cut into shards or blocks."""
    one = run(_opts(synth30, tmp_path / "one", method="guided-filter", shard_size=30, extract_actors=1))
    six = run(_opts(synth30, tmp_path / "six", method="guided-filter", shard_size=5, images_per_block=2,
                    instances_per_call=7, instances_per_part=11, extract_actors=2, refine_actors=1))
    assert one["timings"]["shards_run"] == 1 and six["timings"]["shards_run"] == 6
    assert six["timings"]["actors"]["refine"] == 1 and 1 <= six["timings"]["actors"]["extract"] <= 2
    assert one["pools"] == {"extract": [1, 1], "refine": [1, 2],  # auto on 2 CPUs: up to one refinement actor per CPU
                            "input_blocks": 4, "images_per_put": 8}  # 30 images for 4 blocks per extraction actor
    # six shards for two extraction actors: blocks of 4 images (8 blocks wanted), 2 per 5-image shard
    assert six["pools"]["images_per_put"] == 4 and six["pools"]["input_blocks"] == 12
    assert one["timings"]["actors"]["extract"] == 1 and 1 <= one["timings"]["actors"]["refine"] <= 2
    assert (tmp_path / "six" / "refined.json").read_bytes() == (tmp_path / "one" / "refined.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "six" / "_commits").iterdir()) == [f"shard-0000{i}.json" for i in range(6)]
    assert six["invariant"]["ok"] and six["counts"] == one["counts"]
    # parts: several per shard (at most 11 instances each), every instance once
    parts = list((tmp_path / "six" / "parts").glob("shard-*/part-*.parquet"))
    assert len(parts) > 6 and sum(pq.read_metadata(p).num_rows for p in parts) == six["counts"]["input"]


def test_visualize_draws_the_most_changed_images_or_the_ones_asked_for(ray_session, tmp_path, synth30):
    import cv2

    from bpr_core import rle

    m = run(_opts(synth30, tmp_path / "out", method="guided-filter", shard_size=10, visualize=2))
    written = m["outputs"]["visualize"]
    # the ranking, recomputed independently: changed pixels per image, refined.json against the input
    coarse = json.loads((synth30 / "coarse.json").read_text())
    change: dict = {}
    for e in json.loads((tmp_path / "out" / "refined.json").read_text()):
        c = coarse[e["instance_id"]]
        assert c["image_id"] == e["image_id"]
        change[e["image_id"]] = change.get(e["image_id"], 0) + int((rle.decode(c["segmentation"]) ^ rle.decode(e["segmentation"])).sum())
    top = sorted((i for i in change if change[i]), key=lambda i: (-change[i], i))[:2]
    assert [Path(p).name for p in written] == [f"{i}.png" for i in top] + ["most_changed.png"]
    sizes = {im["id"]: (im["height"], im["width"]) for im in json.loads((synth30 / "annotations.json").read_text())["images"]}
    for p, image_id in zip(written, top):
        pic = cv2.imread(p)
        assert pic is not None and pic.shape[:2] == (2 * sizes[image_id][0], 2 * sizes[image_id][1])  # small: 2x
    panel = cv2.imread(written[-1])
    assert panel.shape[0] == 8 * (256 + 20)  # the run's 8 most-changed instances, one row each
    m = run(_opts(synth30, tmp_path / "ids", method="guided-filter", shard_size=10, visualize_ids=[7, 2]))
    assert [Path(p).name for p in m["outputs"]["visualize"]] == ["7.png", "2.png", "most_changed.png"]


def test_do_no_harm_acceptance_passes_redrawn_instances_through_bit_for_bit(ray_session, tmp_path, synth30):
    """A network that inverts every mask, under --min-keep-iou: every instance the acceptance rule
    rejects comes out as its coarse mask, bit for bit, with status passed_through and the reason."""
    import torch

    from bpr_core import BPRConfig, save_checkpoint
    from bpr_core.model import build_model

    net = build_model("hrnet_lite")
    with torch.no_grad():
        net.mask_scale.fill_(-40.0)  # logits dominated by the inverted coarse mask
    ckpt = tmp_path / "inverter.pt"
    save_checkpoint(ckpt, net, BPRConfig(model="hrnet_lite", input_size=64), {"name": "inverter", "version": "t"})
    m = run(_opts(synth30, tmp_path / "out", method="network", checkpoint=str(ckpt), config={"min_keep_iou": 0.5}))
    coarse = json.loads((synth30 / "coarse.json").read_text())
    refined = json.loads((tmp_path / "out" / "refined.json").read_text())
    assert m["invariant"]["ok"] and m["config"]["min_keep_iou"] == 0.5
    assert [r["segmentation"] for r in refined] == [c["segmentation"] for c in coarse]
    parts = pq.read_table(tmp_path / "out" / "parts").to_pylist()
    rejected = [p for p in parts if p["reason"] == "change_rejected"]
    assert len(rejected) > 0.9 * len(coarse) and all(p["status"] == "passed_through" for p in rejected)
    assert all(p["num_patches"] > 0 and p["refined_area"] == p["coarse_area"] for p in rejected)


def test_refiner_and_the_job_give_the_same_masks(ray_session, tmp_path, synth30):
    """`Refiner` (one process) and `jobs.refine` (Ray) run one per-instance flow (bpr_core.flow):
    every refined.json mask equals Refiner's for the same image and coarse masks, bit for bit."""
    import cv2
    import numpy as np

    from bpr_core import Refiner
    from bpr_core import rle as rle_utils

    m = run(_opts(synth30, tmp_path / "out", method="guided-filter", shard_size=10))
    assert m["invariant"]["ok"]
    refined = json.loads((tmp_path / "out" / "refined.json").read_text())
    coarse = json.loads((synth30 / "coarse.json").read_text())
    files = {im["id"]: im["file_name"] for im in json.loads((synth30 / "annotations.json").read_text())["images"]}
    refiner = Refiner(method="guided-filter")
    changed = 0
    for image_id in sorted(files):
        mine = [c for c in coarse if c["image_id"] == image_id]
        out = [r for r in refined if r["image_id"] == image_id]
        assert len(out) == len(mine)
        image = cv2.cvtColor(cv2.imread(str(synth30 / "images" / files[image_id])), cv2.COLOR_BGR2RGB)
        masks = np.stack([rle_utils.decode(c["segmentation"]) for c in mine])
        for c, r, mask in zip(mine, out, refiner.refine(image, masks)):
            assert np.array_equal(rle_utils.decode(r["segmentation"]), mask), (image_id, r["instance_id"])
            changed += r["segmentation"]["counts"] != c["segmentation"]["counts"]
    assert changed > 20  # masks did change, so the equality is not the identity's
