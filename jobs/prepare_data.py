"""Turn the real photo sets in ../shared/data into BPR data directories (what jobs.train reads).

    python -m jobs.prepare_data --set coco --split train --recipe mix --draws 2 --out data/coco-train
    python -m jobs.prepare_data --set coco-real --out data/coco-real      # dev-val: real detector masks
    python -m jobs.prepare_data --recipe-report docs/coarse_recipes.json  # coarse-IoU per recipe

Sets: `coco` (coco-train/: 431 COCO train2017 photos, 80 classes), `ccp` (ccp-persons/: 1,004
fashion photos, one person each), `pennfudan` (170 street photos) and `coco-real` (the 328 real
detector masks of coco-train/detections_real.json on their 43 photos, with those photos' full GT).
Each OUT holds images/ (a symbolic link to the source photos), annotations.json (COCO GT) and
coarse.json (COCO results). Coarse masks come from `bpr_core.coarse`: one recipe (e.g.
maskrcnn28, the Mask R-CNN way) or `mix`, a recipe drawn per instance; --draws N writes N coarse
masks per instance.

Splits are fixed so figures compare: sort the ids (COCO image ids, CCP and Penn-Fudan file
names); every 5th (0-based index 4, 9, ...) is validation. The 43 photos that carry real
detections are never in a training split (they are dev-validation through `coco-real`, whichever
split their id falls in), so no dev-val photo is ever trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from bpr_core import rle
from bpr_core.coarse import RECIPES, apply_recipe, make_coarse
from bpr_core.formats import InputError
from bpr_core.synthetic import mask_iou

from ._cli import prog_name, run_main
from .prepare_pennfudan import split_names

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SETS = ("coco", "coco-real", "ccp", "pennfudan")


@dataclass
class Photo:
    file_name: str  # relative to the set's image folder
    height: int
    width: int
    objects: Callable[[], list[tuple[int, np.ndarray, int]]]  # -> [(category_id, mask, iscrowd)]
    source_id: int | None = None  # the image id in the source set, where it has one


def is_val(index: int) -> bool:
    return index % 5 == 4


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{what} not found at {path}; the real sets live in ../shared/data (see its README)")


def real_detection_image_ids(root: Path) -> set[int]:
    p = root / "coco-train" / "detections_real.json"
    _require(p, "coco-train/detections_real.json")
    return {int(d["image_id"]) for d in json.loads(p.read_text())}


def coco_photos(root: Path, split: str) -> tuple[Path, list[Photo], list[dict]]:
    src = root / "coco-train"
    _require(src / "instances.json", "coco-train/instances.json")
    gt = json.loads((src / "instances.json").read_text())
    ids = sorted(im["id"] for im in gt["images"])
    real = real_detection_image_ids(root)
    if split == "val":
        keep = {i for n, i in enumerate(ids) if is_val(n)}
    elif split == "train":
        keep = {i for n, i in enumerate(ids) if not is_val(n)} - real
    elif split == "real":
        keep = real
    else:
        keep = set(ids)
    by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    photos = []
    for im in sorted(gt["images"], key=lambda im: im["id"]):
        if im["id"] not in keep:
            continue
        anns = by_image.get(im["id"], [])
        h, w = im["height"], im["width"]

        def objects(anns=anns, h=h, w=w):
            return [(a["category_id"], rle.decode(rle.segmentation_to_rle(a["segmentation"], h, w)), int(a.get("iscrowd", 0)))
                    for a in anns]

        photos.append(Photo(Path(im["file_name"]).name, h, w, objects, im["id"]))
    return src / "images", photos, gt["categories"]


def _label_photos(names: list[str], split: str, label_path: Callable[[str], Path], to_objects) -> list[Photo]:
    """Photos whose ground truth is a label image: `to_objects(labels)` -> [(category, mask, 0)].
    Labels are re-read when objects are asked for, so a set's masks are never all in memory."""
    photos = []
    for n, name in enumerate(names):
        if split != "all" and (split == "val") != is_val(n):
            continue
        path = label_path(name)
        labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if labels is None:
            raise InputError(f"cannot read {path}")
        photos.append(Photo(name, labels.shape[0], labels.shape[1],
                            lambda path=path: to_objects(cv2.imread(str(path), cv2.IMREAD_UNCHANGED))))
    return photos


