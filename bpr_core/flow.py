"""The per-instance flow of BPR, written once: plan, extract, predict, finish.

    plan_instance(mask)             -> status, reason, boxes     (skip rules, patch proposal: steps 1-2)
    extract(image, masks)           -> PatchBatch                (crop image and mask patches: step 3)
    predict_u8(refiner, batch)      -> (K, S, S) uint8           (the network, 0..255: step 4)
    finish_instance(mask, boxes, p) -> mask, rejected reason     (paste + do-no-harm rule: step 5)

`Refiner` (one process, whole images), the Ray stages (`pipeline.stages`: extraction actors, GPU/CPU
refinement actors, the grouping stage) and the benchmark's serial-work floor all call these, so the
library and the distributed job produce the same masks bit for bit (tests/pipeline/test_stages.py,
tests/pipeline/test_refine_pipeline.py).

Probabilities travel as uint8 (0..255) between predict and finish everywhere: a quarter of float32's
bytes through the object store and over PCIe, quantised on the device. The threshold is applied to
the mean of the quantised values (bpr_core.patches.paste_patches scales by 255).

Like SAM's `MaskData`, a `PatchBatch` holds the patches of many instances (of one image or many) as
flat arrays plus per-instance offsets, so batches concatenate and split without per-patch objects.
Torch is imported only by `predict_u8`'s refiners: extraction and pasting stay numpy/OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import BPRConfig
from .patches import crop_patches, propose_patches, reassemble, skip_reason

REFINED, PASSED, QUARANTINED = "refined", "passed_through", "quarantined"


def plan_instance(mask: np.ndarray, cfg: BPRConfig) -> tuple[str, str, np.ndarray]:
    """-> (status, reason, boxes). Passed-through instances ("empty", "too_small", "no_boundary")
    have no boxes; a refined one has at least one."""
    reason = skip_reason(int(np.count_nonzero(mask)), cfg)
    if reason:
        return PASSED, reason, np.zeros((0, 4), np.int64)
    boxes = propose_patches(mask, cfg)
    if len(boxes) == 0:
        return PASSED, "no_boundary", boxes
    return REFINED, "", boxes


@dataclass
class PatchBatch:
    """Patches of n instances, flat: instance i owns rows offsets[i]:offsets[i+1] of boxes/img/msk."""

    status: list[str]
    reason: list[str]
    offsets: np.ndarray  # (n + 1,) int64
    boxes: np.ndarray  # (K, 4) int64, x1 y1 x2 y2
    img: np.ndarray  # (K, S, S, 3) uint8
    msk: np.ndarray  # (K, S, S) uint8 in {0, 1}
    probs: np.ndarray | None = field(default=None)  # (K, S, S) uint8, after predict_u8

    def __len__(self) -> int:
        return len(self.status)

    @property
    def num_patches(self) -> int:
        return int(self.offsets[-1])

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def span(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    @staticmethod
    def empty(crop_size: int) -> "PatchBatch":
        s = crop_size
        return PatchBatch([], [], np.zeros(1, np.int64), np.zeros((0, 4), np.int64), np.zeros((0, s, s, 3), np.uint8),
                          np.zeros((0, s, s), np.uint8))

    @staticmethod
    def concat(batches: "list[PatchBatch]", crop_size: int) -> "PatchBatch":
        if not batches:
            return PatchBatch.empty(crop_size)
        counts = np.concatenate([b.counts() for b in batches])
        probs = None if any(b.probs is None for b in batches) else np.concatenate([b.probs for b in batches])
        return PatchBatch([s for b in batches for s in b.status], [r for b in batches for r in b.reason],
                          np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                          np.concatenate([b.boxes for b in batches]), np.concatenate([b.img for b in batches]),
                          np.concatenate([b.msk for b in batches]), probs)


def extract(image: np.ndarray | None, masks, cfg: BPRConfig, preset: list[tuple[str, str] | None] | None = None) -> PatchBatch:
    """One image's instances -> their patches. `masks` is a sequence of HxW bool masks (None for an
    instance that cannot be decoded); `preset[i]` = (status, reason) decides instance i without
    looking at it (e.g. quarantined: unreadable image, bad RLE)."""
    s = cfg.crop_size
    status, reason, counts, boxes_l, img_l, msk_l = [], [], [], [], [], []
    for i, m in enumerate(masks):
        decided = preset[i] if preset is not None else None
        if decided is None:
            st, why, boxes = plan_instance(m, cfg)
        else:
            (st, why), boxes = decided, np.zeros((0, 4), np.int64)
        status.append(st)
        reason.append(why)
        counts.append(len(boxes))
        if len(boxes):
            boxes_l.append(boxes)
            img_l.append(crop_patches(image, boxes, cfg))
            msk_l.append(crop_patches(m.view(np.uint8), boxes, cfg))
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    if not boxes_l:
        return PatchBatch(status, reason, offsets, np.zeros((0, 4), np.int64), np.zeros((0, s, s, 3), np.uint8),
                          np.zeros((0, s, s), np.uint8))
    return PatchBatch(status, reason, offsets, np.concatenate(boxes_l).astype(np.int64), np.concatenate(img_l),
                      np.concatenate(msk_l))


def quantise(probs: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] -> uint8 0..255 (round half to even, as torch.round does)."""
    return np.clip(np.rint(np.asarray(probs, np.float32) * 255.0), 0, 255).astype(np.uint8)


def batch_bounds(k: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of the network batches for k patches: full batches of `batch_size`, then the
    rest in descending powers of two (k=101, batch 64: 64, 32, 4, 1), so the network only ever sees
    a handful of batch shapes, however the patches arrive.

    Why not one short last batch: every call then ends with a batch of a new size, and glibc's heap
    (PyTorch's CPU tensors) fragments on the ever-changing activation sizes and only grows. Measured
    on this 2-core box, one refinement actor over calls of 64 instances: RSS 0.72 GB after 20 calls,
    1.19 GB after 80, still rising; with these bounds 0.39 GB after both, at the same speed (no
    padding: every patch is computed once, and a patch's output does not depend on its batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    full = k - k % batch_size
    bounds = [(i, i + batch_size) for i in range(0, full, batch_size)]
    i = full
    while i < k:
        step = 1 << ((k - i).bit_length() - 1)  # the largest power of two that fits
        bounds.append((i, i + step))
        i += step
    return bounds


def predict_u8(patch_refiner, img: np.ndarray, msk: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Every patch through the patch refiner in batches of `batch_size` (`batch_bounds`): (K, S, S)
    uint8 0..255.
    A refiner with its own `predict_u8` (the network: quantised on its device, one synchronisation
    per call) is used as is; any other's float output is quantised here."""
    k = len(img)
    if k == 0:
        return np.zeros((0, *msk.shape[1:]), np.uint8)
    own = getattr(patch_refiner, "predict_u8", None)
    if own is not None:
        return own(img, msk, batch_size)
    return np.concatenate([quantise(patch_refiner.predict(img[a:b], msk[a:b])) for a, b in batch_bounds(k, batch_size)])


def finish_instance(mask: np.ndarray, boxes: np.ndarray, probs_u8: np.ndarray, cfg: BPRConfig) -> tuple[np.ndarray, str]:
    """Paste one instance's patch probabilities onto its coarse mask and apply the do-no-harm rule:
    -> (mask, "" or "change_rejected"). No boxes: the coarse mask itself."""
    if len(boxes) == 0:
        return np.asarray(mask, bool), ""
    return reassemble(mask, boxes, probs_u8, cfg)
