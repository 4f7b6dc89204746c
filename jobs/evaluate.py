"""Evaluate refined instance masks: mask AP, Boundary AP and per-instance IoU change.

    python -m jobs.evaluate --gt annotations.json --results coarse.json refined.json [--out report.json]

Each results file (COCO results JSON, or an instance Parquet written by jobs.refine) gets mask AP,
AP50, AP75, APs/m/l (pycocotools COCOeval, segm) and the same for Boundary AP (Cheng et al. 2021,
dilation 0.02 of the image diagonal). The first results file is the baseline: for each later file
the per-instance IoU change against it is reported (instances paired by image_id + instance_id).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bpr_core.evaluation import STAT_NAMES, evaluate_results, iou_change, results_from_rows
from bpr_core.formats import InputError, load_coco_gt, read_instances, read_results_json

from ._cli import prog_name, run_main


def load_results(path: str) -> list[dict]:
    p = Path(path)
    if p.suffix.lower() == ".json":
        return results_from_rows(read_results_json(p))
    return results_from_rows(read_instances(p))


def _ap(v: float) -> str:
    return "-" if v < 0 else f"{v:.1f}"  # COCOeval reports -1 where an area range has no objects


def format_table(report: dict) -> str:
    cols = (["results"] + [f"mask {k}" for k in ("AP", "AP50", "AP75")] + [f"bnd {k}" for k in ("AP", "AP50", "AP75")]
            + ["APs", "APm", "APl", "bnd APs", "bnd APm", "bnd APl", "dIoU", "improved", "worse>2"])
    rows = []
    for name, r in report["results"].items():
        ch = r.get("iou_change") or {}
        rows.append([name] + [_ap(r["mask"][k]) for k in ("AP", "AP50", "AP75")] + [_ap(r["boundary"][k]) for k in ("AP", "AP50", "AP75")]
                    + [_ap(r["mask"][k]) for k in ("APs", "APm", "APl")] + [_ap(r["boundary"][k]) for k in ("APs", "APm", "APl")]
                    + ([f"{100 * ch['mean_change']:+.2f}", f"{100 * ch['frac_improved']:.0f}%", f"{100 * ch['frac_worsened_gt_2pts']:.0f}%"] if ch.get("instances") else ["", "", ""]))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def evaluate_files(gt: str, results: list[str], names: list[str] | None = None) -> dict:
    coco_gt = load_coco_gt(gt)
    names = names or [Path(r).name if Path(r).name not in ("", ".") else r for r in results]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    loaded = [load_results(r) for r in results]
    report = {"gt": str(gt), "results": {}}
    for i, (name, res) in enumerate(zip(names, loaded)):
        entry = evaluate_results(coco_gt, res)
        entry["file"] = str(results[i])
        if i > 0:
            entry["iou_change"] = iou_change(coco_gt, loaded[0], res)
            entry["iou_change"]["baseline"] = names[0]
        report["results"][name] = entry
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("evaluate"), description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--gt", required=True, help="COCO ground truth (instances JSON)")
    ap.add_argument("--results", required=True, nargs="+", help="results files: COCO results JSON or instance Parquet; the first is the baseline")
    ap.add_argument("--names", nargs="+", help="display names, one per results file")
    ap.add_argument("--out", help="write the full report as JSON here")
    args = ap.parse_args(argv)
    if args.names and len(args.names) != len(args.results):
        raise InputError("--names needs one name per --results file")
    report = evaluate_files(args.gt, args.results, args.names)
    print(format_table(report))
    print(f"(AP in %, {' '.join(STAT_NAMES)} from COCOeval segm; bnd = Boundary AP; dIoU = mean per-instance IoU change in points vs the first file)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
