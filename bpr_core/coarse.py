"""Coarse masks that look like many detectors, not one: a mixture of degradation recipes.

A network trained on one degradation learns that degradation, not object boundaries (the model
shipped before this mixture made real detectors' masks worse). Each recipe maps a ground-truth
mask to a plausible detector output:

- `maskrcnn28`: Mask R-CNN's 28x28 RoI mask (`synthetic.degrade_mask`) at a random blur level,
  including none, and a random box jitter;
- `grid14`: a 14x14 RoI mask (older/lighter heads);
- `quarter`: a whole-image mask predicted at 1/4 resolution and upsampled bilinearly
  (YOLACT/SOLO/CondInst-like prototypes), with a small shift;
- `morph`: dilation or erosion by 1-4 px (a biased threshold);
- `polygon`: the outline simplified to a polygon (Douglas-Peucker, 1-4 px), as polygon heads and
  annotation tools give;
- `parts`: a missing part (an ellipse bitten out of the boundary), an extra bulge, or a hole;
- `boxclip`: the mask cut by a box that is too tight on one or two sides;
- `shift`: the mask translated by a few pixels (a misaligned RoI or box offset);
- `identity`: the ground truth itself, so the network learns to leave good boundaries alone.

`MIXTURE` weights them for training; `make_coarse(mask, rng)` draws one recipe per instance.
Everything is driven by a numpy Generator, so a seed gives the same masks.
"""

from __future__ import annotations

import cv2
import numpy as np

from .synthetic import Degradation, degrade_mask

RECIPES = ("maskrcnn28", "grid14", "quarter", "morph", "polygon", "parts", "boxclip", "shift", "identity")

# Training mixture (weights sum to 1). The 28x28 family gets the largest share because Mask R-CNN
# style heads are the commonest input; identity is 10%, enough for "leave it alone" to be learned.
MIXTURE = {"maskrcnn28": 0.25, "grid14": 0.10, "quarter": 0.15, "morph": 0.10, "polygon": 0.10,
           "parts": 0.10, "boxclip": 0.05, "shift": 0.05, "identity": 0.10}


def _maskrcnn28(mask, rng):
    sigma = float(rng.choice([0.0, 0.75, 1.5, 2.5]))
    return degrade_mask(mask, rng, Degradation(grid=28, box_jitter=float(rng.uniform(0.02, 0.1)), blur_sigma=sigma))


def _grid14(mask, rng):
    return degrade_mask(mask, rng, Degradation(grid=14, box_jitter=float(rng.uniform(0.02, 0.08)), blur_sigma=float(rng.choice([0.0, 0.75]))))


