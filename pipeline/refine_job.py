"""The refinement job: inputs -> shards -> Ray Data flow per shard -> committed parts -> outputs.

Layout under OUT (local path or s3://):
    parts/shard-NNNNN/*.parquet        refined rows of a committed shard (every status)
    _commits/shard-NNNNN.json          commit marker: the shard's key; written last
    refined.json                       COCO results JSON (refined + passed-through instances)
    quarantine.parquet                 instances that could not be processed, with the reason
    manifest.json                      inputs, model, config hash, counts, invariant, timings

Inputs are streamed (a results JSON element by element, Parquet batch by batch) into per-shard
spill files in a local temporary directory, so the driver never holds the whole input; a shard
holds N images in image-id order. A shard's key hashes its instance rows, the model identity and the config hash, so re-running the
same command skips committed shards, and a run over inputs that gained new detector outputs redoes
only the shards whose content changed. The parts dataset holds every input instance exactly once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sys
import time
import uuid
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bpr_core import BPRConfig
from bpr_core.formats import (INSTANCE_COLUMNS, REFINED_SCHEMA, ImageIndex, InputError, JobFailed, RecordError, invalid_row,
                              iter_results_json, read_image_index, row_to_result, table_row)
from bpr_core.imageio import DEFAULT_MAX_PIXELS, EXIF_POLICIES
from bpr_core.refiner import make_patch_refiner

from . import storage
from .console import Progress
from .lease import Lease
from .stages import ExtractPatches, RefinePatches, is_read_failure, reassemble_image

log = logging.getLogger(__name__)

WORK_SCHEMA = pa.schema(list(pa.schema([(n, REFINED_SCHEMA.field(n).type) for n in INSTANCE_COLUMNS]))
                        + [("source_file", pa.string()), ("position", pa.int64()), ("detector_fields", pa.string()),
                           ("file_name", pa.string())])


@dataclass
class RefineOptions:
    images: str
    coarse: str
    image_info: str
    out: str
    method: str = "network"
    checkpoint: str | None = None
    # A dict holds explicit overrides of the checkpoint's config (empty: the checkpoint's geometry and
    # calibrated do-no-harm rules as they are); a full BPRConfig replaces all but the geometry.
    config: BPRConfig | dict = field(default_factory=dict)
    shard_size: int = 1000  # measured: 1,600 images took 42 s in shards of 200, 30 s in shards of 1,000 (README)
    batch_size: int = 64
    refine_actors: int = 1
    extract_actors: int = 1
    # Logical CPUs reserved per refinement actor (its torch threads: max(1, int(refine_cpus))).
    # 0.5 by default: measured on 2 cores, a whole CPU held by the actor kept the shard's shuffle
    # tasks (1 CPU each) waiting ~1 s for the actor pool's teardown after the last batch.
    refine_cpus: float = 0.5
    reassemble_partitions: int = 1
    images_per_block: int = 8
    batches_per_block: int = 4
    shards_in_flight: int = 2
    device: str = "auto"  # auto: GPU actors when the cluster has GPUs
    fail_on_batch: int | None = None  # fault injection (tests)
    visualize: int = 0  # overlay PNGs of this many most-changed images, to OUT/visualize/
    visualize_ids: list[int] | None = None  # or of these images
    # A shard fails the job (not committed) when more than this share of its images cannot be read
    # (and at least 3, or all of them): a systemic problem such as no image access from the workers.
    max_unreadable_share: float = 0.25
    lease_seconds: float = 600.0  # the lease on OUT (pipeline.lease), renewed by a heartbeat
    progress_interval: float = 30.0  # seconds between progress lines while a shard runs (0: only at commits)
    # Input policies (README, reliability): how images are decoded and which paths may be read.
    exif: str = "stored"  # stored pixels, or "apply" the EXIF orientation (bpr_core.imageio)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # images and masks above it are quarantined; 0 = no limit
    allow_absolute_paths: bool = False  # index file_names must be relative to --images unless set

    def validate(self) -> None:
        """Sizes and counts must be positive: one clear error instead of a ZeroDivisionError."""
        for name in ("shard_size", "batch_size", "refine_actors", "extract_actors", "reassemble_partitions",
                     "images_per_block", "batches_per_block", "shards_in_flight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not isinstance(self.refine_cpus, (int, float)) or not self.refine_cpus > 0:
            raise InputError(f"refine-cpus must be > 0, got {self.refine_cpus!r}")
        if not isinstance(self.visualize, int) or self.visualize < 0:
            raise InputError(f"visualize must be >= 0, got {self.visualize!r}")
        if not isinstance(self.max_unreadable_share, (int, float)) or not 0 <= self.max_unreadable_share <= 1:
            raise InputError(f"max-unreadable-share must be in [0, 1], got {self.max_unreadable_share!r}")
        if not isinstance(self.max_image_pixels, int) or self.max_image_pixels < 0:
            raise InputError(f"max-image-pixels must be >= 0 (0 = no limit), got {self.max_image_pixels!r}")
        if self.exif not in EXIF_POLICIES:
            raise InputError(f"exif must be one of {', '.join(EXIF_POLICIES)}, got {self.exif!r}")

    def read_policy(self) -> str:
        """The input policies that change which instances are refined and how (part of shard keys)."""
        return f"exif={self.exif};max_pixels={self.max_image_pixels};absolute={int(self.allow_absolute_paths)}"


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load_index(loc: storage.Location) -> ImageIndex:
    """The image index, read through the filesystem (object stores: a cached local copy)."""
    local = storage.local_file(loc.uri, what="image index")
    try:
        return read_image_index(local)
    except InputError as e:  # name the user's input, not the local copy
        raise InputError(str(e).replace(str(local), loc.uri)) from None


def check_inputs(opts: RefineOptions) -> None:
    """Fail fast, before Ray starts or any work is done, on bad options, missing or unreadable
    inputs, an output location that cannot be written, and a checkpoint that cannot be used."""
    opts.validate()
    storage.check_readable(opts.image_info, "image index")
    storage.check_readable(opts.coarse, "coarse results")
    storage.check_readable(opts.images, "images")
    storage.check_writable(opts.out, "output location")
    check_model(opts)


def check_model(opts: RefineOptions) -> None:
    """Load the checkpoint and resolve the config once, so a missing, foreign or conflicting
    checkpoint (e.g. --patch-size against the checkpoint's) is one clear error before Ray starts."""
    from bpr_core.formats import InputError

    local = storage.local_file(opts.checkpoint)
    try:
        make_patch_refiner(opts.method, local, "cpu", opts.config)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e).replace(str(local), str(opts.checkpoint)) if local else str(e)) from e


