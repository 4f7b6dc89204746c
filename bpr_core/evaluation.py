"""Evaluation: COCO mask AP, Boundary AP, and per-instance IoU change before/after refinement.

Mask AP is pycocotools' COCOeval (segm). Boundary AP follows Cheng et al., "Boundary IoU"
(CVPR 2021): the boundary region of a mask is the mask minus its erosion by d = 0.02 x image
diagonal pixels (outside the image counts as background), and a detection's matching score is
min(mask IoU, boundary IoU); AP is then computed exactly as COCOeval does, over the same IoU
thresholds, by swapping COCOeval's IoU function.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections import defaultdict

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval


STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def boundary_width(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """Boundary IoU's band width d in pixels for an image of this size."""
    return max(1, int(round(dilation_ratio * math.sqrt(height * height + width * width))))


def mask_to_boundary(mask: np.ndarray, dilation_ratio: float = 0.02, d: int | None = None) -> np.ndarray:
    """HxW bool -> HxW bool boundary region: pixels of the mask within d of the background
    (outside the array counts as background). d defaults to the array's own boundary_width; pass
    the full image's d when `mask` is a crop."""
    mask = np.asarray(mask, dtype=np.uint8)
    h, w = mask.shape
    d = boundary_width(h, w, dilation_ratio) if d is None else d
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return (mask > 0) & (eroded == 0)


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


class BoundaryCOCOeval(COCOeval):
    """COCOeval whose IoU is min(mask IoU, boundary IoU)."""

    def __init__(self, coco_gt, coco_dt, dilation_ratio: float = 0.02):
        super().__init__(coco_gt, coco_dt, "segm")
        self.dilation_ratio = dilation_ratio
        self._boundary: dict[tuple[str, int], dict] = {}

    def _boundary_rle(self, ann: dict, kind: str) -> dict:
        key = (kind, ann["id"])
        if key not in self._boundary:
            seg = ann["segmentation"]
            m = mask_utils.decode(seg if isinstance(seg["counts"], bytes) else {"size": seg["size"], "counts": seg["counts"].encode()})
            b = mask_to_boundary(m.astype(bool), self.dilation_ratio)
            self._boundary[key] = mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))
        return self._boundary[key]

    def computeIoU(self, imgId, catId):
        miou = super().computeIoU(imgId, catId)
        if len(miou) == 0:
            return miou
        p = self.params
        gt = self._gts[imgId, catId] if p.useCats else [g for c in p.catIds for g in self._gts[imgId, c]]
        dt = self._dts[imgId, catId] if p.useCats else [d for c in p.catIds for d in self._dts[imgId, c]]
        inds = np.argsort([-d["score"] for d in dt], kind="mergesort")  # COCOeval's own order
        dt = [dt[i] for i in inds][: p.maxDets[-1]]
        g = [self._boundary_rle(a, "gt") for a in gt]
        d = [self._boundary_rle(a, "dt") for a in dt]
        biou = mask_utils.iou(d, g, [int(a["iscrowd"]) for a in gt])
        return np.minimum(miou, biou)


def _run(coco_gt, results: list[dict], boundary: bool) -> dict:
    if not results:
        return {k: 0.0 for k in STAT_NAMES}
    coco_dt = _quiet(coco_gt.loadRes, copy.deepcopy(results))
    ev = BoundaryCOCOeval(coco_gt, coco_dt) if boundary else COCOeval(coco_gt, coco_dt, "segm")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    return {k: float(v) * 100.0 for k, v in zip(STAT_NAMES, ev.stats[:6])}


def best_gt_iou(coco_gt, results: list[dict]) -> np.ndarray:
    """Per detection: the highest mask IoU with a non-crowd GT instance of its image and category."""
    by_key = defaultdict(list)
    for i, r in enumerate(results):
        by_key[(r["image_id"], r["category_id"])].append(i)
    out = np.zeros(len(results))
    for (img, cat), idx in by_key.items():
        anns = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[img], catIds=[cat])) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        g = [coco_gt.annToRLE(a) for a in anns]
        d = [_as_rle(results[i]["segmentation"]) for i in idx]
        ious = mask_utils.iou(d, g, [0] * len(g))
        out[idx] = np.asarray(ious).max(axis=1)
    return out


def _as_rle(seg: dict) -> dict:
    c = seg["counts"]
    return {"size": seg["size"], "counts": c.encode() if isinstance(c, str) else c}


def iou_change(coco_gt, before: list[dict], after: list[dict], matched_iou: float = 0.5, worse_by: float = 0.02) -> dict:
    """Per-instance IoU with GT, before vs after, over detections that match a GT (IoU >= 0.5
    before). Instances are paired by `instance_id` where both files carry it, else by position."""
    def key(r, i):
        return (r["image_id"], r.get("instance_id", i))

    after_index = {key(r, i): i for i, r in enumerate(after)}
    pairs = [(i, after_index.get(key(r, i))) for i, r in enumerate(before)]
    missing = sum(1 for _, j in pairs if j is None)
    pairs = [(i, j) for i, j in pairs if j is not None]
    ib, ia = best_gt_iou(coco_gt, before), best_gt_iou(coco_gt, after)
    sel = [(ib[i], ia[j]) for i, j in pairs if ib[i] >= matched_iou]
    if not sel:
        return {"instances": 0, "unpaired": missing}
    b, a = np.array(sel).T
    delta = a - b
    return {
        "instances": int(len(sel)),
        "unpaired": int(missing),
        "mean_iou_before": float(b.mean()),
        "mean_iou_after": float(a.mean()),
        "mean_change": float(delta.mean()),
        "frac_improved": float((delta > 0).mean()),
        "frac_worsened_gt_2pts": float((delta < -worse_by).mean()),
    }


def evaluate_results(coco_gt, results: list[dict]) -> dict:
    """Mask AP and Boundary AP (both 0-100) for one list of COCO results entries."""
    return {"mask": _run(coco_gt, results, boundary=False), "boundary": _run(coco_gt, results, boundary=True),
            "detections": len(results)}


def gt_as_results(coco_gt) -> list[dict]:
    """The ground truth written as detections (score 1): the evaluation's upper bound."""
    out = []
    for a in coco_gt.loadAnns(coco_gt.getAnnIds()):
        r = coco_gt.annToRLE(a)
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                    "segmentation": {"size": list(r["size"]), "counts": r["counts"].decode() if isinstance(r["counts"], bytes) else r["counts"]},
                    "instance_id": a["id"]})
    return out


def results_from_rows(rows) -> list[dict]:
    from .formats import row_to_result

    return [row_to_result(r) for r in rows]


__all__ = ["mask_to_boundary", "BoundaryCOCOeval", "evaluate_results", "iou_change", "best_gt_iou", "gt_as_results",
           "results_from_rows", "STAT_NAMES"]
