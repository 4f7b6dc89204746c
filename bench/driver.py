"""What the refinement job's driver costs per input instance: CPU time and memory, measured at two
input sizes and projected to 20M instances.

The driver's own work, with a local Ray for what the driver asks of it (the workers' part, writing
the parts, is done here untimed); the images are empty files, listed (their size and mtime are
part of the shard keys), never decoded:
    index     read the image index (a Parquet table with the Parquet input, COCO JSON with the JSON
              input; per image, not per instance) and start the listing of the images root in a
              child process, as the job does from 100k images on (its CPU is reported apart, as
              `listing`, and not counted as the driver's)
    ingest    read the input (a Parquet instance table column by column, or a results JSON as
              columns; a plain one from 512 MB on by reader processes beside the driver, whose CPU
              is reported apart as `readers`), validate it against the image index, spill by shard
    plan      per shard: read the spill, join the image identities, hash the shard key, cut Arrow
              input blocks and put them into a local Ray's object store (`graph.images_per_put`)
    receipts  the commit bookkeeping for one receipt per written part
    assemble  concatenate the shards' summaries into refined.json and quarantine.parquet; each
              shard's parts are read and summarised (`shard_summary`) in Ray tasks and one task
              writes refined.json, as in the job from 200k instances on (their CPU is reported
              apart, as `summaries`, and not counted as the driver's; getting their counts is)
Each size runs in its own process, so its peak RSS is its own; memory is reported as the peak over
the RSS after start-up (imports, model load, Ray), per instance, and apart: the object store's
pages the puts wrote (mapped into the driver, counted in its RSS, not its heap).

Whether the driver holds anything per instance: the memory grows with the images (the image index
is per image, held as Arrow) and should not grow with the instances. A third run takes the larger
size's instances on the smaller size's images (16 per image instead of 4), so that two runs differ
only in their instances and two only in their images (`memory_split`).

    python -m bench.driver --instances 500000 2000000 [--formats parquet json] [--out driver.json]

The JSON's top level (points, projection_20m) is the first format (Parquet: the columnar path,
what the target is for); the others are under `by_format`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RLE_8x8 = "b04400000>"  # a 4x4 square in an 8x8 mask (the driver never decodes masks)


def _rss_mb(field: str = "VmRSS") -> float:
    """Resident memory in MB: VmRSS (all), or RssShmem (shared memory mapped in: here the object
    store's pages the driver's puts wrote)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# json: the smallest entries (image_id, category_id, score, segmentation); json_detectron2: entries as
# detectron2 writes them (its key order, and a bbox of float32 values printed by Python's json).
FORMATS = {"parquet": "coarse.parquet", "json": "coarse.json", "json_detectron2": "coarse_detectron2.json"}
INDEXES = {"parquet": "index.parquet", "json": "annotations.json", "json_detectron2": "annotations.json"}  # the image index each input comes with