def ccp_photos(root: Path, split: str) -> tuple[Path, list[Photo], list[dict]]:
    src = root / "ccp-persons"
    _require(src / "masks", "ccp-persons/masks")
    names = sorted(p.name for p in (src / "images").glob("*.jpg"))
    photos = _label_photos(names, split, lambda name: src / "masks" / (Path(name).stem + ".png"),
                           lambda labels: [(1, labels > 127, 0)])  # 255 = the person
    return src / "images", photos, [{"id": 1, "name": "person"}]


def pennfudan_photos(root: Path, split: str) -> tuple[Path, list[Photo], list[dict]]:
    src = root / "pennfudan"
    _require(src / "PedMasks", "pennfudan/PedMasks")
    photos = _label_photos(split_names(src, split), "all", lambda name: src / "PedMasks" / name.replace(".png", "_mask.png"),
                           lambda labels: [(1, labels == k, 0) for k in sorted(set(np.unique(labels).tolist()) - {0})])
    return src / "PNGImages", photos, [{"id": 1, "name": "person"}]


def _link_images(out: Path, image_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    link = out / "images"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.abspath(image_dir), link)


def write_data_dir(out: Path, image_dir: Path, photos: list[Photo], categories: list[dict], recipe: str, seed: int,
                   draws: int = 1, description: str = "", progress: bool = True) -> dict:
    """Write OUT/{images -> image_dir, annotations.json, coarse.json}; returns per-recipe IoUs."""
    _link_images(out, image_dir)
    images, anns, results = [], [], []
    ious: dict[str, list[float]] = {}
    for i, ph in enumerate(photos):
        image_id = i + 1
        images.append({"id": image_id, "file_name": ph.file_name, "height": ph.height, "width": ph.width})
        rng = np.random.default_rng([seed, i])
        for cat, m, crowd in ph.objects():
            if not m.any():
                continue
            r = rle.encode(m)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(cat), "segmentation": r,
                         "area": int(m.sum()), "bbox": rle.to_bbox(r), "iscrowd": crowd})
            if crowd:
                continue
            for _ in range(draws):
                c, used = make_coarse(m, rng, recipe)
                if not c.any():
                    continue  # the detector missed it
                iou = mask_iou(c, m)
                ious.setdefault(used, []).append(iou)
                cr = rle.encode(c)
                score = float(np.clip(0.3 + 0.6 * iou + rng.normal(0, 0.08), 0.05, 0.999))
                results.append({"image_id": image_id, "category_id": int(cat), "segmentation": cr,
                                "score": round(score, 4), "bbox": rle.to_bbox(cr)})
        if progress and (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(photos)} photos", file=sys.stderr, flush=True)
    gt = {"info": {"description": description}, "images": images, "annotations": anns, "categories": categories}
    (out / "annotations.json").write_text(json.dumps(gt, separators=(",", ":")))
    (out / "coarse.json").write_text(json.dumps(results, separators=(",", ":")))
    return {"images": len(images), "gt_instances": len(anns), "coarse_instances": len(results), "ious": ious}


def write_real_detections(root: Path, out: Path) -> dict:
    """coco-real: the 43 photos with real detections, their full GT, the detections as coarse.json."""
    image_dir, photos, cats = coco_photos(root, "real")
    dets = json.loads((root / "coco-train" / "detections_real.json").read_text())
    s = write_data_dir(out, image_dir, photos, cats, "identity", 0, draws=0, description="coco-train photos with real detections",
                       progress=False)
    new_id = {ph.source_id: i + 1 for i, ph in enumerate(photos)}
    coarse = [{**d, "image_id": new_id[int(d["image_id"])]} for d in dets]
    (out / "coarse.json").write_text(json.dumps(coarse, separators=(",", ":")))
    s["coarse_instances"] = len(coarse)
    return s


def real_detection_ious(root: Path) -> list[float]:
    """IoU of each real detection with its best same-category GT (the official builder's match)."""
    from bpr_core.training import match_gt

    _, photos, _ = coco_photos(root, "real")
    objs = {ph.source_id: ph.objects() for ph in photos}
    out = []
    for d in json.loads((root / "coco-train" / "detections_real.json").read_text()):
        m = rle.decode(rle.segmentation_to_rle(d["segmentation"], *d["segmentation"]["size"]))
        gts = [g for c, g, crowd in objs[int(d["image_id"])] if c == d["category_id"] and not crowd]
        _, iou = match_gt(m, gts, 0.0)
        out.append(iou)
    return out


