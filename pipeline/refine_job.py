"""The refinement job: inputs -> shards -> one Ray Data flow -> committed parts -> outputs.

Layout under OUT (local path or s3://):
    parts/shard-NNNNN/part-*.parquet   refined rows (every status), written by the workers
    _commits/shard-NNNNN.json          commit marker: the shard's key; written last
    refined.json                       COCO results JSON (every input detection that has a mask)
    quarantine.parquet                 instances that could not be processed, with the reason
    manifest.json                      inputs, model, config hash, counts, invariant, timings

The concerns live in their own modules: options (`options`), reading and validating the inputs
(`ingest`), the Ray Data graph (`graph`, stages in `stages`), commit and resume (`commit`), and the
outputs (`outputs`). This module runs them in order under a lease on OUT.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

from bpr_core.formats import JobFailed
from bpr_core.refiner import make_patch_refiner

from . import graph, outputs, storage
from .commit import ImageStats, ShardLedger, model_identity, shard_key
from .console import Progress
from .ingest import ShardSpill, check_inputs, check_model, prepare_shards
from .lease import Lease
from .options import RefineOptions
from .outputs import assemble, read_parts, reason_kind

__all__ = ["RefineOptions", "run", "prepare_shards", "check_inputs", "check_model", "model_identity", "shard_key",
           "ImageStats", "ShardSpill", "reason_kind", "read_parts"]


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(opts: RefineOptions, prepared: tuple | None = None, started: float | None = None) -> dict:
    """Run the job. `prepared` is `prepare_shards(opts)` done by the caller (the CLI reads and
    validates the whole input before Ray starts, so a malformed file fails first); `run` owns and
    removes its spill files either way."""
    t0 = started or time.time()
    try:
        patch_refiner, cfg, card = make_patch_refiner(opts.method, storage.local_file(opts.checkpoint), "cpu", opts.config)
        del patch_refiner
        model_id = model_identity(opts.method, storage.local_file(opts.checkpoint), card)
        out = storage.resolve(opts.out)
        storage.makedirs(out)
        shards, prep_quarantine, n_in = prepared or prepare_shards(opts)
    except BaseException:
        if prepared:
            prepared[0].close()
        raise
    lease = Lease(out, uuid.uuid4().hex, opts.lease_seconds)
    try:
        ok, holder = lease.acquire()
        if not ok:
            raise JobFailed(f"another run is writing to {out.uri} ({Lease.describe(holder)}); wait for it to finish, "
                            "or give another --out")
        lease.start_heartbeat()
        # Readers see "in_progress" until the outputs are complete: the previous run's "ok" manifest
        # never sits beside this run's partial refined.json.
        storage.write_bytes_atomic(out.join("manifest.json"), json.dumps(
            {"status": "in_progress", "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "inputs": {"images": opts.images, "coarse": opts.coarse, "image_info": opts.image_info}, "model": model_id},
            indent=2).encode())
        return _run(opts, out, shards, prep_quarantine, n_in, cfg, card, model_id, t0, lease)
    finally:
        lease.release()
        shards.close()


def _run(opts, out, shards, prep_quarantine, n_in, cfg, card, model_id, t0, lease=None) -> dict:
    import ray

    device, num_gpus = graph.resources(opts)
    pools = graph.plan_pools(opts, device)
    ledger = ShardLedger(out, opts.max_unreadable_share, lease)
    with_source = len(shards.sources) > 1  # refined.json entries then name their source file
    policy = opts.read_policy() + f";with_source={int(with_source)}"
    keys, blocks, pending, skipped = [], [], [], 0
    done_images = done_instances = 0
    # Keys first (a shard's rows are read from the spill one shard at a time): committed shards are
    # skipped, the others' rows go to the object store as blocks of whole images. The block size
    # depends on how many shards are pending (`graph.images_per_put`), so the first pending shards
    # are held until there are enough of them for whole-shard blocks, or until the last shard.
    held: list[tuple[int, object]] = []
    per_put = 0

    def put(held: list) -> None:
        for i, table in held:
            blocks.extend(ray.put(b) for b in graph.input_blocks(table, i, per_put))
        held.clear()

    for i in range(len(shards)):
        table = shards.table(i)
        key = shard_key(table, model_id, cfg.config_hash(), policy)
        keys.append(key)
        if ledger.is_done(i, key):
            skipped += 1
            done_images += shards.images[i]
            done_instances += table.num_rows
            continue
        ledger.start(i, key, table.num_rows, shards.images[i])
        pending.append(i)
        held.append((i, table))
        if not per_put and len(held) >= 4 * pools.extract:
            per_put = graph.images_per_put(opts, len(held), pools.extract)
        if per_put:
            put(held)
    per_put = per_put or graph.images_per_put(opts, len(held), pools.extract)
    put(held)
    total_images = sum(shards.images)
    _progress(f"bpr refine: {total_images:,} images, {n_in:,} instances ({len(prep_quarantine):,} quarantined on reading), "
              f"{len(shards)} shards of up to {opts.shard_size} images ({skipped} already done); refiner {card.get('name')} "
              f"({opts.method}) on {device}, up to {pools.refine[1]} refinement and {pools.extract} extraction actors, "
              f"{len(blocks)} input blocks of up to {per_put} images; "
              f"config {cfg.config_hash()}")
    progress = Progress(total_images, n_in, interval=opts.progress_interval)
    progress.add(done_images, done_instances + len(prep_quarantine), 0, already_done=True,
                 note=f"{skipped} shards already done" if skipped else "", emit=bool(skipped))
    timings, stats_text, actors = [], "", set()
    flow_started = time.time()

    def commit(i: int) -> None:
        entry = ledger.commit(i)
        entry["seconds"] = round(time.time() - flow_started, 3)  # since the flow started (shards overlap)
        timings.append(entry)
        progress.add(shards.images[i], 0, 0, note=f"{ledger.name(i)} committed ({len(timings)}/{len(pending)})")

    with progress:
        for i in [i for i in pending if ledger.expected[i] == 0]:  # nothing to run: commit at once
            commit(i)
        if blocks:
            with graph.memory_budget(pools.object_store_bytes):
                ds = graph.build(opts, blocks, cfg, card, device, num_gpus, out, pools, with_source)
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                    for shard, n, patches, failed, names in zip(batch["shard"], batch["instances"], batch["patches"],
                                                                batch["failed_images"], batch["actors"]):
                        shard = int(shard)
                        actors.update(json.loads(names))
                        progress.add(0, int(n), int(patches), emit=False)
                        if ledger.receive(shard, int(n), int(patches), json.loads(failed)):
                            commit(shard)
            try:
                stats_text = ds.stats()
            except Exception:  # stats are informative only
                stats_text = ""
        committed = {t["shard"] for t in timings}
        unfinished = [ledger.name(i) for i in pending if i not in committed]
        if unfinished:
            raise RuntimeError(f"the flow ended with shards not complete: {', '.join(unfinished[:5])}; not committing them")
    summaries = write_json = None
    if n_in >= outputs.PARALLEL_ASSEMBLY_INSTANCES:
        summaries, write_json = outputs.ray_summaries(out.uri, len(shards), with_source), outputs.ray_write_json
    manifest = assemble(opts, out, shards, keys, prep_quarantine, n_in, cfg, card, summaries, write_json)
    if opts.visualize or opts.visualize_ids:
        _visualize(opts, out, shards, cfg, manifest)
    manifest["timings"] = {"total_seconds": round(time.time() - t0, 3), "shards_run": len(timings), "shards_skipped": skipped,
                           "per_shard": sorted(timings, key=lambda t: t["shard"]),
                           # actor processes that served this run, per stage: started once per job, not per
                           # shard (a restarted actor counts again)
                           "actors": {stage: sum(1 for a in actors if a.startswith(stage + ":")) for stage in ("extract", "refine")}}
    manifest["device"] = device
    manifest["pools"] = {**pools.manifest(), "input_blocks": len(blocks), "images_per_put": per_put}  # as resolved for this cluster
    manifest["status"] = "complete"
    storage.write_bytes_atomic(out.join("manifest.json"), json.dumps(manifest, indent=2).encode())
    if stats_text:
        manifest["_stats"] = stats_text
    return manifest


def _visualize(opts, out, shards, cfg, manifest) -> None:
    import pyarrow.compute as pc

    from .stages import ImageReader
    from .visualize import write_visualizations

    def refined_for(i: int) -> dict:
        t = read_parts(out.join("parts", f"shard-{i:05d}")).filter(pc.equal(pc.field("status"), "refined"))
        return {(r["source_file"], r["image_id"], r["instance_id"]): r["rle_counts"]
                for r in t.select(["source_file", "image_id", "instance_id", "rle_counts"]).to_pylist()}

    reader = ImageReader(opts.images, opts.exif, opts.max_image_pixels, opts.allow_absolute_paths)
    manifest["outputs"]["visualize"] = write_visualizations(opts.visualize, shards, refined_for, opts.images, out, cfg,
                                                            reader, image_ids=opts.visualize_ids)