def write_inputs(root: Path, instances: int, fmt: str = "json", per_image: int = 4) -> Path:
    """`instances` detections on instances/per_image images as a COCO results JSON or a Parquet
    instance table, the image index and the images as empty files (the driver lists them, never
    reads them), written once per size."""
    d = root / (f"driver-{instances}" if per_image == 4 else f"driver-{instances}-{per_image}")
    if (d / FORMATS[fmt]).exists() and (d / INDEXES[fmt]).exists():
        return d
    (d / "images").mkdir(parents=True, exist_ok=True)
    n_images = (instances + per_image - 1) // per_image
    if not (d / "annotations.json").exists():
        for i in range(n_images):
            open(d / "images" / f"{i + 1:08d}.png", "wb").close()
        with open(d / "annotations.tmp", "w") as f:
            json.dump({"images": [{"id": i + 1, "file_name": f"{i + 1:08d}.png", "height": 8, "width": 8} for i in range(n_images)],
                       "categories": [{"id": 1, "name": "thing"}]}, f)
        os.replace(d / "annotations.tmp", d / "annotations.json")
    if fmt == "parquet":
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = np.arange(1, n_images + 1, dtype=np.int64)
        pq.write_table(pa.table({"image_id": ids, "path": pa.array([f"{i:08d}.png" for i in ids.tolist()]),
                                 "height": np.full(n_images, 8), "width": np.full(n_images, 8)}), d / "index.tmp")
        os.replace(d / "index.tmp", d / INDEXES[fmt])
        k = np.arange(instances, dtype=np.int64)
        pq.write_table(pa.table({"image_id": k // per_image + 1, "instance_id": k, "category_id": np.ones(instances, np.int64),
                                 "score": np.full(instances, 0.5), "rle_counts": pa.repeat(pa.scalar(RLE_8x8), instances),
                                 "rle_h": np.full(instances, 8, np.int64), "rle_w": np.full(instances, 8, np.int64)}),
                       d / "coarse.tmp")
        os.replace(d / "coarse.tmp", d / FORMATS[fmt])
        return d
    import numpy as np

    boxes = np.random.default_rng(0).uniform(0, 8, (instances, 4)).astype(np.float32).tolist()  # as detectron2's tensors
    with open(d / "coarse.tmp", "w") as f:
        f.write("[")
        for k in range(instances):
            if fmt == "json":
                entry = {"image_id": k // per_image + 1, "category_id": 1, "score": 0.5,
                         "segmentation": {"size": [8, 8], "counts": RLE_8x8}}
            else:
                entry = {"image_id": k // per_image + 1, "category_id": 1, "bbox": boxes[k], "score": 0.5,
                         "segmentation": {"size": [8, 8], "counts": RLE_8x8}}
            f.write((", " if k else "") + json.dumps(entry))
        f.write("]")
    os.replace(d / "coarse.tmp", d / FORMATS[fmt])
    return d