class ShardSpill:
    """Instance rows split by shard into JSON-lines files in a local temporary directory.

    Rows are buffered and appended per shard; at most `buffer_rows` are held at once. Reading a
    shard loads just that shard, sorted by (image_id, instance_id).
    """

    def __init__(self, n_shards: int, buffer_rows: int = 50_000):
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="bpr-refine-")
        self.counts = [0] * n_shards
        self.images = [0] * n_shards  # images with at least one instance, per shard (progress)
        self._buf: dict[int, list[str]] = defaultdict(list)
        self._buffered, self.buffer_rows = 0, buffer_rows

    def add(self, shard: int, row: dict) -> None:
        self._buf[shard].append(json.dumps(row))
        self.counts[shard] += 1
        self._buffered += 1
        if self._buffered >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        for shard, lines in self._buf.items():
            with open(os.path.join(self.dir, f"{shard}.jsonl"), "a") as f:
                f.write("\n".join(lines) + "\n")
        self._buf.clear()
        self._buffered = 0

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, shard: int) -> list[dict]:
        path = os.path.join(self.dir, f"{shard}.jsonl")
        if not self.counts[shard]:
            return []
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        return sorted(rows, key=lambda r: (r["image_id"], r["instance_id"]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


INT_TYPES = (pa.types.is_integer, pa.types.is_floating)  # floats are checked per row for exact integers
COLUMN_TYPES = {"image_id": INT_TYPES, "instance_id": INT_TYPES, "category_id": INT_TYPES, "rle_h": INT_TYPES,
                "rle_w": INT_TYPES, "score": INT_TYPES, "rle_counts": (pa.types.is_string, pa.types.is_large_string)}


def _table_files(loc: storage.Location) -> list[storage.Location]:
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        files = storage.list_files(loc, ".parquet")
        if not files:
            raise InputError(f"instance table {loc.uri} is a directory without .parquet files")
        return files
    return [loc]


def _iter_table_file(loc: storage.Location) -> Iterator[dict]:
    """Rows of one Parquet file, validated one by one. A file whose schema cannot hold instances
    (a missing column, a string image_id column) is malformed and fails the job before any work."""
    try:
        pf = pq.ParquetFile(loc.fs.open_input_file(loc.path))
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"cannot read instance table {loc.uri}: {e}") from None
    schema = pf.schema_arrow
    missing = sorted(set(INSTANCE_COLUMNS) - set(schema.names))
    if missing:
        raise InputError(f"instance table {loc.uri} lacks columns {missing}")
    for col, checks in COLUMN_TYPES.items():
        t = schema.field(col).type
        if not any(c(t) for c in checks):
            want = "a string" if col == "rle_counts" else "an integer or float"
            raise InputError(f"instance table {loc.uri}: column {col} has type {t}; expected {want} column")
    position = 0
    for batch in pf.iter_batches(columns=INSTANCE_COLUMNS, batch_size=8192):
        for raw in batch.to_pylist():
            try:
                row = table_row(raw)
            except RecordError as e:
                row = invalid_row(position, f"{loc.uri} row {position}: {e}", raw)
            row["position"] = position
            row.setdefault("detector_fields", None)
            position += 1
            yield row


def _iter_instances(coarse_loc: storage.Location, index: ImageIndex, sources: list[str]) -> "Iterator[dict]":
    """Instance rows from a results JSON (plain or gzip) or a Parquet file or dataset, each with its
    source_file and position; a bad record comes as a row with an `invalid` reason."""
    if coarse_loc.path.lower().endswith((".json", ".json.gz")):
        sources.append(coarse_loc.uri)
        with coarse_loc.fs.open_input_stream(coarse_loc.path, compression=None) as raw:  # streamed, local or object store
            for position, row in enumerate(iter_results_json(raw, index.records, name=coarse_loc.uri, strict=False)):
                row["source_file"], row["position"] = coarse_loc.uri, position
                yield row
        return
    for loc in _table_files(coarse_loc):
        sources.append(loc.uri)
        for row in _iter_table_file(loc):
            row["source_file"] = loc.uri
            yield row


def prepare_shards(opts: RefineOptions) -> tuple[ShardSpill, list[dict], int]:
    """Stream the instances, validate them record by record against the index, and spill them by
    shard. One rule for every bad record: quarantined with a reason naming file, position and field;
    the job goes on. Only a malformed file (or option) stops it, before any work.

    Returns (shards, quarantined rows, number of input instances); `shards.sources` lists the input files.
    """
    check_inputs(opts)
    index_loc, coarse_loc = storage.resolve(opts.image_info), storage.resolve(opts.coarse)
    index = _load_index(index_loc)
    for problem in index.unattributable[:5]:
        _progress(f"warning: {problem} (entry ignored)")
    ranks = {image_id: r for r, image_id in enumerate(sorted(index.records))}
    shards = ShardSpill((len(ranks) + opts.shard_size - 1) // opts.shard_size)
    shards.sources = []
    quarantined, seen, n_in, images_seen = [], set(), 0, set()
    limit = opts.max_image_pixels
    for row in _iter_instances(coarse_loc, index, shards.sources):
        n_in += 1
        reason = row.pop("invalid", None)
        if reason is None:
            image_id = row["image_id"]
            key = (row["source_file"], image_id, row["instance_id"])
            if image_id in index.invalid:
                reason = f"unusable image index entry: {index.invalid[image_id]}"
            elif image_id not in ranks:
                reason = f"image_id {image_id} is not in the image index {opts.image_info}"
            elif key in seen:
                reason = f"duplicate instance_id {row['instance_id']} for image_id {image_id} in {row['source_file']}"
            elif limit and row["rle_h"] * row["rle_w"] > limit:
                reason = (f"mask RLE is {row['rle_h']}x{row['rle_w']} ({row['rle_h'] * row['rle_w'] / 1e6:.1f} MP), "
                          f"over the pixel limit of {limit / 1e6:g} MP (--max-image-pixels)")
            seen.add(key)
        if reason:
            quarantined.append({**row, "status": "quarantined", "reason": reason})
            continue
        row["file_name"] = index.records[row["image_id"]].file_name
        shard = ranks[row["image_id"]] // opts.shard_size
        if row["image_id"] not in images_seen:
            images_seen.add(row["image_id"])
            shards.images[shard] += 1
        shards.add(shard, row)
    shards.flush()
    return shards, quarantined, n_in


def shard_key(rows: list[dict], model_id: str, config_hash: str, read_policy: str = "",
              image_stats: "ImageStats | None" = None) -> str:
    """What a shard's outputs depend on: its instance rows, the model (with its checkpoint's hash),
    the config, the input policies, and each image's identity (size and modification time), so a
    replaced image is refined again."""
    h = hashlib.sha256(f"{model_id}|{config_hash}|{read_policy}|".encode())
    for r in rows:
        h.update(json.dumps([r[k] for k in INSTANCE_COLUMNS] + [r["source_file"], r["position"], r.get("detector_fields"),
                                                                r["file_name"]], default=str).encode())
    if image_stats is not None:
        for name in sorted({r["file_name"] for r in rows}):
            h.update(f"{name}={image_stats.get(name, 'missing')}|".encode())
    return h.hexdigest()[:16]


class ImageStats:
    """Identity ("size:mtime_ns") of image file_names, from one recursive listing of the images
    root (on S3, LIST calls of 1,000 keys, never a request per image); names outside the root
    (--allow-absolute-paths) are looked up one by one. A missing file has none."""

    def __init__(self, images_uri: str):
        root = storage.resolve(images_uri)
        self.listed: dict[str, str] = {}
        try:
            infos = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
        except OSError:
            infos = []
        prefix = root.path.rstrip("/") + "/"
        for info in infos:
            if info.type == pafs.FileType.File and info.path.startswith(prefix):
                self.listed[info.path[len(prefix):]] = f"{info.size}:{info.mtime_ns}"

    def get(self, name: str, default: str = "missing") -> str:
        import posixpath

        rel = posixpath.normpath(name)
        if rel in self.listed:
            return self.listed[rel]
        if "://" in name or name.startswith("/"):
            try:
                loc = storage.resolve(name)
                info = loc.fs.get_file_info(loc.path)
                if info.type == pafs.FileType.File:
                    return f"{info.size}:{info.mtime_ns}"
            except (OSError, InputError):
                pass
        return default


def _resources(opts: RefineOptions) -> tuple[str, float]:
    """Decide the refine actors' device in the driver: a num_gpus request on a CPU-only cluster
    would wait forever."""
    import ray

    if opts.device != "auto":
        return opts.device, (1.0 if opts.device.startswith("cuda") else 0.0)
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return "cuda", 1.0
    return "cpu", 0.0


def run_shard(opts: RefineOptions, rows: list[dict], cfg: BPRConfig, card: dict, device: str, num_gpus: float,
              out_dir: storage.Location):
    """Run the Ray Data flow over one shard and write its parts. Returns the stats text."""
    import ray
    from ray.data import ActorPoolStrategy

    # Blocks of a few images each (an image's instances stay together), so extraction streams into
    # refinement instead of handing over the whole shard as one block (measured: one block per
    # shard serialised the two stages).
    blocks, current, images = [], [], set()
    for r in rows:
        if r["image_id"] not in images and len(images) >= opts.images_per_block:
            blocks.append(current)
            current, images = [], set()
        images.add(r["image_id"])
        current.append({k: r[k] for k in WORK_SCHEMA.names})
        current[-1]["detector_fields"] = current[-1]["detector_fields"] or ""  # one string type in every block
    blocks.append(current)
    ds = ray.data.from_arrow([pa.Table.from_pylist(b, schema=WORK_SCHEMA) for b in blocks])
    ds = ds.map_batches(ExtractPatches, fn_constructor_args=(opts.images, cfg.to_dict(), opts.exif, opts.max_image_pixels,
                                                             opts.allow_absolute_paths), batch_size=None,
                        compute=ActorPoolStrategy(size=opts.extract_actors), num_cpus=0.5, batch_format="numpy")
    ds = ds.map_batches(RefinePatches,
                        fn_constructor_args=(opts.method, opts.checkpoint, device, cfg.to_dict(), max(1, int(opts.refine_cpus)), opts.fail_on_batch,
                                             opts.batch_size),
                        batch_size=opts.batch_size * opts.batches_per_block, compute=ActorPoolStrategy(size=opts.refine_actors),
                        num_cpus=opts.refine_cpus, num_gpus=num_gpus, batch_format="numpy")
    # The design card's groupby stage, keyed by image. One partition per shard by default: measured
    # on 2 cores, 2 partitions were never faster (400-image shard: 9.9 s against 9.5 s).
    ds = ds.groupby("image_id", num_partitions=opts.reassemble_partitions).map_groups(
        reassemble_image, fn_args=(cfg.to_dict(), str(card.get("name")), str(card.get("version", "")), cfg.config_hash()),
        batch_format="numpy", num_cpus=0.5)
    ds.write_parquet(out_dir.uri if not out_dir.is_s3 else out_dir.path, filesystem=out_dir.fs)
    try:
        return ds.stats()
    except Exception:  # stats are informative only
        return ""


def _done_future() -> Future:
    f: Future = Future()
    f.set_result("")
    return f


def _read_parts(loc: storage.Location) -> pa.Table:
    files = storage.list_files(loc, ".parquet")
    tables = [pq.read_table(f.path, filesystem=f.fs) for f in files]
    if not tables:
        return REFINED_SCHEMA.empty_table()
    return pa.concat_tables([t.select(REFINED_SCHEMA.names).cast(REFINED_SCHEMA) for t in tables])


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
        return _run_shards(opts, out, shards, prep_quarantine, n_in, cfg, card, model_id, t0, lease)
    finally:
        lease.release()
        shards.close()


def model_identity(method: str, checkpoint: str | None, card: dict) -> str:
    """The model as part of every shard key: card name and version, and for a network the content
    hash of its checkpoint, so another model that carries the same card never reuses old results."""
    ident = f"{card.get('name')}@{card.get('version', '')}"
    if method == "network":
        from bpr_core.refiner import DEFAULT_WEIGHTS

        ident += "#" + storage.sha256_hex(storage.resolve(str(checkpoint or DEFAULT_WEIGHTS)))[:16]
    return ident


def _run_shards(opts, out, shards, prep_quarantine, n_in, cfg, card, model_id, t0, lease=None) -> dict:
    device, num_gpus = _resources(opts)
    _progress(f"bpr refine: {sum(shards.images):,} images, {n_in:,} instances ({len(prep_quarantine):,} quarantined on reading), "
              f"{len(shards)} shards of up to {opts.shard_size} images; refiner {card.get('name')} ({opts.method}) on {device}; "
              f"config {cfg.config_hash()}")
    progress = Progress(sum(shards.images), n_in, interval=opts.progress_interval)
    progress.add(0, len(prep_quarantine), 0, already_done=True)

    timings, stats_text, done, skipped = [], "", 0, 0
    keys = []

    def commit(i, name, rows, key, marker, parts, ts, fut):
        nonlocal stats_text, done
        stats_text = fut.result() or stats_text
        if lease is not None and lease.lost:
            raise JobFailed(f"lost the lease on {out.uri} to another run; {name} not committed")
        table = _read_parts(parts)
        if table.num_rows != len(rows):
            raise RuntimeError(f"{name}: {len(rows)} instances in, {table.num_rows} out; not committing")
        n_patches = int(pc.sum(table["num_patches"]).as_py() or 0)
        failed = [r for r in table.filter(pc.equal(pc.field("status"), "quarantined")).select(["image_id", "reason"]).to_pylist()
                  if is_read_failure(r["reason"])]
        bad_images = len({r["image_id"] for r in failed})
        n_images = shards.images[i]
        if bad_images and bad_images > opts.max_unreadable_share * n_images and (bad_images >= 3 or bad_images == n_images):
            first = failed[0]["reason"]
            raise JobFailed(f"{name}: {bad_images} of {n_images} images could not be read (more than "
                            f"{opts.max_unreadable_share:.0%}, --max-unreadable-share): a systemic failure, e.g. no access "
                            f"to the images from the workers; not committing. First error: {first}")
        # A shard with read failures is committed (its outputs are complete, every instance
        # accounted for) but not "done": the next run redoes it, so restored images get refined.
        storage.write_bytes_atomic(marker, json.dumps({"key": key, "instances": len(rows), "patches": n_patches,
                                                       "read_failures": len(failed)}).encode())
        dt = time.time() - ts
        done += 1
        timings.append({"shard": i, "instances": len(rows), "patches": n_patches, "seconds": round(dt, 3)})
        progress.add(shards.images[i], len(rows), n_patches, note=f"{name} ({i + 1}/{len(shards)}) committed in {dt:.1f} s")

    # Shards overlap (shards_in_flight Ray Data flows at once, committed in order): a shard's
    # groupby is a barrier, and its shuffle, reassembly, write and the next shard's actor start-up
    # would otherwise leave the network idle (measured in the README's performance section).
    in_flight = max(1, opts.shards_in_flight)
    stats = ImageStats(opts.images)
    pending: deque = deque()
    with progress, ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="bpr-shard") as pool:
        try:
            for i in range(len(shards)):
                rows = shards[i]
                name = f"shard-{i:05d}"
                key = shard_key(rows, model_id, cfg.config_hash(), opts.read_policy(), stats)
                keys.append(key)
                marker = out.join("_commits", f"{name}.json")
                previous = json.loads(storage.read_bytes(marker)) if storage.exists(marker) else {}
                if previous.get("key") == key and not previous.get("read_failures"):
                    skipped += 1
                    progress.add(shards.images[i], len(rows), 0, already_done=True, note=f"{name} already done")
                    continue
                parts = out.join("parts", name)
                storage.delete(parts)  # a partial write of an interrupted run
                while len(pending) >= in_flight:
                    commit(*pending.popleft())
                fut = pool.submit(run_shard, opts, rows, cfg, card, device, num_gpus, parts) if rows else _done_future()
                pending.append((i, name, rows, key, marker, parts, time.time(), fut))
            while pending:
                commit(*pending.popleft())
        except BaseException:
            for p in pending:
                p[-1].cancel()
            raise
    manifest = assemble(opts, out, shards, keys, prep_quarantine, n_in, cfg, card)
    if opts.visualize or opts.visualize_ids:
        from .stages import ImageReader
        from .visualize import write_visualizations

        def refined_for(i: int) -> dict:
            t = _read_parts(out.join("parts", f"shard-{i:05d}")).filter(pc.equal(pc.field("status"), "refined"))
            return {(r["source_file"], r["image_id"], r["instance_id"]): r["rle_counts"]
                    for r in t.select(["source_file", "image_id", "instance_id", "rle_counts"]).to_pylist()}

        reader = ImageReader(opts.images, opts.exif, opts.max_image_pixels, opts.allow_absolute_paths)
        manifest["outputs"]["visualize"] = write_visualizations(opts.visualize, shards, refined_for, opts.images, out, cfg,
                                                                reader, image_ids=opts.visualize_ids)
    manifest["timings"] = {"total_seconds": round(time.time() - t0, 3), "shards_run": done, "shards_skipped": skipped,
                           "per_shard": timings}
    manifest["device"] = device
    manifest["status"] = "complete"
    storage.write_bytes_atomic(out.join("manifest.json"), json.dumps(manifest, indent=2).encode())
    if stats_text:
        manifest["_stats"] = stats_text
    return manifest


def reason_kind(reason: str) -> str:
    """A quarantine reason -> a short kind for the summary line and the manifest."""
    if is_read_failure(reason):
        return "image unreadable (retried by the next run)"
    for needle, kind in ((" resolves outside", "path outside the image root"), ("absolute path", "absolute path refused"),
                         ("symlink", "symlink leaving the image root"), ("pixel limit", "over the pixel limit"),
                         ("decompression-bomb", "over the pixel limit"), ("but the mask RLE is", "image/mask size mismatch"),
                         ("invalid RLE", "invalid RLE"), ("not in the image index", "image_id not in the index"),
                         ("unusable image index entry", "bad image index entry"), ("duplicate instance_id", "duplicate instance_id"),
                         ("cannot decode", "image undecodable"), ("not a recognised image", "image undecodable"),
                         ("unreadable header", "image undecodable")):
        if needle in reason:
            return kind
    if " entry " in reason or " row " in reason:
        return "invalid record"
    return "other"


def assemble(opts, out, shards, keys, prep_quarantine, n_in, cfg, card) -> dict:
    """Stream committed parts into refined.json and quarantine.parquet; check the invariant.

    refined.json holds every input detection that has a mask: refined, passed through, and
    quarantined ones too (with their coarse mask, `bpr_status` and `bpr_reason`), so downstream AP
    never drops because refinement failed. Only records without a readable mask (an invalid
    segmentation, a non-numeric id) are in quarantine.parquet alone."""
    counts = defaultdict(int)
    kinds: dict[str, int] = defaultdict(int)
    seen: set = set()
    with_source = len(getattr(shards, "sources", [])) > 1
    duplicates = read_failures = in_json = 0
    quarantine_rows = [{k: r.get(k) for k in REFINED_SCHEMA.names} for r in prep_quarantine]
    for r in quarantine_rows:
        r.update(coarse_area=-1, refined_area=-1, num_patches=0, model_name=str(card.get("name")),
                 model_version=str(card.get("version", "")), config_hash=cfg.config_hash())
    counts["quarantined"] += len(quarantine_rows)

    def representable(row) -> bool:
        return bool(row.get("rle_counts")) and row.get("rle_h") is not None and row.get("rle_w") is not None \
            and row.get("image_id") is not None and row.get("category_id") is not None and row.get("instance_id") is not None \
            and row.get("score") is not None

    with storage.AtomicWriter(out.join("refined.json")) as f:
        f.write("[")

        def emit(row) -> None:
            nonlocal in_json
            f.write(("," if in_json else "") + "\n" + json.dumps(row_to_result(row, with_source), separators=(",", ":")))
            in_json += 1

        for i in range(len(shards)):
            table = _read_parts(out.join("parts", f"shard-{i:05d}")).sort_by(
                [("image_id", "ascending"), ("instance_id", "ascending"), ("source_file", "ascending")])
            for row in table.to_pylist():
                k = (row["source_file"], row["image_id"], row["instance_id"])
                duplicates += k in seen
                seen.add(k)
                counts[row["status"]] += 1
                if row["status"] == "quarantined":
                    quarantine_rows.append(row)
                emit(row)
        for row in quarantine_rows[: len(prep_quarantine)]:  # stopped before sharding: pass those with a mask through
            row["status"] = "quarantined"
            if representable(row):
                emit(row)
        f.write("\n]\n")
    for row in quarantine_rows:
        kinds[reason_kind(row["reason"] or "")] += 1
        read_failures += is_read_failure(row["reason"])
    qt = pa.Table.from_pylist(quarantine_rows, schema=REFINED_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(qt, buf)
    storage.write_bytes_atomic(out.join("quarantine.parquet"), buf.getvalue())
    n_out = counts["refined"] + counts["passed_through"] + counts["quarantined"]
    invariant = {"instances_in": n_in, "instances_out": n_out, "duplicates": duplicates,
                 "ok": n_out == n_in and duplicates == 0}
    if not invariant["ok"]:
        log.error("invariant violated: %s", invariant)
    counts["read_failures"] = read_failures
    counts["in_refined_json"] = in_json
    return {
        "inputs": {"images": opts.images, "coarse": opts.coarse, "image_info": opts.image_info},
        "outputs": {"refined_json": out.join("refined.json").uri, "parts": out.join("parts").uri,
                    "quarantine": out.join("quarantine.parquet").uri},
        "model": {k: card[k] for k in card if isinstance(card[k], (str, int, float))},
        "method": opts.method,
        "config": cfg.to_dict(),
        "config_hash": cfg.config_hash(),
        "shards": [{"index": i, "key": k, "instances": c} for i, (c, k) in enumerate(zip(shards.counts, keys))],
        "counts": dict(counts, input=n_in),
        "quarantine_reasons": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "invariant": invariant,
        "options": {k: v for k, v in asdict(opts).items() if k in ("shard_size", "batch_size", "refine_actors", "extract_actors", "refine_cpus",
                                                                    "shards_in_flight")},
    }
