"""The refinement job's options (`jobs.refine` flags, library callers, `jobs.reprocess`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bpr_core import BPRConfig
from bpr_core.formats import InputError
from bpr_core.imageio import DEFAULT_MAX_PIXELS, EXIF_POLICIES


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
    # Images per shard, the unit of commit and resume (not of execution: one Ray Data flow runs every
    # pending shard through the same long-lived actors; a shard commits when its last part is written).
    shard_size: int = 1000
    batch_size: int = 64  # patches per network batch
    # Refinement actors: 0 (auto) = one per GPU the cluster has or can add, else one per CPU (graph.plan_pools).
    refine_actors: int = 0
    # Extraction actors: an autoscaling pool of 1..N; 0 = N derived from the cluster's CPUs (pipeline.graph).
    extract_actors: int = 0
    # Logical CPUs reserved per refinement actor (its torch threads: max(1, int(refine_cpus))).
    refine_cpus: float = 0.5
    images_per_block: int = 8  # whole images per extraction step (input blocks hold at least this many; an image is never split)
    instances_per_call: int = 64  # instance rows per refinement call (their patches share network batches)
    instances_per_part: int = 512  # instance rows per written Parquet part (at most; a part never spans shards)
    object_store_mb: int = 0  # the flow's object store budget; 0 = auto (graph.plan_pools)
    device: str = "auto"  # auto: GPU actors when the cluster has GPUs
    fail_on_batch: int | None = None  # fault injection (tests)
    visualize: int = 0  # overlay PNGs of this many most-changed images, to OUT/visualize/
    visualize_ids: list[int] | None = None  # or of these images
    # A shard fails the job (not committed) when more than this share of its images cannot be read
    # (and at least 3, or all of them): a systemic problem such as no image access from the workers.
    max_unreadable_share: float = 0.25
    lease_seconds: float = 600.0  # the lease on OUT (pipeline.lease), renewed by a heartbeat
    progress_interval: float = 30.0  # seconds between progress lines (0: only at commits)
    # Input policies (README, reliability): how images are decoded and which paths may be read.
    exif: str = "stored"  # stored pixels, or "apply" the EXIF orientation (bpr_core.imageio)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # images and masks above it are quarantined; 0 = no limit
    allow_absolute_paths: bool = False  # index file_names must be relative to --images unless set

    def validate(self) -> None:
        """Sizes and counts must be positive: one clear error instead of a ZeroDivisionError."""
        for name in ("shard_size", "batch_size", "images_per_block", "instances_per_call", "instances_per_part",
                     "refine_actors", "extract_actors", "object_store_mb"):
            v = getattr(self, name)
            auto = name in ("refine_actors", "extract_actors", "object_store_mb")
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if auto else 1):
                what = "a non-negative integer (0 = auto)" if auto else "a positive integer"
                raise InputError(f"{name.replace('_', '-')} must be {what}, got {v!r}")
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
