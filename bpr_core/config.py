"""One typed configuration for the whole BPR flow.

Defaults are the official implementation's (chenhang98/BPR: tools/split_patches.py,
tools/merge_patches.py, configs/bpr/hrnet18s_128.py) unless a comment says otherwise. The same
object is used by the library, the Ray pipeline, the jobs' command lines and the tests, and it is
stored inside every checkpoint so a model always runs with the geometry it was trained with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

# The shipped model (here, not in refiner.py, so that naming it does not import torch: the jobs'
# command lines and the processes they spawn import their module first).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default.pt"
MODEL_NAMES = ("hrnet18s", "hrnet_lite", "efflite0")
# Image normalisation each network was (pre)trained with: ImageNet mean/std for the HRNets
# (official img_norm_cfg), (x - 127) / 128 for EfficientNet-Lite (its TF reference).
# The paper's reassembly: every do-no-harm rule off. Pass as overrides to make_patch_refiner.
OFFICIAL_RULES = {"min_area": 0, "gate_margin": 0.0, "min_keep_iou": 0.0}
NORMALISATION = {"efflite0": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))}


@dataclass(frozen=True)
class BPRConfig:
    # Patch proposal (tools/split_patches.py).
    patch_size: int = 64
    nms_iou: float = 0.25  # inference default; 0.55 was used for Cityscapes, 0.15 for COCO training
    # Optional context around each patch (official `--padding`, default 0). The network sees
    # patch_size + 2 * context_pad pixels; only the central patch_size square is pasted back.
    context_pad: int = 0
    # Network input (configs/bpr/hrnet18s_128.py crop_size).
    input_size: int = 128
    mask_resize: str = "nearest"  # "nearest" or "bilinear" (bilinear + 0.5 threshold)
    model: str = "hrnet18s"
    # Reassembly (tools/merge_patches.py): mean of overlapping patch probabilities, threshold.
    threshold: float = 0.5
    # Instances whose coarse mask has fewer pixels than this are passed through unchanged
    # (reason "too_small"). 0 refines everything that has a boundary.
    min_area: int = 0
    # Do-no-harm rules (ours, not the paper's; 0 = the official behaviour). A pixel leaves its
    # coarse value only where the averaged patch probability is beyond threshold +- gate_margin
    # (the network must be sure to overrule the detector); a refined instance is kept only if its
    # IoU with the coarse mask is at least min_keep_iou (refinement corrects boundaries, it does
    # not redraw objects), else it passes through with reason "change_rejected". Checkpoints
    # carry values calibrated on dev-validation (README, `jobs.calibrate`).
    gate_margin: float = 0.0
    min_keep_iou: float = 0.0
    # Test-time augmentation: average the network's probabilities over the patch and its mirror
    # image (ours; twice the network work).
    tta_flip: bool = False
    # ImageNet normalisation of the image channels (official img_norm_cfg).
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.patch_size < 2:
            raise ValueError(f"patch_size must be >= 2, got {self.patch_size}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1], got {self.nms_iou}")
        if self.context_pad < 0:
            raise ValueError(f"context_pad must be >= 0, got {self.context_pad}")
        if self.mask_resize not in ("nearest", "bilinear"):
            raise ValueError(f"mask_resize must be 'nearest' or 'bilinear', got {self.mask_resize!r}")
        if not 0.0 <= self.gate_margin < 0.5:
            raise ValueError(f"gate_margin must be in [0, 0.5), got {self.gate_margin}")
        if not 0.0 <= self.min_keep_iou <= 1.0:
            raise ValueError(f"min_keep_iou must be in [0, 1], got {self.min_keep_iou}")
        if self.min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {self.min_area}")
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {MODEL_NAMES}, got {self.model!r}")

    @property
    def crop_size(self) -> int:
        """Side of the square cut from the image for one patch (patch plus context)."""
        return self.patch_size + 2 * self.context_pad

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BPRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown BPRConfig fields: {sorted(unknown)}")
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def replace(self, **changes) -> "BPRConfig":
        return dataclasses.replace(self, **changes)

    def config_hash(self) -> str:
        """Stable short hash of everything that changes refined output (provenance, resume keys)."""
        d = self.to_dict()
        d.pop("extra", None)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
