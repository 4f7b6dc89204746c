"""The Ray Data graph of the refinement job: one dataset over every pending shard.

    input blocks (whole images, shard by shard)
      -> ExtractPatches   autoscaling CPU actor pool, 1..N actors (N from the cluster's CPUs)
      -> RefinePatches    autoscaling: up to one actor per GPU, or per CPU (CPU fallback); or --refine-actors
      -> WriteParts       the grouping stage: paste, encode, write Parquet parts (CPU actors, up to one
                          per refinement actor)
      -> receipts         one small row per written part, consumed by the driver to commit shards

The actors start once per job, whatever the number of shards (a shard is only the unit of commit),
and no stage is a barrier: an instance's patches travel in its own row, so grouping needs no
shuffle.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bpr_core import BPRConfig

from . import storage
from .ingest import SPILL_SCHEMA
from .options import RefineOptions
from .stages import ExtractPatches, RefinePatches, WriteParts

# The input rows of the flow: the spill's, less the image identity (only the shard key needs it),
# with the repeated strings dictionary-encoded (a put into the object store copies every byte).
_DICT = pa.dictionary(pa.int32(), pa.string())
WORK_SCHEMA = pa.schema([pa.field(f.name, _DICT) if f.name in ("source_file", "file_name") else f
                         for f in SPILL_SCHEMA if f.name != "image_identity"]).append(pa.field("shard", pa.int64()))

EXTRACT_CPUS = 0.5  # per extraction actor: image decoding and cropping, one OpenCV thread
WRITE_CPUS = 0.25  # per grouping/writing actor: pasting and RLE encoding are light


def autoscaler_gpus(config_path: str | None = None) -> int:
    """GPUs the cluster's autoscaler can add: the node types of its config (`ray up` leaves it on the
    head as ~/ray_bootstrap_config.yaml; $BPR_AUTOSCALER_CONFIG overrides) that declare GPUs, times
    their max_workers. 0 when there is no such config (a local Ray, a fixed cluster)."""
    path = Path(config_path or os.environ.get("BPR_AUTOSCALER_CONFIG") or "~/ray_bootstrap_config.yaml").expanduser()
    if not path.is_file():
        return 0
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text()) or {}
        types = cfg.get("available_node_types") or {}
        return int(sum(float((t.get("resources") or {}).get("GPU", 0)) * int(t.get("max_workers", 0) or 0)
                       for t in types.values() if isinstance(t, dict)))
    except Exception:  # an unreadable config never stops a job: it only cannot promise GPUs
        return 0


def resources(opts: RefineOptions) -> tuple[str, float]:
    """The refinement actors' device, decided in the driver: a num_gpus request on a cluster that
    has no GPU and cannot add one would wait forever. auto = cuda when the cluster has GPUs now, or
    its autoscaler can add GPU nodes (the request then starts them); else cpu."""
    import ray

    if opts.device != "auto":
        return opts.device, (1.0 if opts.device.startswith("cuda") else 0.0)
    if ray.cluster_resources().get("GPU", 0) >= 1 or autoscaler_gpus() >= 1:
        return "cuda", 1.0
    return "cpu", 0.0


@dataclass(frozen=True)
class Pools:
    """The actor pools and object store budget of one run, resolved once from the options and the
    cluster (see `plan_pools`)."""

    refine: tuple[int, int]  # (min, max) refinement actors
    extract: int  # most extraction actors (the pool starts at one)
    write: int  # most grouping/writing actors (the pool starts at one)
    object_store_bytes: int

    def manifest(self) -> dict:
        return {"extract": [1, self.extract], "refine": list(self.refine)}


def plan_pools(opts: RefineOptions, device: str) -> Pools:
    """Resolve the pools for this cluster (one look at its resources and autoscaler config).

    Refinement: --refine-actors N is exactly N. 0 (auto): on GPUs an autoscaling pool of one actor
    per GPU the cluster has now or its autoscaler can add (each new actor's num_gpus=1 request makes
    the autoscaler start a GPU node); on CPUs an autoscaling pool of up to one single-threaded actor
    per CPU, since the network is most of the work (measured on 2 cores, 4N images: 2 actors 81 s,
    one 119 s); it grows from one, so a small input needs no second.

    Extraction: --extract-actors, or (0 = auto) as many as the cluster's CPUs hold beside the
    refinement actors (on a GPU cluster the network outruns one CPU's extraction many times over,
    so the pool may use every CPU; on CPUs the network needs its share). Ray Data grows the pool
    from one while extraction is the bottleneck.

    Writing: up to one grouping/writing actor per refinement actor (pasting and encoding an
    instance costs a fraction of its network time; an idle actor is ~250 MB of RSS for nothing).

    Object store: --object-store-mb, or (0 = auto) 256 MB per refinement actor, at least 512 MB: the
    patches queued ahead of the network are bounded instead of growing with the input (extraction
    is several times faster than the network on CPUs). On this 2-core box it made no measurable
    difference to peak RSS; what grew from N to 4N was the refinement actors' heap, fragmented by
    ever-changing network batch shapes until `bpr_core.flow.batch_bounds` fixed the set of shapes.
    """
    import ray

    res = ray.cluster_resources()
    cuda = device.startswith("cuda")
    if opts.refine_actors:
        refine = (opts.refine_actors, opts.refine_actors)
    elif cuda:
        refine = (1, max(1, int(res.get("GPU", 0)), autoscaler_gpus()))
    else:
        refine = (1, max(1, min(32, int(res.get("CPU", 1.0)))))
    if opts.extract_actors:
        extract = opts.extract_actors
    else:
        refine_cpus = 0.0 if cuda else refine[1] * opts.refine_cpus
        extract = max(1, min(64, int((res.get("CPU", 1.0) - refine_cpus - WRITE_CPUS) // EXTRACT_CPUS)))
    budget_mb = opts.object_store_mb or max(512, 256 * refine[1])
    return Pools(refine=refine, extract=extract, write=refine[1], object_store_bytes=budget_mb * 2**20)


# Ray Data gathers what a stage's function yields into output blocks of up to this size before
# handing them downstream (its default, 128 MiB, would hold back a whole shard's patches: extraction
# yields every --images-per-block images, ~1 MB of patches at 8 images of 4 instances).
BLOCK_BYTES = 1 << 20


@contextlib.contextmanager
def memory_budget(nbytes: int):
    """Ray Data's object store limit and output block size (BLOCK_BYTES) for the datasets executed
    inside (the context is restored)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.resource_limits, ctx.target_max_block_size
    ctx.execution_options.resource_limits = saved[0].copy(object_store_memory=nbytes)
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        yield
    finally:
        ctx.execution_options.resource_limits, ctx.target_max_block_size = saved