def measure(d: Path, work: Path, fmt: str = "json") -> dict:
    """Run the driver's phases over one input (in this process) and time them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bpr_core.formats import REFINED_SCHEMA, row_to_result
    from pipeline import graph, storage
    from pipeline.commit import ShardLedger, model_identity, shard_key
    from pipeline.ingest import check_inputs, index_images, prepare_shards
    from pipeline.options import RefineOptions
    from pipeline.outputs import assemble, local_summaries, ray_summaries, ray_write_json, write_refined_json
    from pipeline.stages import RESULT_JSON, part_schema

    from bpr_core.refiner import make_patch_refiner

    opts = RefineOptions(images=str(d / "images"), coarse=str(d / FORMATS[fmt]), image_info=str(d / INDEXES[fmt]),
                         out=str(work / "out"), method="identity")
    _, cfg, card = make_patch_refiner("identity", None, "cpu", {})
    out = storage.resolve(opts.out)
    storage.makedirs(out)
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init("local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # the puts and summary tasks are real
    base_rss = _rss_mb()
    phases = {}

    shmem = [0.0]

    def timed(name, fn):
        c, t = time.process_time(), time.perf_counter()
        result = fn()
        phases[name] = {"cpu_s": round(time.process_time() - c, 3), "wall_s": round(time.perf_counter() - t, 3)}
        shmem[0] = max(shmem[0], _rss_mb("RssShmem"))
        return result

    check_inputs(opts)
    gc.collect()
    held0 = sys.getallocatedblocks(), pa.total_allocated_bytes()
    indexed = timed("index", lambda: index_images(opts, background=True))  # per image: the index; the listing starts
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reader processes (joined by the ingest's end)
    shards, quarantined, n_in = timed("ingest", lambda: prepare_shards(opts, indexed))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    readers_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    model_id = model_identity("identity", None, card)
    ledger = ShardLedger(out, opts.max_unreadable_share)

    # Blocks as the job cuts them on this box's cluster (2 CPUs: one extraction actor).
    per_put = graph.images_per_put(opts, len(shards), extract_actors=1)
    refs, put_bytes = [], [0]

    def plan():
        keys = []
        for i in range(len(shards)):
            table = shards.table(i)
            keys.append(shard_key(table, model_id, cfg.config_hash(), opts.read_policy()))
            ledger.start(i, keys[-1], table.num_rows, shards.images[i])
            for b in graph.input_blocks(table, i, per_put):
                refs.append(ray.put(b))
                put_bytes[0] += b.nbytes
        return keys

    keys = timed("plan", plan)
    n_blocks = len(refs)
    del refs[:]  # (the job holds them until the flow has read them)
    gc.collect()  # what the driver holds while the flow runs: Python objects and Arrow buffers
    held = {"python_blocks": sys.getallocatedblocks() - held0[0], "arrow_bytes": pa.total_allocated_bytes() - held0[1]}

    # The workers' part, untimed: the parts a run would have written (identity: the coarse rows).
    extra = {"status": "passed_through", "reason": "", "coarse_area": 16, "refined_area": 16, "num_patches": 0,
             "model_name": "identity", "model_version": "1", "config_hash": cfg.config_hash()}
    part_rows = opts.instances_per_part
    receipts = []
    for i in range(len(shards)):
        rows = shards[i]
        for k in range(0, len(rows), part_rows):
            chunk = [{**{c: r.get(c) for c in REFINED_SCHEMA.names if c in r}, **extra} for r in rows[k : k + part_rows]]
            for r in chunk:  # serialised by the worker (WriteParts)
                r[RESULT_JSON] = json.dumps(row_to_result(r, False), separators=(",", ":"))
            p = out.join("parts", ledger.name(i), f"part-{k:09d}.parquet")
            os.makedirs(os.path.dirname(p.path), exist_ok=True)
            pq.write_table(pa.Table.from_pylist(chunk, schema=part_schema()), p.path)
            receipts.append((i, len(chunk)))

    def bookkeeping():
        for i, n in receipts:
            if ledger.receive(i, n, 0, {}):
                ledger.commit(i)

    timed("receipts", bookkeeping)
    with_source = len(shards.sources) > 1
    manifest = timed("assemble", lambda: assemble(opts, out, shards, keys, quarantined, n_in, cfg, card,
                                                  ray_summaries(out.uri, len(shards), with_source), ray_write_json))
    peak = _peak_mb()  # before the measurement below, which holds every shard's text at once
    started = time.process_time()  # what the Ray tasks did, measured here after the run (not the driver's)
    write_refined_json(str(work / "again"), [s["text"] for s in local_summaries(out.uri, len(shards), with_source)])
    summary_cpu = [time.process_time() - started]
    ray.shutdown()
    listing_cpu = indexed[1].listing.cpu_s  # in the child process: not the driver's CPU
    shards.close()
    assert manifest["invariant"]["ok"], manifest["invariant"]
    cpu = sum(p["cpu_s"] for p in phases.values())
    return {"format": fmt, "instances": n_in, "images": sum(shards.images), "shards": len(shards), "input_blocks": n_blocks, "images_per_put": per_put,
            "phases": phases, "held_after_plan": held, "cpu_s": round(cpu, 3), "cpu_us_per_instance": round(1e6 * cpu / n_in, 2),
            "listing": {"where": "child process", "cpu_s": round(listing_cpu, 3),
                        "cpu_us_per_image": round(1e6 * listing_cpu / max(1, len(indexed[1])), 2)},
            "summaries": {"where": "Ray tasks (their CPU measured in-process after the run)", "cpu_s": round(summary_cpu[0], 3),
                          "cpu_us_per_instance": round(1e6 * summary_cpu[0] / n_in, 2)},
            "readers": {"where": "reader processes beside the driver (a plain results JSON from 512 MB on; "
                                 "bpr_core.results_parallel)", "processes": _readers(opts),
                        "cpu_s": round(readers_cpu, 3), "cpu_us_per_instance": round(1e6 * readers_cpu / n_in, 2)},
            # the two parts of the driver's cost: per image (the index) and per instance (everything else)
            "index_cpu_us_per_image": round(1e6 * phases["index"]["cpu_s"] / max(1, len(indexed[1])), 2),
            "other_cpu_us_per_instance": round(1e6 * (cpu - phases["index"]["cpu_s"]) / n_in, 2),
            "base_rss_mb": round(base_rss, 1), "peak_rss_mb": round(peak, 1),
            "memory_bytes_per_instance": round((peak - base_rss) * 2**20 / n_in, 1),
            # of the peak, the object store's pages the puts wrote (mapped in, not the driver's heap),
            # and the input bytes put (held in the object store until the flow reads them)
            "peak_shmem_mb": round(shmem[0], 1), "put_bytes_per_instance": round(put_bytes[0] / n_in, 1),
            "heap_bytes_per_instance": round((peak - shmem[0] - base_rss) * 2**20 / n_in, 1)}


def _readers(opts) -> int:
    """How many reader processes read the results JSON (0: read in the driver process)."""
    from bpr_core import results_parallel
    from pipeline import storage

    loc, workers = storage.resolve(opts.coarse), results_parallel.default_workers()
    if not loc.path.lower().endswith(".json") or workers < 2:
        return 0
    return workers if results_parallel.plan(results_parallel.FileOpener(loc.fs, loc.path)) else 0


def memory_split(points: list[dict], same_images: dict) -> dict:
    """The driver's own memory growth (peak RSS less the object store's pages, over start-up) per
    instance at a fixed image count, and per image at a fixed instance count."""
    by_size = sorted(points, key=lambda p: p["instances"])
    small, large = by_size[0], by_size[-1]

    def heap(p):
        return (p["peak_rss_mb"] - p["peak_shmem_mb"] - p["base_rss_mb"]) * 2**20

    return {"images_fixed_at": same_images["images"],
            "instances": [small["instances"], same_images["instances"]],
            "heap_bytes_per_instance_at_fixed_images":
                round((heap(same_images) - heap(small)) / max(1, same_images["instances"] - small["instances"]), 1),
            "instances_fixed_at": large["instances"], "images": [same_images["images"], large["images"]],
            "heap_bytes_per_image_at_fixed_instances":
                round((heap(large) - heap(same_images)) / max(1, large["images"] - same_images["images"]), 1),
            # what the driver holds once the flow is planned, at the two instance counts on the same
            # images (Python objects from sys.getallocatedblocks, Arrow buffers): equal when it
            # holds nothing per instance
            "held_after_plan": [small["held_after_plan"], same_images["held_after_plan"]],
            "held_after_plan_per_instance": {
                k: round((same_images["held_after_plan"][k] - small["held_after_plan"][k])
                         / max(1, same_images["instances"] - small["instances"]), 4) for k in small["held_after_plan"]},
            "same_images_point": same_images}


def project(points: list[dict], target: int = 20_000_000) -> dict:
    """Linear in the instances from the two sizes: CPU per instance from the larger run; memory as
    a fixed part plus a per-instance slope (0 when the driver holds no per-instance state)."""
    by_size = sorted(points, key=lambda p: p["instances"])
    a, b = by_size[0], by_size[-1]
    slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / max(1, b["instances"] - a["instances"])  # MB per instance
    heap = ((b["peak_rss_mb"] - b["peak_shmem_mb"]) - (a["peak_rss_mb"] - a["peak_shmem_mb"])) / max(1, b["instances"] - a["instances"])
    return {"instances": target, "cpu_minutes": round(b["cpu_us_per_instance"] * target / 1e6 / 60, 1),
            "peak_rss_gb": round((b["peak_rss_mb"] + slope * (target - b["instances"])) / 1024, 2),
            "memory_growth_bytes_per_instance": round(slope * 2**20, 1),
            # the growth less the object store's pages mapped in (the driver's own memory), and the
            # input the puts hold in the object store (spilled to disk beyond its capacity)
            "heap_growth_bytes_per_instance": round(heap * 2**20, 1),
            "object_store_gb": round(b["put_bytes_per_instance"] * target / 2**30, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, nargs="+", default=[500_000, 2_000_000])
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS),
                    help="input formats to measure (default: parquet json)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size in this process
    ap.add_argument("--format", default="json", help=argparse.SUPPRESS)  # internal, with --one
    ap.add_argument("--per-image", type=int, default=4, help=argparse.SUPPRESS)  # internal, with --one
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bpr-driver-"))
    if args.one:
        d = write_inputs(work, args.one, args.format, args.per_image)
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
        print(json.dumps(measure(d, run_dir, args.format)))
        return 0
    by_format = {}
    sizes = sorted(args.instances)
    # the extra run: the largest size's instances on the smallest size's images
    per_image_same = 4 * sizes[-1] // sizes[0] if len(sizes) > 1 else 0
    for fmt in args.formats:
        points = []

        def one(n, per_image=4):
            write_inputs(work, n, fmt, per_image)  # outside the measured process
            res = subprocess.run([sys.executable, "-m", "bench.driver", "--one", str(n), "--format", fmt, "--work", str(work),
                                  "--per-image", str(per_image)], check=True, capture_output=True, text=True)
            return json.loads(res.stdout.strip().splitlines()[-1])

        for n in sizes:
            points.append(one(n))
            p = points[-1]
            print(f"{fmt:>8} {n:>10,} instances: driver CPU {p['cpu_s']:.1f} s ({p['cpu_us_per_instance']:.1f} us/instance: "
                  + ", ".join(f"{k} {v['cpu_s']:.1f} s" for k, v in p["phases"].items())
                  + f"), peak RSS {p['peak_rss_mb']:.0f} MB ({p['memory_bytes_per_instance']:.0f} B/instance over start-up); "
                  f"= {p['index_cpu_us_per_image']:.1f} us per image + {p['other_cpu_us_per_instance']:.2f} us per instance; "
                  f"off the driver: listing {p['listing']['cpu_s']:.1f} s ({p['listing']['cpu_us_per_image']:.1f} us per image), "
                  f"shard summaries {p['summaries']['cpu_s']:.1f} s ({p['summaries']['cpu_us_per_instance']:.2f} us per instance), "
                  f"JSON readers {p['readers']['cpu_s']:.1f} s ({p['readers']['cpu_us_per_instance']:.2f} us per instance, "
                  f"{p['readers']['processes']} processes)")
        by_format[fmt] = {"points": points, "projection_20m": project(points)}
        if per_image_same:
            split = by_format[fmt]["memory_split"] = memory_split(points, one(sizes[-1], per_image_same))
            print(f"{fmt:>8} driver heap growth: {split['heap_bytes_per_instance_at_fixed_images']:.1f} B per instance "
                  f"({split['instances'][0]:,} -> {split['instances'][1]:,} instances on {split['images_fixed_at']:,} images), "
                  f"{split['heap_bytes_per_image_at_fixed_instances']:.1f} B per image ({split['images'][0]:,} -> "
                  f"{split['images'][1]:,} images, {split['instances_fixed_at']:,} instances); held after the plan, per instance "
                  f"on the same images: {split['held_after_plan_per_instance']}")
        pr = by_format[fmt]["projection_20m"]
        print(f"{fmt:>8} projected to 20M instances: {pr['cpu_minutes']} CPU-minutes on the driver, peak RSS {pr['peak_rss_gb']} GB "
              f"(growth {pr['memory_growth_bytes_per_instance']:.0f} B/instance, of which the driver's own "
              f"{pr['heap_growth_bytes_per_instance']:.0f}; the rest is object store pages), "
              f"{pr['object_store_gb']} GB of input in the object store")
    res = {**by_format[args.formats[0]], "by_format": by_format}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
