"""COCO run-length encoding in and out, through pycocotools (the ecosystem's format, at the edge).

An RLE here is COCO's compressed form: {"size": [h, w], "counts": str}. Polygons and uncompressed
RLE (counts as a list of ints) are accepted on input and converted once.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode(mask: np.ndarray) -> dict:
    """HxW bool -> compressed RLE with str counts (JSON-ready)."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    if m.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {m.shape}")
    rle = mask_utils.encode(m)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_many(masks: np.ndarray) -> list[dict]:
    """NxHxW bool -> list of compressed RLEs."""
    masks = np.asarray(masks, dtype=np.uint8)
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in rles]


def _as_compressed(rle: dict) -> dict:
    counts = rle["counts"]
    h, w = (int(v) for v in rle["size"])
    if isinstance(counts, list):  # uncompressed RLE
        if sum(int(c) for c in counts) != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected h*w = {h * w}")
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """Any COCO segmentation (compressed/uncompressed RLE or polygons) -> compressed RLE."""
    if isinstance(segmentation, list):  # polygons
        if not segmentation:
            return encode(np.zeros((height, width), dtype=bool))
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in segmentation], height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict):
        rle = _as_compressed(segmentation)
    else:
        raise ValueError(f"unsupported segmentation type {type(segmentation).__name__}")
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def decode(rle: dict) -> np.ndarray:
    """Compressed or uncompressed RLE -> HxW bool. Raises ValueError on corrupt counts."""
    c = _as_compressed(rle)
    h, w = c["size"]
    m = mask_utils.decode(c)
    if m.shape != (h, w):
        raise ValueError(f"RLE decodes to {m.shape}, expected {(h, w)}")
    area = int(mask_utils.area(c))
    if area != int(m.sum()):
        raise ValueError("RLE counts are inconsistent")
    return m.astype(bool)


def area(rle: dict) -> int:
    return int(mask_utils.area(_as_compressed(rle)))


def to_bbox(rle: dict) -> list[float]:
    return [float(v) for v in mask_utils.toBbox(_as_compressed(rle))]