def images_per_put(opts: RefineOptions, pending_shards: int, extract_actors: int) -> int:
    """Whole images per input block, the object the driver puts into the object store for each.

    A put costs the driver a fixed ~0.4 ms of CPU on this box (~25 us per instance with blocks of 8
    images), so blocks are as large as a shard when there is enough work to keep every extraction
    actor busy (4 blocks per actor); smaller inputs are cut finer, down to --images-per-block.
    Extraction still hands its patches on every --images-per-block images (`ExtractPatches`)."""
    want = -(-opts.shard_size * max(1, pending_shards) // (4 * max(1, extract_actors)))
    return max(opts.images_per_block, min(opts.shard_size, want))


def input_blocks(table: pa.Table, shard: int, images_per_block: int) -> list[pa.Table]:
    """A shard's instance rows (the spill's table, sorted by image) -> Arrow tables of whole images,
    at most images_per_block each: extraction gets every instance of an image in one batch. Slices
    of one table, cut where the image changes (no per-row work)."""
    if table.num_rows == 0:
        return []
    ids = table["image_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # first row of each image
    cuts = list(starts[::images_per_block]) + [len(ids)]
    table = table.set_column(table.schema.get_field_index("detector_fields"), "detector_fields",
                             pc.fill_null(table["detector_fields"], ""))  # one string type in every block
    table = table.drop_columns(["image_identity"])
    for name in ("source_file", "file_name"):
        table = table.set_column(table.schema.get_field_index(name), name, pc.dictionary_encode(table[name]))
    table = table.append_column("shard", pa.array(np.full(len(ids), shard, np.int64)))
    return [table.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])]


def build(opts: RefineOptions, blocks: list, cfg: BPRConfig, card: dict, device: str, num_gpus: float,
          out: storage.Location, pools: Pools, with_source: bool = False):
    """The dataset of receipts for the input blocks (Arrow tables or object refs to them)."""
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_arrow_refs([b if isinstance(b, ray.ObjectRef) else ray.put(b) for b in blocks])
    ds = ds.map_batches(ExtractPatches, fn_constructor_args=(opts.images, cfg.to_dict(), opts.exif, opts.max_image_pixels,
                                                             opts.allow_absolute_paths, opts.images_per_block),
                        batch_size=None,  # a whole input block: every instance of its images
                        compute=ActorPoolStrategy(min_size=1, max_size=pools.extract),
                        num_cpus=EXTRACT_CPUS, batch_format="numpy")
    ds = ds.map_batches(RefinePatches,
                        fn_constructor_args=(opts.method, opts.checkpoint, device, cfg.to_dict(), max(1, int(opts.refine_cpus)),
                                             opts.fail_on_batch, opts.batch_size),
                        batch_size=opts.instances_per_call, compute=ActorPoolStrategy(min_size=pools.refine[0], max_size=pools.refine[1]),
                        num_cpus=opts.refine_cpus, num_gpus=num_gpus, batch_format="numpy")
    return ds.map_batches(WriteParts, fn_constructor_args=(out.uri, cfg.to_dict(), str(card.get("name")),
                                                           str(card.get("version", "")), cfg.config_hash(),
                                                           with_source),
                          batch_size=opts.instances_per_part, compute=ActorPoolStrategy(min_size=1, max_size=pools.write),
                          num_cpus=WRITE_CPUS, batch_format="numpy")
