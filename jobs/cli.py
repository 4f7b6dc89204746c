"""The `bpr` command: one entry point for every job (`bpr refine ...` = `python -m jobs.refine ...`).

The jobs stay runnable as `python -m jobs.X`, which is what `ray job submit` runs on a cluster.
"""

from __future__ import annotations

import importlib
import os
import sys

from ._cli import run_main

# subcommand -> (module under jobs/, one-line summary)
COMMANDS = {
    "refine": ("refine", "refine detector masks on Ray: images + coarse results in, refined results out"),
    "reprocess": ("reprocess", "scheduled reprocessing: refine the detection files not yet refined by this model"),
    "evaluate": ("evaluate", "mask AP, Boundary AP and per-instance IoU change against ground truth"),
    "train": ("train", "train the refinement network with Ray Train"),
    "calibrate": ("calibrate", "calibrate a model's do-no-harm rules on dev-validation sets"),
    "import-official": ("import_official", "convert a checkpoint released with the BPR paper (mmseg HRNet-18s)"),
    "publish-model": ("publish_model", "publish a checkpoint as the shipped model, with its model card"),
    "demo": ("demo", "refine the embedded synthetic demo set and evaluate it (make demo)"),
    "make-synthetic": ("make_synthetic", "write a deterministic synthetic data set"),
    "prepare-data": ("prepare_data", "the real photo sets in ../shared/data as data directories"),
    "prepare-pennfudan": ("prepare_pennfudan", "Penn-Fudan as a data directory"),
    "quality-report": ("quality_report", "coarse vs guided filter vs model on held-out and dev-validation sets"),
    "benchmark": ("benchmark", "pipeline throughput and memory benchmark"),
    "bench-core": ("bench_core", "proposal / crop / paste and network timings"),
    "bench-inputs": ("bench_inputs", "input reader time and memory"),
    "soak": ("soak", "long run with the process tree's memory sampled"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: bpr COMMAND [options]   (bpr COMMAND --help for its options)", "",
             "Boundary Patch Refinement (Tang et al., CVPR 2021) as a batch pipeline on Ray.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        from bpr_core import __version__

        print(f"bpr {__version__}")
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bpr: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    os.environ["BPR_CLI"] = "1"  # jobs name themselves "bpr X" in --help and errors
    module = importlib.import_module(f"jobs.{COMMANDS[name][0]}")
    run_main(module.main, rest)


if __name__ == "__main__":
    main()
