"""Turn the Penn-Fudan pedestrian database into a BPR data directory with detector-like inputs.

    python -m jobs.prepare_pennfudan --src ../shared/data/pennfudan --split val --out data/pennfudan-val

Writes OUT/annotations.json (COCO GT from PedMasks/*_mask.png, one category: person),
OUT/coarse.json (coarse masks made the Mask R-CNN way, as the synthetic generator does: 28x28
resampling in a jittered box, blur, bilinear paste, 0.5 threshold; some misses and false
positives) and OUT/images, a symbolic link to the source PNGImages (nothing is copied).
Split (fixed, from the data's README): sort the image names; every 5th (0-based index 4, 9, ...)
is validation, the rest training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from bpr_core import rle
from bpr_core.formats import InputError
from bpr_core.synthetic import Degradation, coarse_detections, mask_iou

from ._cli import prog_name, run_main

DEFAULT_SRC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pennfudan"


def split_names(src: Path, split: str) -> list[str]:
    names = sorted(p.name for p in (src / "PNGImages").glob("*.png"))
    if split == "all":
        return names
    val = [n for i, n in enumerate(names) if i % 5 == 4]
    return val if split == "val" else [n for n in names if n not in set(val)]


def prepare(src: Path, out: Path, split: str, seed: int = 0, params: Degradation = Degradation()) -> dict:
    if not (src / "PNGImages").is_dir() or not (src / "PedMasks").is_dir():
        raise InputError(f"Penn-Fudan not found at {src} (expected PNGImages/ and PedMasks/); it lives in ../shared/data/pennfudan")
    out.mkdir(parents=True, exist_ok=True)
    link = out / "images"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.abspath(src / "PNGImages"), link)
    images, anns, results, ious = [], [], [], []
    for i, name in enumerate(split_names(src, split)):
        labels = cv2.imread(str(src / "PedMasks" / name.replace(".png", "_mask.png")), cv2.IMREAD_UNCHANGED)
        if labels is None:
            raise InputError(f"cannot read the mask of {name}")
        h, w = labels.shape[:2]
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        objects = [(1, labels == k) for k in sorted(set(np.unique(labels)) - {0})]
        first = len(anns)
        for cat, m in objects:
            r = rle.encode(m)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "segmentation": r,
                         "area": int(m.sum()), "bbox": rle.to_bbox(r), "iscrowd": 0})
        rng = np.random.default_rng([seed, i])
        for cat, c, score, gi in coarse_detections(rng, objects, h, w, params, categories=(1,)):
            r = rle.encode(c)
            results.append({"image_id": image_id, "category_id": 1, "segmentation": r, "score": score, "bbox": rle.to_bbox(r)})
            if gi >= 0 and anns[first + gi]["area"] >= 32 * 32:
                ious.append(mask_iou(c, objects[gi][1]))
    gt = {"info": {"description": f"Penn-Fudan ({split} split), coarse seed {seed}"}, "images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "person"}]}
    (out / "annotations.json").write_text(json.dumps(gt, separators=(",", ":")))
    (out / "coarse.json").write_text(json.dumps(results, separators=(",", ":")))
    return {"images": len(images), "gt_instances": len(anns), "coarse_instances": len(results),
            "mean_coarse_iou_large": float(np.mean(ious)) if ious else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("prepare_pennfudan"), description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(DEFAULT_SRC), help=f"Penn-Fudan root (default {DEFAULT_SRC})")
    ap.add_argument("--split", choices=["train", "val", "all"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0, help="seed of the coarse-mask degradation (default 0)")
    args = ap.parse_args(argv)
    s = prepare(Path(args.src), Path(args.out), args.split, args.seed)
    print(f"wrote {s['images']} images, {s['gt_instances']} GT instances, {s['coarse_instances']} coarse detections to {args.out}; "
          f"mean coarse-to-GT IoU {s['mean_coarse_iou_large']:.3f} on objects >= 32x32 px", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