def _quantiles(v: list[float]) -> dict:
    a = np.asarray(v, dtype=np.float64)
    q = np.quantile(a, [0.1, 0.25, 0.5, 0.75, 0.9]) if a.size else [float("nan")] * 5
    return {"n": int(a.size), "mean": round(float(a.mean()), 4) if a.size else None,
            **{k: round(float(x), 4) for k, x in zip(("p10", "p25", "median", "p75", "p90"), q)}}


def recipe_report(root: Path, seed: int = 0) -> dict:
    """Coarse-to-GT IoU of every recipe on coco-train's validation split, beside the real detections'."""
    _, photos, _ = coco_photos(root, "val")
    per: dict[str, list[float]] = {r: [] for r in RECIPES}
    for i, ph in enumerate(photos):
        rng = np.random.default_rng([seed, i])
        for _, m, crowd in ph.objects():
            if crowd or m.sum() < 16:
                continue
            for r in RECIPES:
                c = apply_recipe(m, r, rng)
                if c.any():
                    per[r].append(mask_iou(c, m))
    report = {"set": "coco-train val split (GT instances of >= 16 px), one mask per recipe per instance",
              "recipes": {r: _quantiles(v) for r, v in per.items()}}
    report["real_detections_matched"] = _quantiles(real_detection_ious(root))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("prepare_data"), description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=SETS, help="which real set")
    ap.add_argument("--split", choices=["train", "val", "all"], default="val", help="split (default val; ignored for coco-real)")
    ap.add_argument("--recipe", default="maskrcnn28", choices=("mix",) + RECIPES,
                    help="coarse-mask recipe (default maskrcnn28, the dev-val recipe; mix for training)")
    ap.add_argument("--draws", type=int, default=1, help="coarse masks per GT instance (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the coarse masks (default 0)")
    ap.add_argument("--out", help="output data directory")
    ap.add_argument("--shared", default=str(SHARED), help=f"the shared data folder (default {SHARED})")
    ap.add_argument("--recipe-report", metavar="JSON", help="write the per-recipe coarse-IoU report here and exit")
    args = ap.parse_args(argv)
    root = Path(args.shared)
    if args.recipe_report:
        rep = recipe_report(root, args.seed)
        Path(args.recipe_report).write_text(json.dumps(rep, indent=2))
        print(f"{'recipe':<28} {'n':>5} {'p10':>6} {'p25':>6} {'median':>6} {'p75':>6} {'p90':>6}")
        for name, q in list(rep["recipes"].items()) + [("real detections (matched)", rep["real_detections_matched"])]:
            print(f"{name:<28} {q['n']:>5} {q['p10']:>6.3f} {q['p25']:>6.3f} {q['median']:>6.3f} {q['p75']:>6.3f} {q['p90']:>6.3f}")
        return 0
    if not args.set or not args.out:
        raise InputError("give --set and --out (or --recipe-report JSON)")
    if args.draws < 1:
        raise InputError(f"--draws must be >= 1, got {args.draws}")
    out = Path(args.out)
    if args.set == "coco-real":
        s = write_real_detections(root, out)
    else:
        image_dir, photos, cats = {"coco": coco_photos, "ccp": ccp_photos, "pennfudan": pennfudan_photos}[args.set](root, args.split)
        s = write_data_dir(out, image_dir, photos, cats, args.recipe, args.seed, args.draws,
                           description=f"{args.set} {args.split} split, coarse recipe {args.recipe}, seed {args.seed}")
    print(f"wrote {s['images']} images, {s['gt_instances']} GT instances, {s['coarse_instances']} coarse masks to {out}", file=sys.stderr)
    for r, v in sorted(s.get("ious", {}).items()):
        q = _quantiles(v)
        print(f"  {r:<11} {q['n']:>6} masks, coarse-to-GT IoU median {q['median']:.3f} (p10 {q['p10']:.3f}, p90 {q['p90']:.3f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
