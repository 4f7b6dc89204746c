"""Before/after pictures: coarse contour (red) and refined contour (green) over the image, with the
proposed patches drawn (thin yellow boxes). Written by `jobs.refine --visualize N`."""

from __future__ import annotations

import cv2
import numpy as np

from bpr_core import BPRConfig, propose_patches
from bpr_core import rle as rle_utils

from . import storage
from .stages import ImageReader


def overlay(image: np.ndarray, coarse: list[np.ndarray], refined: list[np.ndarray], config: BPRConfig, scale: int = 2) -> np.ndarray:
    """HxWx3 RGB + per-instance masks -> (scale*H)x(scale*W)x3 RGB picture."""
    h, w = image.shape[:2]
    big = cv2.resize(image, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    vis = (big.astype(np.float32) * 0.75).astype(np.uint8)
    for c in coarse:
        for x1, y1, x2, y2 in propose_patches(c, config):
            cv2.rectangle(vis, (int(x1) * scale, int(y1) * scale), (int(x2) * scale - 1, int(y2) * scale - 1), (230, 200, 40), 1)
    for masks, colour in ((coarse, (255, 60, 60)), (refined, (60, 255, 90))):
        for m in masks:
            up = cv2.resize(m.astype(np.uint8), (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(up, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(vis, contours, -1, colour, 1)
    return vis


def write_visualizations(n: int, shards: list[list[dict]], refined_rows: dict, images_uri: str, out: storage.Location,
                         config: BPRConfig, reader: ImageReader | None = None) -> list[str]:
    """The first `n` images (by id) that have refined instances -> OUT/visualize/<image_id>.png.
    `reader` carries the job's image policies (path confinement, EXIF, pixel limit)."""
    reader = reader or ImageReader(images_uri)
    written: list[str] = []
    for shard_rows in shards:  # shards hold consecutive image ids; stop reading once n are drawn
        if len(written) >= n:
            break
        by_image: dict[int, list[dict]] = {}
        for r in shard_rows:
            if (r["image_id"], r["instance_id"]) in refined_rows:
                by_image.setdefault(r["image_id"], []).append(r)
        for image_id in sorted(by_image):
            if len(written) >= n:
                break
            written.append(_draw(image_id, by_image[image_id], refined_rows, reader, out, config))
    return written


def _draw(image_id: int, rows: list[dict], refined_rows: dict, reader: ImageReader, out: storage.Location,
          config: BPRConfig) -> str:
    """One overlay PNG -> its URI."""
    image = reader.read(rows[0]["file_name"])[0]
    size = lambda r: [int(r["rle_h"]), int(r["rle_w"])]  # noqa: E731
    coarse = [rle_utils.decode({"size": size(r), "counts": r["rle_counts"]}) for r in rows]
    refined = [rle_utils.decode({"size": size(r), "counts": refined_rows[(image_id, r["instance_id"])]}) for r in rows]
    ok, png = cv2.imencode(".png", cv2.cvtColor(overlay(image, coarse, refined, config), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"cannot encode the overlay of image {image_id} as PNG")
    loc = out.join("visualize", f"{int(image_id)}.png")
    storage.write_bytes_atomic(loc, png.tobytes())
    return loc.uri
