"""The performance benchmark: the pipeline against its own limit (the bare network) and against an
official-style disk round trip, plus peak memory at N and 4N images and actor scaling.

Same images, same model, same patch batch size and the same torch threads per refinement actor in
the bare-model and end-to-end runs; every end-to-end run writes to a fresh output prefix (no
resume cache). The official-style baseline is written here from the paper/README's description of
the official tools (split patches to PNG files + per-instance detail files, run the network over
the files, keep every output in one pickle, merge in a second pass); no code of theirs is used.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import torch

from bpr_core import BPRConfig, crop_patches, flow, paste_patches, propose_patches
from bpr_core import rle as rle_utils
from bpr_core.formats import load_image_index, read_results_json, row_to_result
from bpr_core.config import OFFICIAL_RULES
from bpr_core.refiner import make_patch_refiner
from bpr_core.training import match_gt
from bpr_core.synthetic import write_dataset

from .procmem import PeakRSS
from pipeline.refine_job import RefineOptions, run

# bpr decodes stored pixels (bpr_core.imageio EXIF policy); the baselines here read the same way.
STORED = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def dataset(root: Path, n: int, seed: int = 500) -> Path:
    d = root / f"synth-{n}-{seed}"
    if not (d / "coarse.json").exists():
        write_dataset(d, n, seed=seed)
    return d


def all_patches(d: Path, cfg: BPRConfig, keep_instances: bool = False):
    """Every patch of the set, as the pipeline extracts them (bpr_core.flow): (image patches, mask
    patches), plus [(coarse mask, boxes)] per instance with keep_instances."""
    index = load_image_index(d / "annotations.json")
    rows = read_results_json(d / "coarse.json")
    batches, instances = [], []
    by_image: dict[int, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    for image_id, mine in by_image.items():
        image = cv2.cvtColor(cv2.imread(str(d / "images" / index[image_id].file_name), STORED), cv2.COLOR_BGR2RGB)
        masks = [rle_utils.decode({"size": [r["rle_h"], r["rle_w"]], "counts": r["rle_counts"]}) for r in mine]
        pb = flow.extract(image, masks, cfg)
        batches.append(pb)
        if keep_instances:
            instances.extend((m, pb.boxes[pb.span(i)]) for i, m in enumerate(masks))
    merged = flow.PatchBatch.concat(batches, cfg.crop_size)
    if keep_instances:
        return merged.img, merged.msk, instances
    return merged.img, merged.msk


def serial_work(d: Path, checkpoint: str | None, network_s: float) -> dict:
    """The algorithm's own work in one thread with no framework and no disk writes, through the same
    per-instance flow as the pipeline (bpr_core.flow): read and decode each image and coarse RLE,
    propose and crop patches (extract); the network (network_s, the bare model's 1-thread time);
    paste the probabilities and RLE-encode (paste). Spread perfectly over the machine's cores, this
    is a floor under any flow's wall time here (see `bounds`)."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        torch.set_num_threads(1)
        refiner, cfg, _ = make_patch_refiner("network", checkpoint, "cpu", OFFICIAL_RULES)
        t = time.perf_counter()
        imgs, msks, instances = all_patches(d, cfg, keep_instances=True)
        extract_s = time.perf_counter() - t
        probs = flow.predict_u8(refiner, imgs, msks, 64)
        t, k = time.perf_counter(), 0
        for m, boxes in instances:
            m, _ = flow.finish_instance(m, boxes, probs[k : k + len(boxes)], cfg)
            k += len(boxes)
            rle_utils.encode(m)
        paste_s = time.perf_counter() - t
    finally:
        cv2.setNumThreads(threads)
    return {"extract_s": round(extract_s, 3), "network_s": round(network_s, 3), "paste_s": round(paste_s, 3),
            "total_s": round(extract_s + network_s + paste_s, 3)}


def bounds(work: dict, bare_s: float, official_s: float, cores: int) -> dict:
    """What no flow could beat on this machine. Best possible wall time: the serial work spread over
    every core with zero overhead. With the network on one thread (as in the bare-model and
    end-to-end runs) the wall time is also at least the network's own time."""
    floor = work["total_s"] / cores
    floor_1thread_net = max(work["network_s"], floor)
    return {"cores": cores, "floor_s": round(floor, 3), "floor_s_network_on_1_thread": round(floor_1thread_net, 3),
            "end_to_end_over_bare_model_max": bare_s / floor_1thread_net,
            "ours_over_official_style_max": official_s / floor}


def bare_model(d: Path, checkpoint: str | None, batch_size: int, threads: int, device: str = "cpu",
               precision: str = "auto", repeats: int = 3) -> dict:
    """The limit: the network alone over pre-made uint8 batches (preprocessing on the device and the
    copies to and from it included, as in the pipeline's refinement actors)."""
    torch.set_num_threads(threads)
    refiner, cfg, card = make_patch_refiner("network", checkpoint, device, OFFICIAL_RULES, precision=precision)
    imgs, msks = all_patches(d, cfg)
    batches = [(imgs[i : i + batch_size], msks[i : i + batch_size]) for i in range(0, len(imgs), batch_size)]
    refiner.predict(*batches[0])  # warm-up
    sec = float("inf")
    for _ in range(repeats):  # the best of a few passes: the limit, not a noisy sample of it
        t = time.perf_counter()
        for b in batches:
            refiner.predict(*b)
        sec = min(sec, time.perf_counter() - t)
    return {"patches": int(len(imgs)), "seconds": round(sec, 3), "patches_per_s": len(imgs) / sec, "model": card.get("name"),
            "batch_size": batch_size, "threads": threads, "device": device, "precision": refiner.precision,
            "repeats": repeats}


def end_to_end(d: Path, out: Path, checkpoint: str | None, batch_size: int, refine_actors: int = 0,
               shard_size: int | None = None, device: str = "cpu", **options) -> dict:
    """`jobs.refine` with its defaults (shard size, shards in flight, CPUs per actor), on `device`
    (cpu unless asked: the CPU runs must not move to a GPU where the machine has one). The
    do-no-harm rules are off here (OFFICIAL_RULES), so every flow does the official work."""
    extra = {"shard_size": shard_size, **options} if shard_size else dict(options)
    if out.exists():
        shutil.rmtree(out)
    opts = RefineOptions(images=str(d / "images"), coarse=str(d / "coarse.json"), image_info=str(d / "annotations.json"),
                         out=str(out), method="network", checkpoint=checkpoint, batch_size=batch_size,
                         refine_actors=refine_actors, device=device, config=dict(OFFICIAL_RULES), **extra)
    with PeakRSS() as mem:
        t = time.perf_counter()
        m = run(opts)
        sec = time.perf_counter() - t
    patches = sum(s["patches"] for s in m["timings"]["per_shard"])
    images = len(load_image_index(d / "annotations.json"))
    return {"images": images, "patches": patches, "seconds": round(sec, 3), "patches_per_s": patches / sec,
            "images_per_s": images / sec, "peak_rss_mb": round(mem.peak / 2**20, 1),
            "peak_rss_shmem_mb": round(mem.peak_shmem / 2**20, 1), "peak_pss_mb": round(mem.peak_pss / 2**20, 1),
            "refine_actors": refine_actors,
            "shards": len(m["timings"]["per_shard"]), "device": m["device"], "pools": m["pools"],
            "actors_started": m["timings"]["actors"], "stage_stats": m.get("_stats", "")}


def gpu_runs(d: Path, root: Path, checkpoint: str | None, batch_size: int) -> dict:
    """On a machine with CUDA: the bare network at each precision (channels_last), and `jobs.refine`
    end to end with its GPU defaults (refinement actors with num_gpus=1, fp16), and their ratio."""
    out = {"device": torch.cuda.get_device_name(0), "bare_model": {}}
    for precision in ("fp32", "fp16", "bf16"):
        out["bare_model"][precision] = bare_model(d, checkpoint, batch_size, threads=1, device="cuda", precision=precision)
    e2e = end_to_end(d, root / "out-e2e-gpu", checkpoint, batch_size, device="cuda")
    e2e.pop("stage_stats", None)
    out["end_to_end"] = e2e
    out["end_to_end_over_bare_model_fp16"] = e2e["patches_per_s"] / out["bare_model"]["fp16"]["patches_per_s"]
    return out


# --- official-style baseline ------------------------------------------------------------------


def _split_one(args):
    i, row, image_path, gt_masks, cfg_dict, root = args
    cfg = BPRConfig.from_dict(cfg_dict)
    img = cv2.imread(image_path, STORED)  # BGR, as cv2 writes it back
    m = rle_utils.decode({"size": [row["rle_h"], row["rle_w"]], "counts": row["rle_counts"]})
    boxes = propose_patches(m, cfg)
    # the official split needs GT even at inference: it writes GT patches too
    gts = [rle_utils.decode(g) for g in gt_masks]
    j, _ = match_gt(m, gts, min_iou=0.0)
    gt = gts[j] if j >= 0 else np.zeros_like(m)
    ids = []
    for k, (ip, mp, gp) in enumerate(zip(crop_patches(img, boxes, cfg), crop_patches(m.view(np.uint8), boxes, cfg),
                                         crop_patches(gt.astype(np.uint8), boxes, cfg))):
        pid = i * 100000 + k
        cv2.imwrite(os.path.join(root, "img", f"{pid}.png"), ip)
        cv2.imwrite(os.path.join(root, "mask", f"{pid}.png"), mp * 255)
        cv2.imwrite(os.path.join(root, "gt", f"{pid}.png"), gp * 255)
        ids.append(pid)
    with open(os.path.join(root, "detail", f"{i}.txt"), "w") as f:
        f.write(str({"image_id": row["image_id"], "patches": ids, "boxes": boxes.tolist()}))
    return len(ids)


def official_style(d: Path, work: Path, checkpoint: str | None, batch_size: int, threads: int, procs: int = 2) -> dict:
    from bpr_core.formats import load_coco_gt

    if work.exists():
        shutil.rmtree(work)
    for sub in ("img", "mask", "gt", "detail"):
        (work / sub).mkdir(parents=True)
    refiner, cfg, _ = make_patch_refiner("network", checkpoint, "cpu", OFFICIAL_RULES)
    index = load_image_index(d / "annotations.json")
    rows = read_results_json(d / "coarse.json")
    coco = load_coco_gt(d / "annotations.json")
    t0 = time.perf_counter()
    jobs = []
    for i, r in enumerate(rows):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[r["image_id"]], catIds=[r["category_id"]]))
        gts = [{"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"]} for a in anns]
        jobs.append((i, r, str(d / "images" / index[r["image_id"]].file_name), gts, cfg.to_dict(), str(work)))
    pool = Pool(procs)
    try:
        n_patches = sum(pool.map(_split_one, jobs, chunksize=4))
    finally:  # close + join, not terminate: a SIGTERM makes the forked children print Ray's signal handler
        pool.close()
        pool.join()
    t_split = time.perf_counter() - t0
    # inference over the files, outputs held in one dict and pickled
    torch.set_num_threads(threads)
    names = sorted(os.listdir(work / "img"), key=lambda n: int(n[:-4]))
    outputs = {}
    for s in range(0, len(names), batch_size):
        chunk = names[s : s + batch_size]
        imgs = np.stack([cv2.cvtColor(cv2.imread(str(work / "img" / n), STORED), cv2.COLOR_BGR2RGB) for n in chunk])
        msks = np.stack([cv2.imread(str(work / "mask" / n), cv2.IMREAD_GRAYSCALE) // 255 for n in chunk])
        probs = refiner.predict(imgs, msks)
        for n, p in zip(chunk, probs):
            outputs[int(n[:-4])] = p
    with open(work / "outputs.pkl", "wb") as f:
        pickle.dump(outputs, f)
    t_infer = time.perf_counter() - t0 - t_split
    # merge pass
    with open(work / "outputs.pkl", "rb") as f:
        outputs = pickle.load(f)  # our own file, written just above
    merged = []
    for i, r in enumerate(rows):
        with open(work / "detail" / f"{i}.txt") as f:
            detail = ast.literal_eval(f.read())  # the official detail format is a Python literal
        m = rle_utils.decode({"size": [r["rle_h"], r["rle_w"]], "counts": r["rle_counts"]})
        if detail["patches"]:
            probs = np.stack([outputs[p] for p in detail["patches"]])
            m = paste_patches(m, np.asarray(detail["boxes"]), probs, cfg)
        merged.append(row_to_result({**r, "rle_counts": rle_utils.encode(m)["counts"]}))
    (work / "refined.json").write_text(json.dumps(merged))
    sec = time.perf_counter() - t0
    return {"patches": n_patches, "seconds": round(sec, 3), "patches_per_s": n_patches / sec,
            "split_s": round(t_split, 3), "inference_s": round(t_infer, 3), "merge_s": round(sec - t_split - t_infer, 3),
            "threads": threads, "split_processes": procs}


def untrained_checkpoint(root: Path, arch: str) -> str:
    """A randomly initialised network of `arch` at the paper's geometry, for timing only (its
    outputs mean nothing): lets the benchmark measure the pipeline around a network as costly as
    the paper's without a trained model of it."""
    from bpr_core.model import build_model
    from bpr_core.refiner import save_checkpoint

    torch.manual_seed(0)
    path = root / f"untrained-{arch}.pt"
    save_checkpoint(path, build_model(arch), BPRConfig(model=arch), {"name": f"untrained-{arch}", "version": "timing-only"})
    return str(path)


def fresh_ray(fn):
    """fn() on a newly started local Ray (the previous one is shut down first and after)."""
    import ray

    from pipeline.runtime import init_ray

    ray.shutdown()
    init_ray()
    try:
        return fn()
    finally:
        ray.shutdown()
        init_ray()


def benchmark(root: Path, n: int, checkpoint: str | None = None, batch_size: int = 64, quick: bool = False,
              driver: bool = True) -> dict:
    from pipeline.runtime import init_ray

    init_ray()
    d, d4 = dataset(root, n), dataset(root, 4 * n, seed=501)
    res = {"n_images": n, "batch_size": batch_size, "machine": {"cpus": os.cpu_count()}}
    res["bare_model"] = bare_model(d, checkpoint, batch_size, threads=1)
    res["serial_work"] = serial_work(d, checkpoint, res["bare_model"]["seconds"])
    res["end_to_end"] = end_to_end(d, root / "out-e2e", checkpoint, batch_size)
    res["official_style"] = official_style(d, root / "official", checkpoint, batch_size, threads=2)
    # Memory at N and 4N with the same shard size (N/2 images; since one flow serves every shard,
    # the shard size only sets the unit of commit, and both runs commit at the same granularity).
    # Each memory run has a local Ray of its own: idle worker processes the earlier runs left
    # behind (Ray keeps them for reuse, each with torch loaded) would count in the process tree.
    half = max(1, n // 2)
    res["memory_n"] = fresh_ray(lambda: end_to_end(d, root / "out-mem-n", checkpoint, batch_size, shard_size=half))
    res["memory_4n"] = fresh_ray(lambda: end_to_end(d4, root / "out-mem-4n", checkpoint, batch_size, shard_size=half))
    res["end_to_end_4n"] = end_to_end(d4, root / "out-e2e-4n", checkpoint, batch_size)
    if not quick:
        res["end_to_end_2_actors"] = end_to_end(d, root / "out-e2e-2a", checkpoint, batch_size, refine_actors=2)
        res["end_to_end_1_actor"] = end_to_end(d, root / "out-e2e-1a", checkpoint, batch_size, refine_actors=1)
    e2e, bare, off, e4 = res["end_to_end"], res["bare_model"], res["official_style"], res["end_to_end_4n"]
    res["bounds"] = bounds(res["serial_work"], bare["seconds"], off["seconds"], os.cpu_count() or 1)
    res["ratios"] = {
        "end_to_end_over_bare_model": e2e["patches_per_s"] / bare["patches_per_s"],
        # the floor (serial work over the cores) scaled to 4N's patches, over 4N's wall time
        "end_to_end_4n_over_floor": res["bounds"]["floor_s"] * (e4["patches"] / e2e["patches"]) / e4["seconds"],
        "ours_over_official_style": off["seconds"] / e2e["seconds"],
        "peak_rss_4n_over_n": res["memory_4n"]["peak_rss_mb"] / res["memory_n"]["peak_rss_mb"],
    }
    res["end_to_end_4n_over_bare_model"] = e4["patches_per_s"] / bare["patches_per_s"]  # for scale, no target
    # Summed RSS counts a shared page (the object store) once per process that touched it; PSS
    # divides it among them: the memory the process tree really holds.
    res["peak_pss_4n_over_n"] = res["memory_4n"]["peak_pss_mb"] / res["memory_n"]["peak_pss_mb"]
    if driver:
        res["driver"] = driver_cost(root, [20_000, 80_000] if quick else [500_000, 2_000_000])
    import ray

    if torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) >= 1:
        res["gpu"] = gpu_runs(d, root, checkpoint, batch_size)
    res["targets"] = {"end_to_end_over_bare_model": 0.85, "end_to_end_4n_over_floor": 0.7, "ours_over_official_style": 2.0,
                      "peak_rss_4n_over_n": 1.2, "driver_cpu_us_per_instance": 2.0}
    return res


def driver_cost(root: Path, sizes: list[int]) -> dict:
    """The driver's CPU and memory per instance at two input sizes, projected to 20M (bench.driver,
    each size in its own process)."""
    import subprocess
    import sys

    out = root / "driver.json"
    subprocess.run([sys.executable, "-m", "bench.driver", "--instances", *map(str, sizes), "--work", str(root / "driver"),
                    "--out", str(out)], check=True)
    return json.loads(out.read_text())
