"""The embedded demo: generate a synthetic set, refine it on a local Ray, and evaluate.

    python -m jobs.demo [--out demo_out]

Runs `jobs.refine --demo` (its embedded example: synthetic images with Mask R-CNN-like
coarse masks, refined on a local Ray with the shipped model), then `jobs.evaluate` of the coarse
and the refined results against the ground truth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import evaluate, refine
from ._cli import prog_name, run_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("demo"), description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    args, rest = ap.parse_known_args(argv)
    code = refine.main(["--demo", "--out", args.out, *rest])
    if code:
        return code
    data = Path(args.out) / "data"
    refined = Path(args.out) / "refined" / "refined.json"
    print("\nevaluation against the ground truth:")
    return evaluate.main(["--gt", str(data / "annotations.json"), "--results", str(data / "coarse.json"), str(refined),
                          "--names", "coarse", "refined", "--out", str(Path(args.out) / "report.json")])


if __name__ == "__main__":
    run_main(main)
