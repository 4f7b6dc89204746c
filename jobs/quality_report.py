"""Quality report: coarse input vs the guided-filter baseline vs the BPR model on held-out sets.

    python -m jobs.quality_report [--out quality_report] [--checkpoint model.pt] [--images 100]

Sets: a synthetic test split (seed 300, never used in training or model selection) and, where
../shared/data exists, the dev-validation sets (never trained on; the model and its do-no-harm
rules were selected on them): coco-train's validation split with Mask R-CNN-style coarse masks
(28x28 recipe, seed 0), the real detector masks of detections_real.json on their 43 photos,
ccp-persons' validation split (28x28 recipe) and Penn-Fudan's validation split (its own
preparation, seed 0). Each refiner runs through `jobs.refine`; the BPR model runs twice, with its
calibrated do-no-harm rules (the default) and with the paper's reassembly (`--official`).
`jobs.evaluate` gives mask AP and Boundary AP, overall and per object size (S/M/L), and the
per-instance IoU change (share improved, share worse by more than 2 IoU points). Prints one table
per set and writes OUT/report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import evaluate, refine
from ._cli import prog_name, run_main
from .prepare_data import SHARED, coco_photos, ccp_photos, write_data_dir, write_real_detections
from .prepare_pennfudan import prepare

TEST_SEED = 300
RUNS = (("guided filter", "guided-filter", []), ("BPR, official reassembly", "network", ["--official"]),
        ("BPR model", "network", []))


def dev_val_sets(shared: Path, out: Path) -> dict[str, Path]:
    """Write (once) the dev-validation data directories under OUT; skip what ../shared lacks."""

    def simulated(photos_fn, split):
        def make(d):
            image_dir, photos, cats = photos_fn(shared, split)
            write_data_dir(d, image_dir, photos, cats, "maskrcnn28", 0, progress=False)
        return make

    plan = [  # (what must exist, folder, title, how to write it)
        (shared / "coco-train" / "instances.json", "coco-val", "coco-train val, 28x28 coarse", simulated(coco_photos, "val")),
        (shared / "coco-train" / "detections_real.json", "coco-real", "coco-train, real detector masks",
         lambda d: write_real_detections(shared, d)),
        (shared / "ccp-persons" / "masks", "ccp-val", "ccp-persons val, 28x28 coarse", simulated(ccp_photos, "val")),
        (shared / "pennfudan" / "PNGImages", "pennfudan-val", "Penn-Fudan val", lambda d: prepare(shared / "pennfudan", d, "val", seed=0)),
    ]
    sets = {}
    for needed, folder, title, make in plan:
        if needed.exists():
            d = out / folder
            if not (d / "coarse.json").exists():
                make(d)
            sets[title] = d
    return sets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("quality_report"), description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="quality_report")
    ap.add_argument("--checkpoint", help="model to evaluate (default: the shipped model)")
    ap.add_argument("--images", type=int, default=100, help="synthetic test images (default 100)")
    ap.add_argument("--shared", default=str(SHARED), help=f"the shared data folder (default {SHARED}); sets it lacks are skipped")
    ap.add_argument("--only", nargs="+", help="run only the sets whose name contains one of these words")
    args = ap.parse_args(argv)
    from bpr_core.synthetic import write_dataset

    out = Path(args.out)
    sets = {}
    syn = out / "synthetic-test"
    if not (syn / "coarse.json").exists():
        write_dataset(syn, args.images, seed=TEST_SEED)
    sets["synthetic test (seed 300)"] = syn
    shared = Path(args.shared)
    if not shared.is_dir():
        print(f"note: {shared} not found; the real-photo sets are skipped", file=sys.stderr)
    else:
        sets.update(dev_val_sets(shared, out))
    if args.only:
        sets = {k: v for k, v in sets.items() if any(w.lower() in k.lower() for w in args.only)}
    report = {}
    for name, d in sets.items():
        files, names = [str(d / "coarse.json")], ["coarse"]
        for label, method, flags in RUNS:
            target = out / "runs" / d.name / (method + ("-official" if flags else ""))
            extra = ["--checkpoint", args.checkpoint] if (method == "network" and args.checkpoint) else []
            code = refine.main(["--images", str(d / "images"), "--coarse", str(d / "coarse.json"), "--image-info",
                                str(d / "annotations.json"), "--out", str(target), "--refiner", method, *extra, *flags])
            if code:
                return code
            files.append(str(target / "refined.json"))
            names.append(label)
        rep = evaluate.evaluate_files(str(d / "annotations.json"), files, names)
        report[name] = rep
        print(f"\n== {name} ==\n" + evaluate.format_table(rep))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nreport written to {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
