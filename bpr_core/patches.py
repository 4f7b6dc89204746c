"""Boundary patches: find the coarse mask's boundary, propose square patches along it, cut image and
mask patches, and paste refined patches back. Steps 1-3 and 5 of BPR, all vectorised.

Boxes are int64 arrays of shape (K, 4) as x1, y1, x2, y2 (x2 = x1 + patch_size, exclusive), in
image pixel coordinates. A box may extend past the right/bottom edge only when the image is smaller
than a patch; cropping pads such boxes with zeros and pasting clips them.
"""

from __future__ import annotations

import numpy as np

from .config import BPRConfig


def float_boundary(mask: np.ndarray) -> np.ndarray:
    """HxW bool -> HxW float32 boundary score in {0, 1/4.5, ..., 4/4.5}.

    With s the 3x3 sum of the binary mask (zeros outside the image, as the official conv2d with
    padding=1 does), score = min(|s - 9|, |s|) / 4.5: non-zero exactly where the 3x3 neighbourhood
    holds both foreground and background.
    """
    m = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    h, w = mask.shape
    s = np.zeros((h, w), dtype=np.uint8)
    for dy in range(3):
        for dx in range(3):
            s += m[dy : dy + h, dx : dx + w]
    s = s.astype(np.float32)
    return np.minimum(np.abs(s - 9.0), s) / 4.5


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def boundary_points(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boundary pixels of a mask as (xs, ys, scores), in raster order (row by row).

    Computed inside the mask's bounding box grown by one pixel, which gives exactly the full-image
    result (the score is zero farther out) at a fraction of the cost for small instances.
    """
    bb = _mask_bbox(mask)
    if bb is None:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    h, w = mask.shape
    x0, y0 = max(bb[0] - 1, 0), max(bb[1] - 1, 0)
    x1, y1 = min(bb[2] + 1, w), min(bb[3] + 1, h)
    score = float_boundary(mask[y0:y1, x0:x1])
    ys, xs = np.nonzero(score)
    return xs.astype(np.int64) + x0, ys.astype(np.int64) + y0, score[ys, xs]


def square_nms(xs: np.ndarray, ys: np.ndarray, scores: np.ndarray, size: int, iou: float) -> np.ndarray:
    """Greedy NMS over equal squares of side `size` with top-left corners (xs, ys).

    Order: descending score, ties broken by input order (a stable sort), so the result is fully
    determined. A box is suppressed when its IoU with a kept box is > `iou`. Returns kept indices
    into the inputs, in keep order.

    For equal squares IoU depends only on the offset: inter = (size-|dx|)+ * (size-|dy|)+,
    IoU = inter / (2 size^2 - inter). Each round keeps the best live box and suppresses all of its
    neighbours at once, so the Python loop runs once per kept box, not per pixel; neighbours are
    looked up in a grid of size x size cells (only boxes in the 3x3 cells around can overlap).
    """
    n = xs.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    ox, oy = xs[order], ys[order]
    # Grid of cells of side `size`: two boxes overlap only if their cells are adjacent.
    gx, gy = (ox - ox.min()) // size, (oy - oy.min()) // size
    ncols = int(gx.max()) + 3
    cell = (gy + 1) * ncols + (gx + 1)
    by_cell = np.argsort(cell, kind="stable")
    ncells = int(cell.max()) + ncols + 2
    bounds = np.searchsorted(cell[by_cell], np.arange(ncells + 1))
    area2 = 2.0 * size * size
    alive = np.ones(n, dtype=bool)
    keep = []
    i = 0
    while i < n:
        i += int(np.argmax(alive[i:]))
        if not alive[i]:
            break
        keep.append(i)
        alive[i] = False
        c = int(cell[i])
        near = np.concatenate([by_cell[bounds[r - 1] : bounds[r + 2]] for r in (c - ncols, c, c + ncols)])
        near = near[alive[near]]
        if near.size:
            iw = np.clip(size - np.abs(ox[near] - ox[i]), 0, None)
            ih = np.clip(size - np.abs(oy[near] - oy[i]), 0, None)
            inter = (iw * ih).astype(np.float64)
            alive[near[inter / (area2 - inter) > iou]] = False
        i += 1
    return order[np.asarray(keep, dtype=np.int64)]


def propose_patches(mask: np.ndarray, config: BPRConfig = BPRConfig(), nms_iou: float | None = None) -> np.ndarray:
    """HxW bool coarse mask -> (K, 4) int64 boxes x1, y1, x2, y2 of side config.patch_size.

    One box centred on every boundary pixel, scored by the float boundary, greedy NMS at
    `nms_iou` (default config.nms_iou), then boxes crossing the image border are moved back inside.
    Deviations from the official tools/split_patches.py: boxes are moved exactly inside (the
    official clamp is off by one pixel), identical boxes produced by the move are kept once (same
    output, less work), and images smaller than a patch are padded rather than skipped.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    p = config.patch_size
    iou = config.nms_iou if nms_iou is None else nms_iou
    xs, ys, scores = boundary_points(mask)
    x1, y1 = xs - p // 2, ys - p // 2
    kept = square_nms(x1, y1, scores, p, iou)
    h, w = mask.shape
    x1 = np.clip(x1[kept], 0, max(w - p, 0))
    y1 = np.clip(y1[kept], 0, max(h - p, 0))
    boxes = np.stack([x1, y1, x1 + p, y1 + p], axis=1).astype(np.int64)
    if boxes.shape[0] > 1:
        _, first = np.unique(boxes[:, :2], axis=0, return_index=True)
        boxes = boxes[np.sort(first)]
    return boxes.reshape(-1, 4)


def _crop_index(starts: np.ndarray, size: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    idx = starts[:, None] + np.arange(size)[None, :]
    valid = (idx >= 0) & (idx < limit)
    return np.clip(idx, 0, max(limit - 1, 0)), valid


def crop_patches(array: np.ndarray, boxes: np.ndarray, config: BPRConfig = BPRConfig(), origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Cut one square per box (grown by config.context_pad on each side) out of an HxW[xC] array.

    Returns (K, S, S[, C]) with S = config.crop_size and the input dtype; pixels outside the array
    are zero (as the official code's zero padding). `origin` is the (x, y) of array[0, 0] in image
    coordinates, so a crop of a larger image can be indexed with image-space boxes.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    s, c = config.crop_size, config.context_pad
    h, w = array.shape[:2]
    yi, yv = _crop_index(boxes[:, 1] - c - origin[1], s, h)
    xi, xv = _crop_index(boxes[:, 0] - c - origin[0], s, w)
    out = array[yi[:, :, None], xi[:, None, :]]
    valid = yv[:, :, None] & xv[:, None, :]
    if not valid.all():
        out[~valid] = 0
    return out


def paste_patches(coarse: np.ndarray, boxes: np.ndarray, probs: np.ndarray, config: BPRConfig = BPRConfig()) -> np.ndarray:
    """Reassemble one instance: HxW bool coarse mask + K refined patches -> HxW bool mask.

    `probs` is (K, S, S) foreground probability at crop size, float in [0, 1] or uint8 in [0, 255].
    The central patch_size square of each is averaged per pixel over all patches covering it and
    thresholded (> config.threshold); pixels no patch covers keep the coarse value bit for bit.
    With config.gate_margin m > 0 a covered pixel becomes foreground only where the mean is above
    threshold + m, background only where it is below threshold - m, and keeps its coarse value in
    between (an unsure network never overrules the detector).
    """
    coarse = np.asarray(coarse, dtype=bool)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    out = coarse.copy()
    if boxes.shape[0] == 0:
        return out
    scale = 255.0 if probs.dtype == np.uint8 else 1.0
    (y0, y1, x0, x1), sums, counts = _patch_sums(coarse.shape, boxes, probs, config)
    rh, rw = y1 - y0, x1 - x0
    covered = counts > 0
    region = out[y0:y1, x0:x1].reshape(-1)
    m = config.gate_margin
    if m <= 0:
        region[covered] = sums[covered] > config.threshold * scale * counts[covered]
    else:
        s, n = sums[covered], counts[covered]
        on = s > (config.threshold + m) * scale * n
        off = s < (config.threshold - m) * scale * n
        region[covered] = np.where(on, True, np.where(off, False, region[covered]))
    out[y0:y1, x0:x1] = region.reshape(rh, rw)
    return out


def _patch_sums(shape: tuple[int, int], boxes: np.ndarray, probs: np.ndarray, config: BPRConfig):
    """Per-pixel sum and count of the patches' central probabilities, inside the union of the
    boxes only. Returns ((y0, y1, x0, x1), sums, counts) with flat arrays over that region."""
    p, c = config.patch_size, config.context_pad
    h, w = shape
    centre = probs[:, c : c + p, c : c + p]
    x0, y0 = int(boxes[:, 0].min()), int(boxes[:, 1].min())
    x1, y1 = min(int(boxes[:, 2].max()), w), min(int(boxes[:, 3].max()), h)
    rh, rw = y1 - y0, x1 - x0
    ys = boxes[:, 1, None] - y0 + np.arange(p)[None, :]  # K x p
    xs = boxes[:, 0, None] - x0 + np.arange(p)[None, :]
    valid = (ys < rh)[:, :, None] & (xs < rw)[:, None, :]
    flat = ys[:, :, None] * rw + xs[:, None, :]
    sums = np.bincount(flat[valid], weights=centre[valid].astype(np.float64), minlength=rh * rw)
    counts = np.bincount(flat[valid], minlength=rh * rw)
    return (y0, y1, x0, x1), sums, counts


def probability_map(coarse: np.ndarray, boxes: np.ndarray, probs: np.ndarray, config: BPRConfig = BPRConfig()) -> np.ndarray:
    """HxW float32 foreground probability of one instance: the mean of the patch probabilities
    where patches cover a pixel (what `paste_patches` thresholds), the coarse mask (0 or 1)
    elsewhere."""
    out = np.asarray(coarse, dtype=bool).astype(np.float32)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return out
    scale = 255.0 if probs.dtype == np.uint8 else 1.0
    (y0, y1, x0, x1), sums, counts = _patch_sums(out.shape, boxes, probs, config)
    region = out[y0:y1, x0:x1].reshape(-1)
    covered = counts > 0
    region[covered] = (sums[covered] / (counts[covered] * scale)).astype(np.float32)
    out[y0:y1, x0:x1] = region.reshape(y1 - y0, x1 - x0)
    return out


def skip_reason(area: int, config: BPRConfig) -> str:
    """Why an instance with a coarse mask of `area` pixels is not refined at all ("" = refine it)."""
    if area == 0:
        return "empty"
    if area < config.min_area:
        return "too_small"
    return ""


def reassemble(coarse: np.ndarray, boxes: np.ndarray, probs: np.ndarray, config: BPRConfig = BPRConfig()) -> tuple[np.ndarray, str]:
    """Paste one instance's refined patches and apply the per-instance acceptance rule.

    Returns (mask, reason): reason "" when the refined mask is kept, "change_rejected" when its
    IoU with the coarse mask is below config.min_keep_iou, in which case the mask returned is the
    coarse one, bit for bit.
    """
    coarse = np.asarray(coarse, dtype=bool)
    out = paste_patches(coarse, boxes, probs, config)
    if config.min_keep_iou > 0:
        inter = np.count_nonzero(out & coarse)
        union = np.count_nonzero(out | coarse)
        if union and inter < config.min_keep_iou * union:
            return coarse.copy(), "change_rejected"
    return out, ""
