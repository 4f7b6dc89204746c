"""Calibrate the do-no-harm rules of a checkpoint on dev-validation sets, and write them into it.

    python -m jobs.calibrate --checkpoint model.pt --sets data/coco-val data/coco-real data/ccp-val data/pf-val \
        --out calibration.json [--write model_calibrated.pt]

Each SET is a data directory (images/, annotations.json, coarse.json: `jobs.prepare_data`). The
network runs once on every coarse instance's boundary patches (official reassembly geometry);
then, for every point of a grid over the three rules

    min_area      instances with fewer coarse pixels pass through (a 64 px patch over a 15 px object)
    gate_margin   a pixel leaves its coarse value only where the mean probability is beyond 0.5 +- m
    min_keep_iou  a refined instance is kept only if its IoU with the coarse mask is at least this

every instance matched to a ground truth (IoU >= 0.5 before refinement, as jobs.evaluate) gets its
mask IoU and Boundary IoU (Cheng et al.: the 2%-of-diagonal boundary band) before and after.
A grid point is admissible when, on every set, in every size bucket (COCO's small/medium/large)
the mean IoU change is >= 0 and no true positive is lost over COCO's IoU thresholds (0.50:0.95:
the count of instances at or above each threshold, summed over the ten, does not drop) and mask
AP does not drop (COCO's AP over the set's detections at their unchanged scores, unmatched ones
as false positives: `bucket_ap`), the mean Boundary IoU change is >= 0, and at most --max-worse
of the instances lose more than 2 IoU points;
among the admissible points whose mean Boundary IoU gain (averaged over the sets) is within 2% of
the best, the safest guards win (largest gate, then acceptance threshold), then the smallest
min_area (see `search`). Only dev-validation sets may be passed here: the chosen values are part
of the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from bpr_core import rle as rle_utils
from bpr_core.config import OFFICIAL_RULES
from bpr_core.evaluation import boundary_width, mask_to_boundary
from bpr_core.formats import InputError, load_coco_gt, read_results_json
from bpr_core.patches import crop_patches, paste_patches, propose_patches
from bpr_core.synthetic import mask_iou
from bpr_core.training import match_gt

from ._cli import prog_name, run_main

GRID = {"min_area": (0, 100, 400, 1024, 2048, 4096), "gate_margin": (0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4),
        "min_keep_iou": (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)}
NEAR_BEST = 0.02  # relative: gains within 2% of the best count as a tie
SIZES = (("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2), ("large", 96 ** 2, math.inf))
AP_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCOeval's iouThrs


class Scorer:
    """Mask IoU and Boundary IoU of candidate masks against one GT, computed inside a crop that
    is exact (the crop is grown by the boundary width, so erosion sees the same zeros)."""

    def __init__(self, gt: np.ndarray, coarse: np.ndarray, boxes: np.ndarray):
        h, w = gt.shape
        self.d = boundary_width(h, w)
        ys, xs = np.nonzero(gt | coarse)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if len(boxes):
            x0, y0 = min(x0, int(boxes[:, 0].min())), min(y0, int(boxes[:, 1].min()))
            x1, y1 = max(x1, int(boxes[:, 2].max())), max(y1, int(boxes[:, 3].max()))
        p = self.d + 2
        self.sl = (slice(max(y0 - p, 0), min(y1 + p, h)), slice(max(x0 - p, 0), min(x1 + p, w)))
        self.gt = gt[self.sl]
        self.gt_b = mask_to_boundary(self.gt, d=self.d)

    def __call__(self, mask: np.ndarray) -> tuple[float, float]:
        m = mask[self.sl]
        return mask_iou(m, self.gt), mask_iou(mask_to_boundary(m, d=self.d), self.gt_b)


def collect(set_dir: Path, refiner, cfg, margins, log) -> dict:
    """One set's records: per matched detection ("matched"), its score, GT, sizes, and (IoU,
    boundary IoU, IoU with coarse) of the coarse mask and of the refined mask at each gate margin;
    the detections no GT matches ("unmatched": score and area, false positives at every
    threshold); and every ground truth's area ("gt_areas": AP's recall counts the missed ones)."""
    from bpr_core.imageio import decode_image

    gt_file, coarse_file = set_dir / "annotations.json", set_dir / "coarse.json"
    for f in (gt_file, coarse_file, set_dir / "images"):
        if not f.exists():
            raise InputError(f"{f} not found: a set is a data directory written by jobs.prepare_data")
    coco = load_coco_gt(gt_file)
    rows = read_results_json(coarse_file)
    by_image: dict[int, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    out, unmatched = [], []
    gt_areas = [(float(a["area"]), int(a["category_id"])) for a in coco.dataset.get("annotations", []) if not a.get("iscrowd", 0)]
    t0 = time.time()
    for n, (image_id, dets) in enumerate(sorted(by_image.items())):
        info = coco.loadImgs([image_id])[0]
        image = decode_image((set_dir / "images" / info["file_name"]).read_bytes(), info["file_name"])
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd", 0)]
        for r in dets:
            coarse = rle_utils.decode({"size": [r["rle_h"], r["rle_w"]], "counts": r["rle_counts"]})
            cands = [a for a in anns if a["category_id"] == r["category_id"]]
            j, iou0 = match_gt(coarse, [coco.annToMask(a).astype(bool) for a in cands], 0.5)
            score = float(r.get("score", 1.0))
            if j < 0 or not coarse.any():
                unmatched.append({"score": score, "coarse_area": int(coarse.sum()), "category_id": int(r["category_id"])})
                continue
            gt = coco.annToMask(cands[j]).astype(bool)
            boxes = propose_patches(coarse, cfg)
            sc = Scorer(gt, coarse, boxes)
            rec = {"set": set_dir.name, "gt_area": float(cands[j]["area"]), "coarse_area": int(coarse.sum()),
                   "score": score, "gt_id": int(cands[j]["id"]), "category_id": int(r["category_id"]), "before": sc(coarse), "after": []}
            if len(boxes):
                probs = refiner.predict(crop_patches(image, boxes, cfg), crop_patches(coarse.view(np.uint8), boxes, cfg))
                probs = np.clip(np.rint(probs * 255), 0, 255).astype(np.uint8)  # as the pipeline carries them
                for m in margins:
                    refined = paste_patches(coarse, boxes, probs, cfg.replace(gate_margin=m))
                    rec["after"].append((*sc(refined), mask_iou(refined, coarse)))
            else:
                rec["after"] = [(*rec["before"], 1.0)] * len(margins)
            out.append(rec)
        if (n + 1) % 25 == 0:
            log(f"  {set_dir.name}: {n + 1}/{len(by_image)} images, {len(out)} matched instances, {time.time() - t0:.0f} s")
    return {"matched": out, "unmatched": unmatched, "gt_areas": gt_areas}


def bucket_ap(ious: np.ndarray, recs: list[dict], unmatched: list[dict], gt_areas, lo: float, hi: float) -> float:
    """COCO mask AP of one size bucket from each matched detection's IoU with its GT: per category,
    the mean over IoU 0.50:0.95 of 101-point interpolated precision, then the mean over the
    categories that have a GT in the bucket. As COCOeval: GTs outside the bucket are ignored and so
    are the detections that match them; a detection that matches nothing at a threshold (below it,
    or its GT taken by a higher score) is a false positive when its area is in the bucket.
    Approximations: a detection only ever matches the GT it matched at 0.5, and its area is its
    coarse area. `gt_areas` holds (area, category_id) of every GT. NaN when no GT is in the bucket."""
    npos: dict[int, int] = {}
    for area, cat in gt_areas:
        if lo <= area < hi:
            npos[cat] = npos.get(cat, 0) + 1
    if not npos:
        return float("nan")
    dets = [(r["score"], r["gt_id"], float(iou), lo <= r["gt_area"] < hi, lo <= r["coarse_area"] < hi, r["category_id"])
            for r, iou in zip(recs, ious)]
    dets += [(u["score"], -1, -1.0, False, lo <= u["coarse_area"] < hi, u["category_id"]) for u in unmatched]
    dets.sort(key=lambda d: -d[0])  # stable, as COCOeval's mergesort
    per_cat = []
    for cat, n in sorted(npos.items()):
        mine = [d for d in dets if d[5] == cat]
        aps = []
        for t in AP_THRESHOLDS:
            taken, tp = set(), []
            for _, gid, iou, gt_in, det_in, _ in mine:
                if iou >= t and gid not in taken:
                    taken.add(gid)
                    if gt_in:
                        tp.append(1)
                    continue  # a match with an ignored GT is ignored
                if det_in:
                    tp.append(0)
            if not tp:
                aps.append(0.0)
                continue
            tpc = np.cumsum(tp, dtype=float)
            recall, precision = tpc / n, tpc / np.arange(1, len(tp) + 1)
            precision = np.maximum.accumulate(precision[::-1])[::-1]
            idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
            aps.append(float(np.where(idx < len(tp), precision[np.minimum(idx, len(tp) - 1)], 0.0).mean()))
        per_cat.append(np.mean(aps))
    return float(np.mean(per_cat))


def score_point(records: dict, mi: int, min_area: int, min_keep_iou: float) -> dict:
    """Per-set summary of one grid point (`records` as collect() returns them)."""
    recs = records["matched"]
    b = np.array([r["before"] for r in recs])
    a = np.array([r["after"][mi] for r in recs])
    keep = np.array([r["coarse_area"] >= min_area for r in recs]) & (a[:, 2] >= min_keep_iou)
    after = np.where(keep[:, None], a[:, :2], b)
    d_iou, d_b = after[:, 0] - b[:, 0], after[:, 1] - b[:, 1]
    area = np.array([r["gt_area"] for r in recs])
    sizes = {}
    for name, lo, hi in SIZES:
        sel = (area >= lo) & (area < hi)
        if sel.any():
            # true positives gained (+) or lost (-) over the ten thresholds
            d_hits = int((after[sel, 0, None] >= AP_THRESHOLDS).sum()) - int((b[sel, 0, None] >= AP_THRESHOLDS).sum())
            sizes[name] = {"n": int(sel.sum()), "d_iou": float(d_iou[sel].mean()), "d_boundary_iou": float(d_b[sel].mean()),
                           "d_hits": d_hits}
            sizes[name]["ap_before"] = bucket_ap(b[:, 0], recs, records["unmatched"], records["gt_areas"], lo, hi)
            sizes[name]["ap_after"] = bucket_ap(after[:, 0], recs, records["unmatched"], records["gt_areas"], lo, hi)
    return {"n": len(recs), "d_iou": float(d_iou.mean()), "d_boundary_iou": float(d_b.mean()),
            "worse_gt_2pts": float((d_iou < -0.02).mean()), "improved": float((d_iou > 0).mean()),
            "refined_share": float(keep.mean()), "sizes": sizes}


def admissible_set(fig: dict, max_worse: float) -> bool:
    """One set's figures at one grid point pass: few instances worse by > 2 points, Boundary IoU
    not down, and in every size bucket mean IoU, true positives and mask AP not down."""
    def bucket_ok(b: dict) -> bool:
        return b["d_iou"] >= 0 and b["d_hits"] >= 0 and not b["ap_after"] < b["ap_before"] - 1e-12  # (NaN: no GT, passes)

    return fig["worse_gt_2pts"] <= max_worse and fig["d_boundary_iou"] >= 0 and all(bucket_ok(b) for b in fig["sizes"].values())


def search(per_set: dict, max_worse: float) -> tuple[dict, list[dict]]:
    points = []
    for gi, m in enumerate(GRID["gate_margin"]):
        for k in GRID["min_keep_iou"]:
            for a in GRID["min_area"]:
                res = {name: score_point(recs, gi, a, k) for name, recs in per_set.items()}
                ok = all(admissible_set(r, max_worse) for r in res.values())
                gain = float(np.mean([r["d_boundary_iou"] for r in res.values()]))
                points.append({"min_area": a, "gate_margin": m, "min_keep_iou": k, "admissible": ok, "mean_d_boundary_iou": gain, "sets": res})
    admissible = [p for p in points if p["admissible"]]
    pool = admissible or points
    # Near-ties (within NEAR_BEST of the best gain) go to the safest guards: the largest gate, then
    # the largest acceptance threshold. Those two judge every pixel and every instance, whatever
    # its size, so on sets we do not have they harm less for the same measured gain. Then the
    # smallest min_area: it passes objects through unexamined, and a near-tie means the guards
    # already keep the small objects from harm on every dev-val set, so a larger one would only
    # give up their gain (README: the largest used to win, 2,048 px on this grid).
    top = max(p["mean_d_boundary_iou"] for p in pool)
    near = [p for p in pool if p["mean_d_boundary_iou"] >= top - NEAR_BEST * abs(top)]
    best = max(near, key=lambda p: (p["gate_margin"], p["min_keep_iou"], -p["min_area"]))
    return best, points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("calibrate"), description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="model to calibrate (default: the shipped model)")
    ap.add_argument("--sets", nargs="+", required=True, help="dev-validation data directories")
    ap.add_argument("--out", default="calibration.json", help="full grid and the choice, as JSON (default calibration.json)")
    ap.add_argument("--write", metavar="PT", help="write a copy of the checkpoint whose config carries the chosen rules")
    ap.add_argument("--max-worse", type=float, default=0.05, help="largest admissible share of instances worse by > 2 IoU points (default 0.05)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--records", metavar="DIR", help="keep each set's network outputs here and reuse them while the checkpoint, "
                    "TTA, the set's files and the grid's margins are unchanged (to try rules without rerunning the network)")
    ap.add_argument("--tta", action="store_true", help="run the network with flip test-time augmentation (stored in the written config)")
    args = ap.parse_args(argv)
    import torch

    from bpr_core.refiner import DEFAULT_WEIGHTS, load_checkpoint, make_patch_refiner, save_checkpoint

    torch.set_num_threads(max(1, args.threads))
    ckpt = Path(args.checkpoint) if args.checkpoint else DEFAULT_WEIGHTS
    if not ckpt.is_file():
        raise InputError(f"checkpoint not found: {ckpt}")
    refiner, cfg, card = make_patch_refiner("network", ckpt, "cpu", {**OFFICIAL_RULES, "tta_flip": args.tta})

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    per_set = {}
    for s in args.sets:
        d = Path(s)
        cache = Path(args.records) / f"{d.name}.json" if args.records else None
        # the network's outputs for one set depend on the weights, TTA, the set's files and the margins
        key = hashlib.sha256(b"|".join([ckpt.read_bytes(), str(args.tta).encode(), json.dumps(GRID["gate_margin"]).encode()]
                                       + [(d / f).read_bytes() for f in ("annotations.json", "coarse.json")])).hexdigest()
        kept = json.loads(cache.read_text()) if cache and cache.is_file() else {}
        if kept.get("key") == key:
            log(f"{d}: records reused from {cache}")
            per_set[d.name] = kept["records"]
            continue
        log(f"running {card.get('name')} on {d} ...")
        per_set[d.name] = collect(d, refiner, cfg, GRID["gate_margin"], log)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "records": per_set[d.name]}))
    best, points = search(per_set, args.max_worse)
    off = next(p for p in points if p["min_area"] == 0 and p["gate_margin"] == 0 and p["min_keep_iou"] == 0)
    report = {"checkpoint": str(ckpt), "tta_flip": args.tta, "sets": args.sets, "max_worse": args.max_worse, "grid": GRID,
              "chosen": {k: best[k] for k in ("min_area", "gate_margin", "min_keep_iou")}, "admissible": best["admissible"],
              "chosen_figures": best["sets"], "official_figures": off["sets"], "points": points}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{'set':<16} {'rule':<9} {'n':>5} {'dIoU':>7} {'dBndIoU':>8} {'worse>2':>8} {'refined':>8}  per size dIoU")
    for name in per_set:
        for label, fig in (("official", off["sets"][name]), ("chosen", best["sets"][name])):
            sizes = " ".join(f"{k[0]}:{v['d_iou'] * 100:+.2f}" + (f" (AP {v['ap_before'] * 100:.1f}->{v['ap_after'] * 100:.1f})"
                                                                   if "ap_after" in v else "") for k, v in fig["sizes"].items())
            print(f"{name:<16} {label:<9} {fig['n']:>5} {fig['d_iou'] * 100:>+7.2f} {fig['d_boundary_iou'] * 100:>+8.2f} "
                  f"{fig['worse_gt_2pts'] * 100:>7.1f}% {fig['refined_share'] * 100:>7.0f}%  {sizes}")
    print(f"chosen: {report['chosen']} ({'admissible' if best['admissible'] else 'NO grid point is admissible: best effort'}); "
          f"full grid in {args.out}")
    if args.write:
        loaded = load_checkpoint(ckpt)
        new_cfg = loaded.config.replace(**report["chosen"], tta_flip=args.tta)
        card = dict(loaded.model_card)
        card["do_no_harm"] = {**report["chosen"], "tta_flip": args.tta, "calibrated_on": [Path(s).name for s in args.sets],
                              "rule": f"max over the grid of the mean Boundary IoU gain, subject to: per set, mean IoU change >= 0, "
                                      f"no true positive lost over IoU 0.50:0.95 and mask AP not lower in every size bucket, mean Boundary IoU change >= 0 and <= {args.max_worse:.0%} of instances "
                                      "worse by > 2 IoU points"}
        save_checkpoint(args.write, loaded.model, new_cfg, card)
        print(f"wrote {args.write} with config {report['chosen']}")
    return 0 if best["admissible"] else 1


if __name__ == "__main__":
    run_main(main)
