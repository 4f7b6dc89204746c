"""Before/after pictures, written by `jobs.refine --visualize N` (or `--visualize-ids ...`).

The N images whose masks changed most (changed pixels, summed over their instances; ties by
image id) or the images the user names get one PNG each: the coarse contour (magenta) and the
refined contour (green) over the dimmed photo, the proposed patches (thin yellow boxes), and a
legend. Every line has a black halo, so it stays visible on any background, and the picture is
scaled so its longer side is at most `max_side` pixels (small images are enlarged up to 2x).
`most_changed.png` puts the most-changed instances of the run side by side: coarse | refined.
Changes are measured on the compressed RLEs (pycocotools), so ranking a run reads no image.
"""

from __future__ import annotations

import heapq

import cv2
import numpy as np

from bpr_core import BPRConfig, propose_patches
from bpr_core import rle as rle_utils

from . import storage
from .stages import ImageReader, ImageUnusable

COARSE, REFINED, PATCH = (255, 60, 255), (60, 255, 90), (255, 220, 0)  # RGB
HALO = (0, 0, 0)
MAX_SIDE = 1600


def changed_pixels(coarse_rle: dict, refined_rle: dict) -> int:
    """|coarse XOR refined| from the compressed RLEs, without decoding them."""
    from pycocotools import mask as mask_utils

    a = int(mask_utils.area(coarse_rle))
    b = int(mask_utils.area(refined_rle))
    union = int(mask_utils.area(mask_utils.merge([coarse_rle, refined_rle], intersect=False)))
    return 2 * union - a - b


def _key(r: dict) -> tuple:
    return (r["source_file"], r["image_id"], r["instance_id"])


def rank_changes(shards, refined_for, n_images: int, n_instances: int = 8):
    """Stream the shards (input rows with coarse RLEs) against their refined RLEs
    (`refined_for(i)` -> {(source_file, image_id, instance_id): counts} of shard i's refined
    instances) -> (top images [(changed, image_id)], top instances [(changed, row with
    "refined_counts")]), largest first. Holds one shard and the top lists at a time."""
    images: list = []
    instances: list = []
    for i, shard_rows in enumerate(shards):
        refined = refined_for(i) if shard_rows else {}
        per_image: dict[int, int] = {}
        for r in shard_rows:
            counts = refined.get(_key(r))
            if counts is None:
                continue
            size = [int(r["rle_h"]), int(r["rle_w"])]
            change = changed_pixels(_rle(size, r["rle_counts"]), _rle(size, counts))
            per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + change
            if change:
                _push(instances, n_instances, (change, -r["image_id"], -r["instance_id"]), {**r, "refined_counts": counts})
        for image_id, change in per_image.items():
            if change:
                _push(images, n_images, (change, -image_id), image_id)
    return ([(k[0], v) for k, v in sorted(images, key=lambda e: e[0], reverse=True)],
            [(k[0], v) for k, v in sorted(instances, key=lambda e: e[0], reverse=True)])


def _push(heap: list, n: int, key: tuple, value) -> None:
    if n <= 0:
        return
    item = (key, value)
    if len(heap) < n:
        heapq.heappush(heap, item)
    elif key > heap[0][0]:
        heapq.heapreplace(heap, item)


def _rle(size, counts) -> dict:
    return {"size": list(size), "counts": counts.encode() if isinstance(counts, str) else counts}


def _scale_for(h: int, w: int, max_side: int) -> float:
    return min(2.0, max_side / max(h, w))


def _contour(vis: np.ndarray, mask: np.ndarray, colour) -> None:
    h, w = vis.shape[:2]
    up = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(vis, contours, -1, HALO, 3)
    cv2.drawContours(vis, contours, -1, colour, 1)


def _legend(vis: np.ndarray, items: list[tuple[str, tuple]]) -> None:
    font, fs, th = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    widths = [cv2.getTextSize(t, font, fs, th)[0][0] for t, _ in items]
    bh, bw = 8 + 18 * len(items), 40 + max(widths)
    bh, bw = min(bh, vis.shape[0]), min(bw, vis.shape[1])
    box = vis[:bh, :bw]
    box[:] = (box.astype(np.float32) * 0.3).astype(np.uint8)
    for k, (text, colour) in enumerate(items):
        y = 16 + 18 * k
        cv2.line(vis, (6, y - 4), (26, y - 4), HALO, 4)
        cv2.line(vis, (6, y - 4), (26, y - 4), colour, 2)
        cv2.putText(vis, text, (32, y), font, fs, (255, 255, 255), th, cv2.LINE_AA)


