"""A deterministic synthetic instance-segmentation set, and detector-like coarse masks.

Images: textured backgrounds with several overlapping objects of varied shapes (smooth blobs,
star polygons with concavities, bodies with thin limbs), sizes from ~20 px to half the image,
each filled with its own texture. Ground truth is the visible part of each object.

Coarse masks are made the way Mask R-CNN makes them (`degrade_mask`): the instance is resampled to
a 28x28 grid inside a jittered box, the soft 28x28 map is blurred (a network's output is smooth),
pasted back with bilinear interpolation and thresholded at 0.5. The same function turns real
ground truth (e.g. Penn-Fudan) into detector-like inputs. Everything is driven by one seeded
numpy Generator, so the same seed writes byte-identical files.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CATEGORIES = [
    {"id": 1, "name": "blob"},
    {"id": 2, "name": "star"},
    {"id": 3, "name": "limbed"},
]


@dataclass(frozen=True)
class Degradation:
    """Parameters of the Mask R-CNN-like degradation (calibrated: see README, `make_synthetic`)."""

    grid: int = 28  # Mask R-CNN's mask head resolution
    box_jitter: float = 0.08  # std of each box edge's shift, as a fraction of the box side
    blur_sigma: float = 1.5  # Gaussian blur of the soft 28x28 map, in grid cells
    threshold: float = 0.5


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random values on a coarse grid, upsampled bicubically."""
    gh, gw = max(2, int(h / scale)), max(2, int(w / scale))
    g = rng.random((gh, gw)).astype(np.float32)
    n = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    n -= n.min()
    return n / max(float(n.max()), 1e-6)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 float32 texture in [0, 255]: two colours mixed by smooth noise, stripes, grain."""
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = _smooth_noise(rng, h, w, rng.uniform(8, 60))[..., None]
    img = c1 * (1 - t) + c2 * t
    if rng.random() < 0.4:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang, period = rng.uniform(0, np.pi), rng.uniform(4, 20)
        stripes = 0.5 + 0.5 * np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period)
        img = img * (1 - 0.25 * stripes[..., None])
    img = img + rng.normal(0, rng.uniform(2, 10), (h, w, 3))
    return np.clip(img, 0, 255).astype(np.float32)


def _shape_mask(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    """A size x size bool mask of one object shape, centred."""
    m = np.zeros((size, size), np.uint8)
    c = size / 2
    if kind == 1:  # smooth blob: thresholded smooth noise under a soft disk
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        r = np.hypot(xx - c, yy - c) / (size / 2)
        n = _smooth_noise(rng, size, size, max(size / 4, 2))
        m = ((1.0 - r) * 1.4 + 0.6 * (n - 0.5)) > 0.5
        return m
    if kind == 2:  # star polygon with deep concavities
        k = int(rng.integers(4, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, 2 * k))
        rad = np.where(np.arange(2 * k) % 2 == 0, rng.uniform(0.7, 1.0, 2 * k), rng.uniform(0.25, 0.6, 2 * k)) * (size / 2 - 1)
        pts = np.stack([c + rad * np.cos(ang), c + rad * np.sin(ang)], axis=1)
        cv2.fillPoly(m, [np.round(pts * 8).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=3)
        return m.astype(bool)
    # body with thin limbs: an ellipse and 2-5 thick lines radiating out
    ax = (int(size * rng.uniform(0.15, 0.3)), int(size * rng.uniform(0.15, 0.3)))
    cv2.ellipse(m, (int(c), int(c)), ax, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    for _ in range(int(rng.integers(2, 6))):
        a = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.3, 0.5) * size
        end = (int(c + length * np.cos(a)), int(c + length * np.sin(a)))
        cv2.line(m, (int(c), int(c)), end, 1, thickness=max(1, int(size * rng.uniform(0.02, 0.07))))
    return m.astype(bool)


def make_image(rng: np.random.Generator, height: int, width: int, max_objects: int = 6, min_visible: int = 64):
    """One synthetic image -> (HxWx3 uint8 RGB, list of (category_id, HxW bool visible mask))."""
    img = _texture(rng, height, width)
    light = _smooth_noise(rng, height, width, 80)[..., None]
    img = img * (0.75 + 0.5 * light)
    owner = np.full((height, width), -1, np.int32)
    kinds = []
    n_obj = int(rng.integers(2, max_objects + 1))
    short = min(height, width)
    for k in range(n_obj):
        kind = int(rng.integers(1, 4))
        # sizes from ~20 px to half the image, log-uniform so small objects are common
        size = int(np.exp(rng.uniform(np.log(20), np.log(max(short / 2, 21)))))
        shape = _shape_mask(rng, kind, size)
        scale = rng.uniform(0.7, 1.3)  # anisotropic stretch
        sh = cv2.resize(shape.astype(np.uint8), (max(2, int(size * scale)), max(2, int(size / scale))),
                        interpolation=cv2.INTER_NEAREST).astype(bool)
        hh, ww = sh.shape
        y0 = int(rng.integers(-hh // 4, max(height - 3 * hh // 4, -hh // 4 + 1)))
        x0 = int(rng.integers(-ww // 4, max(width - 3 * ww // 4, -ww // 4 + 1)))
        ys, xs = np.nonzero(sh)
        ys, xs = ys + y0, xs + x0
        ok = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
        ys, xs = ys[ok], xs[ok]
        tex = _texture(rng, height, width)
        img[ys, xs] = tex[ys, xs]
        owner[ys, xs] = k
        kinds.append(kind)
    img = cv2.GaussianBlur(img, (0, 0), 0.6)  # camera softness, so edges are not aliased steps
    image = np.clip(img, 0, 255).astype(np.uint8)
    objects = []
    for k, kind in enumerate(kinds):
        m = owner == k
        if m.sum() >= min_visible:
            objects.append((kind, m))
    return image, objects


def degrade_mask(mask: np.ndarray, rng: np.random.Generator, params: Degradation = Degradation()) -> np.ndarray:
    """HxW bool ground truth -> HxW bool detector-like coarse mask (Mask R-CNN style).

    The box is the mask's bounding box with each edge jittered; the mask is area-resampled to a
    grid x grid soft map inside it (RoIAlign-like), blurred, then pasted back by bilinear resize to
    the box and a 0.5 threshold (detectron2's paste_masks_in_image does the same).
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return mask.copy()
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0
    bw, bh = x1 - x0, y1 - y0
    j = rng.normal(0, params.box_jitter, 4)
    x0, x1 = x0 + j[0] * bw, x1 + j[1] * bw
    y0, y1 = y0 + j[2] * bh, y1 + j[3] * bh
    if x1 - x0 < 2:
        x1 = x0 + 2
    if y1 - y0 < 2:
        y1 = y0 + 2
    g = params.grid
    # Resample the box region to g x g by averaging (supersampled affine warp).
    ss = 4
    sx, sy = (x1 - x0) / (g * ss), (y1 - y0) / (g * ss)
    a = np.array([[sx, 0, x0 + 0.5 * sx - 0.5], [0, sy, y0 + 0.5 * sy - 0.5]], np.float32)
    fine = cv2.warpAffine(mask.astype(np.float32), a, (g * ss, g * ss),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
    soft = fine.reshape(g, ss, g, ss).mean(axis=(1, 3))
    if params.blur_sigma > 0:
        soft = cv2.GaussianBlur(soft, (0, 0), params.blur_sigma, borderType=cv2.BORDER_CONSTANT)
    # Paste back: image pixel centres mapped into grid coordinates, bilinear sampling.
    inv = np.array([[g / (x1 - x0), 0, -x0 * g / (x1 - x0) - 0.5 + 0.5 * g / (x1 - x0)],
                    [0, g / (y1 - y0), -y0 * g / (y1 - y0) - 0.5 + 0.5 * g / (y1 - y0)]], np.float32)
    pasted = cv2.warpAffine(soft, inv, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_CONSTANT)
    return pasted > params.threshold


def random_false_positive(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    size = int(rng.integers(16, max(17, min(height, width) // 4)))
    shape = _shape_mask(rng, 1, size)
    m = np.zeros((height, width), bool)
    y0, x0 = int(rng.integers(0, max(1, height - size))), int(rng.integers(0, max(1, width - size)))
    sub = m[y0 : y0 + size, x0 : x0 + size]
    sub |= shape[: sub.shape[0], : sub.shape[1]]
    return m


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return float(inter / union) if union else 1.0


def coarse_detections(rng: np.random.Generator, gt_masks: list[tuple[int, np.ndarray]], height: int, width: int,
                      params: Degradation = Degradation(), miss_rate: float = 0.05, fp_rate: float = 0.3,
                      categories: tuple[int, ...] = (1, 2, 3)):
    """Detector-like results for one image: [(category_id, coarse mask, score, gt index or -1)].

    Misses drop an instance with probability `miss_rate`; a false positive is added with
    probability `fp_rate`; scores rise with the coarse mask's quality, with noise.
    """
    out = []
    for gi, (cat, m) in enumerate(gt_masks):
        if rng.random() < miss_rate:
            continue
        c = degrade_mask(m, rng, params)
        if not c.any():
            continue
        score = float(np.clip(0.3 + 0.6 * mask_iou(c, m) + rng.normal(0, 0.08), 0.05, 0.999))
        out.append((cat, c, round(score, 4), gi))
    if rng.random() < fp_rate:
        fp = random_false_positive(rng, height, width)
        if fp.any():
            out.append((int(categories[int(rng.integers(0, len(categories)))]), fp, round(float(rng.uniform(0.05, 0.5)), 4), -1))
    return out


def write_dataset(out_dir, num_images: int, seed: int = 0, min_size: int = 192, max_size: int = 384,
                  params: Degradation = Degradation(), progress=None) -> dict:
    """Write DIR/images/*.png, DIR/annotations.json (COCO GT) and DIR/coarse.json (results).

    Image i is drawn from its own Generator seeded by (seed, i), so a dataset is reproducible image
    by image. Returns summary figures, including the mean coarse-to-GT IoU on objects of at least
    32x32 px (the calibration target, 0.85-0.90).
    """
    import json
    from pathlib import Path

    from . import rle as rle_utils

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, anns, results, ious_large, ious_all = [], [], [], [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        h, w = int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1))
        image, objects = make_image(rng, h, w)
        name = f"{i:06d}.png"
        cv2.imwrite(str(out / "images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        first_ann = len(anns)
        for cat, m in objects:
            r = rle_utils.encode(m)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": r,
                         "area": int(m.sum()), "bbox": rle_utils.to_bbox(r), "iscrowd": 0})
        for cat, c, score, gi in coarse_detections(rng, objects, h, w, params):
            r = rle_utils.encode(c)
            results.append({"image_id": image_id, "category_id": cat, "segmentation": r, "score": score,
                            "bbox": rle_utils.to_bbox(r)})
            if gi >= 0:
                iou = mask_iou(c, objects[gi][1])
                ious_all.append(iou)
                if anns[first_ann + gi]["area"] >= 32 * 32:
                    ious_large.append(iou)
        if progress is not None:
            progress(i + 1, num_images)
    gt = {"info": {"description": f"bpr synthetic set, seed {seed}", "version": "1"}, "images": images,
          "annotations": anns, "categories": CATEGORIES}
    (out / "annotations.json").write_text(json.dumps(gt, separators=(",", ":")))
    (out / "coarse.json").write_text(json.dumps(results, separators=(",", ":")))
    return {"images": num_images, "gt_instances": len(anns), "coarse_instances": len(results),
            "mean_coarse_iou_large": float(np.mean(ious_large)) if ious_large else float("nan"),
            "mean_coarse_iou_all": float(np.mean(ious_all)) if ious_all else float("nan")}
