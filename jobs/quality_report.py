"""Quality report: coarse input vs the guided-filter baseline vs the BPR model on held-out data.

    python -m jobs.quality_report [--out quality_report] [--checkpoint model.pt] [--images 100]

Held-out sets: a synthetic test split (seed 300, never used in training or model selection) and,
where ../shared/data/pennfudan exists, Penn-Fudan's validation split with Mask R-CNN-like coarse
masks (seed 0). Each refiner runs through `jobs.refine`; `jobs.evaluate` gives mask AP, Boundary
AP and per-instance IoU change. Prints one table per set and writes OUT/report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import evaluate, refine
from ._cli import run_main
from .prepare_pennfudan import DEFAULT_SRC, prepare

TEST_SEED = 300


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.quality_report", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="quality_report")
    ap.add_argument("--checkpoint", help="model to evaluate (default: the shipped model)")
    ap.add_argument("--images", type=int, default=100, help="synthetic test images (default 100)")
    ap.add_argument("--pennfudan", default=str(DEFAULT_SRC), help="Penn-Fudan root (skipped if absent)")
    args = ap.parse_args(argv)
    from bpr_core.synthetic import write_dataset

    out = Path(args.out)
    sets = {}
    syn = out / "synthetic-test"
    if not (syn / "coarse.json").exists():
        write_dataset(syn, args.images, seed=TEST_SEED)
    sets["synthetic test (seed 300)"] = syn
    if (Path(args.pennfudan) / "PNGImages").is_dir():
        pf = out / "pennfudan-val"
        prepare(Path(args.pennfudan), pf, "val", seed=0)
        sets["Penn-Fudan val"] = pf
    else:
        print(f"note: {args.pennfudan} not found; the real-image set is skipped", file=sys.stderr)
    report = {}
    for name, d in sets.items():
        files, names = [str(d / "coarse.json")], ["coarse"]
        for method in ("guided-filter", "network"):
            target = out / "runs" / d.name / method
            extra = ["--checkpoint", args.checkpoint] if (method == "network" and args.checkpoint) else []
            code = refine.main(["--images", str(d / "images"), "--coarse", str(d / "coarse.json"), "--image-info",
                                str(d / "annotations.json"), "--out", str(target), "--refiner", method, *extra])
            if code:
                return code
            files.append(str(target / "refined.json"))
            names.append("BPR model" if method == "network" else method)
        rep = evaluate.evaluate_files(str(d / "annotations.json"), files, names)
        report[name] = rep
        print(f"\n== {name} ==\n" + evaluate.format_table(rep))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nreport written to {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