def overlay(image: np.ndarray, coarse: list[np.ndarray], refined: list[np.ndarray], config: BPRConfig,
            max_side: int = MAX_SIDE, legend: bool = True) -> np.ndarray:
    """HxWx3 RGB + per-instance masks -> an RGB picture whose longer side is at most max_side."""
    h, w = image.shape[:2]
    scale = _scale_for(h, w, max_side)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA
    vis = (cv2.resize(image, size, interpolation=interp).astype(np.float32) * 0.75).astype(np.uint8)
    for c in coarse:
        for x1, y1, x2, y2 in propose_patches(c, config):
            p1 = (int(x1 * scale), int(y1 * scale))
            p2 = (int(x2 * scale) - 1, int(y2 * scale) - 1)
            cv2.rectangle(vis, p1, p2, PATCH, 1)
    for masks, colour in ((coarse, COARSE), (refined, REFINED)):
        for m in masks:
            _contour(vis, m, colour)
    if legend:
        _legend(vis, [("coarse (input)", COARSE), ("refined (BPR)", REFINED), ("patch", PATCH)])
    return vis


def side_by_side(items: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], cell: int = 256) -> np.ndarray:
    """Rows of (image crop, coarse crop, refined crop, label) -> one picture: coarse | refined."""
    rows = []
    for image, coarse, refined, label in items:
        panels = []
        for mask, colour, name in ((coarse, COARSE, "coarse"), (refined, REFINED, "refined")):
            h, w = image.shape[:2]
            s = cell / max(h, w)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            pic = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST if s >= 1 else cv2.INTER_AREA)
            pic = (pic.astype(np.float32) * 0.75).astype(np.uint8)
            _contour(pic, mask, colour)
            canvas = np.zeros((cell + 20, cell, 3), np.uint8)
            canvas[20 : 20 + pic.shape[0], : pic.shape[1]] = pic
            cv2.putText(canvas, f"{name}: {label}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
            panels.append(canvas)
        rows.append(np.concatenate([panels[0], np.full((cell + 20, 4, 3), 255, np.uint8), panels[1]], axis=1))
    return np.concatenate(rows, axis=0)


def write_visualizations(n: int, shards, refined_for, images_uri: str, out: storage.Location, config: BPRConfig,
                         reader: ImageReader | None = None, image_ids: list[int] | None = None,
                         max_side: int = MAX_SIDE, n_instances: int = 8) -> list[str]:
    """Overlays of the `n` most-changed images (or of `image_ids`) -> OUT/visualize/<image_id>.png,
    and the most-changed instances -> OUT/visualize/most_changed.png. `refined_for(i)` gives shard
    i's refined RLEs (see rank_changes). Returns the URIs written."""
    reader = reader or ImageReader(images_uri)
    top_images, top_instances = rank_changes(shards, refined_for, 0 if image_ids else n, n_instances)
    wanted = list(dict.fromkeys(image_ids)) if image_ids else [image_id for _, image_id in top_images]
    pictures: dict[int, str] = {}
    for i, shard_rows in enumerate(shards):
        by_image: dict[int, list[dict]] = {}
        for r in shard_rows:
            if r["image_id"] in wanted:
                by_image.setdefault(r["image_id"], []).append(r)
        if not by_image:
            continue
        refined = refined_for(i)
        for image_id, rows in by_image.items():
            try:
                image = reader.read(rows[0]["file_name"])[0]
            except ImageUnusable:
                continue  # its instances were quarantined; nothing to draw
            size = [int(rows[0]["rle_h"]), int(rows[0]["rle_w"])]
            coarse = [rle_utils.decode({"size": size, "counts": r["rle_counts"]}) for r in rows]
            after = [rle_utils.decode({"size": size, "counts": refined.get(_key(r), r["rle_counts"])}) for r in rows]
            pictures[image_id] = _write_png(out.join("visualize", f"{int(image_id)}.png"), overlay(image, coarse, after, config, max_side))
    written = [pictures[i] for i in wanted if i in pictures]
    if top_instances:
        written.append(_write_png(out.join("visualize", "most_changed.png"), _instance_panel(top_instances, reader)))
    return written


def _instance_panel(top_instances, reader: ImageReader) -> np.ndarray:
    items, cache = [], {}
    for change, r in top_instances:
        if r["file_name"] not in cache:
            cache[r["file_name"]] = reader.read(r["file_name"])[0]
        image = cache[r["file_name"]]
        size = [int(r["rle_h"]), int(r["rle_w"])]
        coarse = rle_utils.decode({"size": size, "counts": r["rle_counts"]})
        refined = rle_utils.decode({"size": size, "counts": r["refined_counts"]})
        ys, xs = np.nonzero(coarse | refined)
        pad = max(8, int(0.15 * max(ys.max() - ys.min(), xs.max() - xs.min())))
        y0, y1 = max(0, ys.min() - pad), min(size[0], ys.max() + pad + 1)
        x0, x1 = max(0, xs.min() - pad), min(size[1], xs.max() + pad + 1)
        label = f"image {r['image_id']} inst {r['instance_id']}, {change} px changed"
        items.append((image[y0:y1, x0:x1], coarse[y0:y1, x0:x1], refined[y0:y1, x0:x1], label))
    return side_by_side(items)


def _write_png(loc: storage.Location, rgb: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"cannot encode {loc.uri} as PNG")
    storage.write_bytes_atomic(loc, png.tobytes())
    return loc.uri
