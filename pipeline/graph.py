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
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bpr_core import BPRConfig

from . import storage
from .ingest import SPILL_SCHEMA
from .options import RefineOptions
from .stages import ExtractPatches, RefinePatches, WriteParts

WORK_SCHEMA = SPILL_SCHEMA.append(pa.field("shard", pa.int64()))  # the input rows of the flow

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


def refine_pool(opts: RefineOptions, device: str) -> tuple[int, int]:
    """(min, max) refinement actors. --refine-actors N: exactly N. 0 (auto): on GPUs an autoscaling
    pool of one actor per GPU the cluster has now or its autoscaler can add (each new actor's
    num_gpus=1 request makes the autoscaler start a GPU node); on CPUs an autoscaling pool of up to
    one single-threaded actor per CPU, since the network is most of the work (measured on 2 cores,
    4N images: 2 actors 81 s, one 119 s)."""
    if opts.refine_actors:
        return opts.refine_actors, opts.refine_actors
    import ray

    res = ray.cluster_resources()
    if device.startswith("cuda"):
        return 1, max(1, int(res.get("GPU", 0)), autoscaler_gpus())
    return 1, max(1, min(32, int(res.get("CPU", 1.0))))  # grows from one: a small input needs no second


def extract_pool_size(opts: RefineOptions, device: str) -> int:
    """Most extraction actors: --extract-actors, or (0 = auto) as many as the cluster's CPUs hold
    beside the refinement actors (on a GPU cluster the network outruns one CPU's extraction many
    times over, so the pool may use every CPU; on CPUs the network needs its share). The pool starts
    at one actor and Ray Data grows it while extraction is the bottleneck."""
    if opts.extract_actors:
        return opts.extract_actors
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    refine_cpus = 0.0 if device.startswith("cuda") else refine_pool(opts, device)[1] * opts.refine_cpus
    return max(1, min(64, int((cpus - refine_cpus - WRITE_CPUS) // EXTRACT_CPUS)))


def write_pool_size(opts: RefineOptions, device: str) -> int:
    """Most grouping/writing actors: one per refinement actor (pasting and encoding an instance
    costs a fraction of its network time; an idle actor is ~250 MB of RSS for nothing)."""
    return refine_pool(opts, device)[1]


def object_store_budget(opts: RefineOptions, device: str) -> int:
    """Bytes of object store the flow may hold at once: --object-store-mb, or (0 = auto) 256 MB per
    refinement actor, at least 512 MB. Without a budget, extraction (several times faster than the
    network on CPUs) runs ahead and parks every patch of the input in the object store: measured on
    2 cores, peak RSS grew 1.31x from N to 4N images; the budget keeps the flow's memory independent
    of the input's size (backpressure holds extraction back)."""
    if opts.object_store_mb:
        return opts.object_store_mb * 2**20
    return max(512, 256 * refine_pool(opts, device)[1]) * 2**20


@contextlib.contextmanager
def memory_budget(nbytes: int):
    """Ray Data's object store limit for the datasets executed inside (the context is restored)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = saved.copy(object_store_memory=nbytes)
    try:
        yield
    finally:
        ctx.execution_options.resource_limits = saved


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
    table = table.append_column("shard", pa.array(np.full(len(ids), shard, np.int64)))
    return [table.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])]


def build(opts: RefineOptions, blocks: list, cfg: BPRConfig, card: dict, device: str, num_gpus: float,
          out: storage.Location):
    """The dataset of receipts for the input blocks (Arrow tables or object refs to them)."""
    import ray
    from ray.data import ActorPoolStrategy

    refine_min, refine_max = refine_pool(opts, device)
    ds = ray.data.from_arrow_refs([b if isinstance(b, ray.ObjectRef) else ray.put(b) for b in blocks])
    ds = ds.map_batches(ExtractPatches, fn_constructor_args=(opts.images, cfg.to_dict(), opts.exif, opts.max_image_pixels,
                                                             opts.allow_absolute_paths),
                        batch_size=None,  # a whole input block: every instance of its images
                        compute=ActorPoolStrategy(min_size=1, max_size=extract_pool_size(opts, device)),
                        num_cpus=EXTRACT_CPUS, batch_format="numpy")
    ds = ds.map_batches(RefinePatches,
                        fn_constructor_args=(opts.method, opts.checkpoint, device, cfg.to_dict(), max(1, int(opts.refine_cpus)),
                                             opts.fail_on_batch, opts.batch_size),
                        batch_size=opts.instances_per_call, compute=ActorPoolStrategy(min_size=refine_min, max_size=refine_max),
                        num_cpus=opts.refine_cpus, num_gpus=num_gpus, batch_format="numpy")
    return ds.map_batches(WriteParts, fn_constructor_args=(out.uri, cfg.to_dict(), str(card.get("name")),
                                                           str(card.get("version", "")), cfg.config_hash()),
                          batch_size=opts.instances_per_part, compute=ActorPoolStrategy(min_size=1, max_size=write_pool_size(opts, device)),
                          num_cpus=WRITE_CPUS, batch_format="numpy")