def _quarter(mask, rng):
    h, w = mask.shape
    f = 4
    lh, lw = max(1, -(-h // f)), max(1, -(-w // f))
    low = cv2.resize(mask.astype(np.float32), (lw, lh), interpolation=cv2.INTER_AREA)
    s = float(rng.choice([0.0, 0.5, 1.0]))
    if s > 0:
        low = cv2.GaussianBlur(low, (0, 0), s)
    dx, dy = rng.uniform(-1.5, 1.5, 2)
    # Map full-resolution pixel centres into the low-resolution grid (plus a small shift).
    a = np.array([[lw / w, 0, 0.5 * lw / w - 0.5 + dx / f], [0, lh / h, 0.5 * lh / h - 0.5 + dy / f]], np.float32)
    up = cv2.warpAffine(low, a, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    return up > float(rng.uniform(0.4, 0.6))


def _morph(mask, rng):
    r = int(rng.integers(1, 5))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    m = mask.astype(np.uint8)
    out = cv2.dilate(m, k) if rng.random() < 0.5 else cv2.erode(m, k)
    return out.astype(bool)


def _polygon(mask, rng):
    m = mask.astype(np.uint8)
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    eps = float(rng.uniform(1.0, 4.0))
    out = np.zeros(m.shape, np.uint8)
    polys = [cv2.approxPolyDP(c, eps, True) for c in contours]
    outer = [p for p, h in zip(polys, hierarchy[0]) if h[3] < 0]  # RETR_CCOMP: outer rims have no parent
    holes = [p for p, h in zip(polys, hierarchy[0]) if h[3] >= 0]
    cv2.drawContours(out, outer, -1, 1, thickness=cv2.FILLED)
    cv2.drawContours(out, holes, -1, 0, thickness=cv2.FILLED)
    return out.astype(bool) if out.any() else mask.copy()


def _parts(mask, rng):
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    out = mask.astype(np.uint8).copy()
    kind = rng.choice(["bite", "bulge", "hole"])
    if kind == "hole":
        i = int(rng.integers(0, ys.size))
        cy, cx = ys[i], xs[i]
    else:  # a boundary pixel
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        ey, ex = np.nonzero(edge)
        i = int(rng.integers(0, ey.size))
        cy, cx = ey[i], ex[i]
    ax = (max(1, int(bw * rng.uniform(0.08, 0.25))), max(1, int(bh * rng.uniform(0.08, 0.25))))
    cv2.ellipse(out, (int(cx), int(cy)), ax, float(rng.uniform(0, 180)), 0, 360, 1 if kind == "bulge" else 0, -1)
    return out.astype(bool)


def _boxclip(mask, rng):
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    bw, bh = x1 - x0, y1 - y0
    sides = rng.choice(4, size=int(rng.integers(1, 3)), replace=False)
    cut = rng.uniform(0.03, 0.12, 4)
    if 0 in sides:
        x0 += int(cut[0] * bw)
    if 1 in sides:
        x1 -= int(cut[1] * bw)
    if 2 in sides:
        y0 += int(cut[2] * bh)
    if 3 in sides:
        y1 -= int(cut[3] * bh)
    out = np.zeros(mask.shape, bool)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


def _shift(mask, rng):
    ys, xs = np.nonzero(mask)
    side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    d = rng.normal(0, 0.04 * side, 2)
    d = np.where(np.abs(d) < 1, np.sign(d + 1e-9), d)  # at least one pixel on each axis
    h, w = mask.shape
    a = np.array([[1, 0, d[0]], [0, 1, d[1]]], np.float32)
    return cv2.warpAffine(mask.astype(np.uint8), a, (w, h), flags=cv2.INTER_NEAREST, borderValue=0).astype(bool)


_FUNCS = {"maskrcnn28": _maskrcnn28, "grid14": _grid14, "quarter": _quarter, "morph": _morph, "polygon": _polygon,
          "parts": _parts, "boxclip": _boxclip, "shift": _shift, "identity": lambda m, rng: m.copy()}


def apply_recipe(mask: np.ndarray, recipe: str, rng: np.random.Generator) -> np.ndarray:
    """HxW bool ground truth -> HxW bool coarse mask made by `recipe` (one of RECIPES)."""
    if recipe not in _FUNCS:
        raise ValueError(f"unknown coarse recipe {recipe!r}; choose one of {RECIPES} or 'mix'")
    mask = np.ascontiguousarray(mask, dtype=bool)  # OpenCV needs C order (RLE decodes to Fortran order)
    if not mask.any():
        return mask.copy()
    return np.asarray(_FUNCS[recipe](mask, rng), dtype=bool)


def draw_recipe(rng: np.random.Generator, mixture: dict[str, float] = MIXTURE) -> str:
    names = list(mixture)
    p = np.asarray([mixture[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def make_coarse(mask: np.ndarray, rng: np.random.Generator, recipe: str = "mix") -> tuple[np.ndarray, str]:
    """One coarse mask for `mask`: by `recipe`, or by a recipe drawn from MIXTURE when 'mix'.
    Returns (coarse mask, recipe used)."""
    name = draw_recipe(rng) if recipe == "mix" else recipe
    return apply_recipe(mask, name, rng), name
