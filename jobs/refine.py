"""Refine detector instance masks with BPR on Ray: images + coarse results in, refined results out.

    python -m jobs.refine --images URI --coarse URI --image-info URI --out URI [--checkpoint PATH]

URIs are local paths or s3://bucket/prefix (endpoint/credentials from the standard AWS variables,
e.g. AWS_ENDPOINT_URL for MinIO). --coarse is a COCO results JSON or an instance Parquet;
--image-info maps image_id to file (a COCO-style JSON with an `images` list, or CSV/Parquet
image_id,path). Writes OUT/refined.json (COCO results), OUT/parts/ (Parquet, one row per input
instance with status and provenance), OUT/quarantine.parquet and OUT/manifest.json. Re-running the
same command skips shards already committed.

--demo runs the embedded example instead of user inputs: a generated synthetic set under
OUT/data (default OUT: demo_out), refined on a local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bpr_core import BPRConfig
from bpr_core.config import DEFAULT_WEIGHTS, OFFICIAL_RULES
from bpr_core.formats import InputError
from bpr_core.imageio import DEFAULT_MAX_PIXELS, EXIF_POLICIES

from ._cli import prog_name, run_main

DEMO_IMAGES, DEMO_SEED = 24, 2024


def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a number within bounds, or a one-line usage error naming the bound."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if v != v or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
            lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
            hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {' and '.join(x for x in (lo_s, hi_s) if x)})")
        return v
    parse.__name__ = kind.__name__
    return parse


POSITIVE, NON_NEGATIVE = _number(int, lo=1), _number(int, lo=0)
UNIT = _number(float, lo=0.0, hi=1.0)


def build_parser(prog: str | None = None, doc: str = __doc__, coarse: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog or prog_name("refine"), description=doc.split("\n\n")[0],
                                 epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    io_ = ap.add_argument_group("inputs and outputs")
    io_.add_argument("--images", help="root of the image files (local or s3://)")
    if coarse:
        io_.add_argument("--coarse", help="coarse instances: COCO results JSON (plain or gzip) or instance Parquet (a file, or a directory of files)")
    io_.add_argument("--image-info", help="image index: COCO-style JSON with 'images', or CSV/Parquet image_id,path")
    io_.add_argument("--out", help="output prefix (local or s3://); required, except with --demo (default demo_out)")
    if coarse:
        io_.add_argument("--demo", action="store_true", help="refine the embedded synthetic demo set instead of inputs")
    p = ap.add_argument_group("input policies (README: reliability)")
    p.add_argument("--exif", choices=EXIF_POLICIES, default="stored",
                   help="stored: decode the pixels as stored, ignoring the EXIF orientation tag (masks sized to the file, "
                        "as COCO's are); apply: rotate by the tag first (masks from a detector that did, e.g. detectron2) "
                        "(default stored)")
    p.add_argument("--max-image-pixels", type=NON_NEGATIVE, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"quarantine images and masks with more than N pixels, checked from the header before decoding "
                        f"(default {DEFAULT_MAX_PIXELS:,}; 0 = no limit)")
    p.add_argument("--allow-absolute-paths", action="store_true",
                   help="let image-index file_names be absolute paths or URIs (default: refused; relative ones must stay "
                        "inside --images)")
    m = ap.add_argument_group("model")
    m.add_argument("--refiner", default=None, choices=["network", "guided-filter", "identity"],
                   help="network (default when a model is available), guided-filter (non-learned baseline), "
                        "identity (returns the coarse masks; for checks)")
    m.add_argument("--checkpoint", help=f"model checkpoint, a local path or s3:// (downloaded once per node into "
                                        f"~/.cache/bpr); default: the shipped model, {DEFAULT_WEIGHTS.name}")
    c = ap.add_argument_group("algorithm (defaults: the checkpoint's own config; BPRConfig's for the other refiners)")
    d = BPRConfig()
    c.add_argument("--patch-size", type=_number(int, lo=2), help=f"patch side in px; a network uses its checkpoint's and refuses another (else {d.patch_size})")
    c.add_argument("--nms-iou", type=UNIT, help=f"patch NMS IoU (default {d.nms_iou})")
    c.add_argument("--context-pad", type=NON_NEGATIVE, help="context pixels around each patch; a network uses its checkpoint's (else 0)")
    c.add_argument("--min-area", type=NON_NEGATIVE, help="pass through instances smaller than this many pixels (default: the checkpoint's)")
    c.add_argument("--gate-margin", type=_number(float, lo=0.0, hi=0.5, hi_open=True),
                   help="do-no-harm: a pixel leaves its coarse value only where the patch probability is beyond 0.5 +- this "
                        "(default: the checkpoint's calibrated value; 0 = official)")
    c.add_argument("--min-keep-iou", type=UNIT,
                   help="do-no-harm: keep a refined instance only if its IoU with the coarse mask is at least this "
                        "(default: the checkpoint's calibrated value; 0 = official)")
    c.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average the network's output over each patch and its mirror image (default: the checkpoint's setting)")
    c.add_argument("--official", action="store_true",
                   help="the paper's reassembly: all do-no-harm rules off (min-area, gate-margin, min-keep-iou = 0)")
    r = ap.add_argument_group("execution")
    r.add_argument("--visualize", type=NON_NEGATIVE, default=0, metavar="N",
                   help="overlay PNGs of the N images whose masks changed most (coarse magenta, refined green, patches "
                        "yellow, with a legend) and most_changed.png (the most-changed instances, coarse | refined) "
                        "to OUT/visualize/")
    r.add_argument("--visualize-ids", type=lambda t: [int(x) for x in t.split(",") if x.strip()], metavar="ID,ID,...",
                   help="draw these image ids instead of the most-changed ones")
    r.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray)")
    r.add_argument("--shard-size", type=POSITIVE, default=1000, help="images per shard, the unit of resume and commit (default 1000)")
    r.add_argument("--batch-size", type=POSITIVE, default=64, help="patches per network batch (default 64)")
    r.add_argument("--refine-actors", type=NON_NEGATIVE, default=0,
                   help="refinement actors (default 0: one per GPU the cluster has or its autoscaler can add, an "
                        "autoscaling pool; on CPUs up to one single-threaded actor per CPU)")
    r.add_argument("--extract-actors", type=NON_NEGATIVE, default=0,
                   help="most patch-extraction actors, an autoscaling pool from 1 (default 0: as many as the cluster's CPUs "
                        "hold beside the refinement actors)")
    r.add_argument("--refine-cpus", type=_number(float, lo=0.0, lo_open=True), default=0.5,
                   help="logical CPUs reserved per refinement actor; its torch threads are max(1, int(this)) (default 0.5)")
    r.add_argument("--images-per-block", type=POSITIVE, default=8, help="whole images per extraction step: patches go downstream every this many images; "
                   "input blocks hold up to a shard, and at least this many (default 8)")
    r.add_argument("--instances-per-call", type=POSITIVE, default=64,
                   help="instances per refinement actor call; their patches share network batches (default 64)")
    r.add_argument("--instances-per-part", type=POSITIVE, default=512,
                   help="instances per written Parquet part, at most (default 512)")
    r.add_argument("--object-store-mb", type=NON_NEGATIVE, default=0, metavar="MB",
                   help="object store the flow may hold at once (default 0: 256 MB per refinement actor, at least 512)")
    r.add_argument("--device", default="auto",
                   help="auto (GPU actors if the cluster has GPUs, or its autoscaler can add GPU nodes), cpu or cuda")
    r.add_argument("--num-cpus", type=POSITIVE, help="CPUs for a private local Ray (default: all)")
    r.add_argument("--max-unreadable-share", type=UNIT, default=0.25, metavar="F",
                   help="fail the job (exit 1) when more than this share of a shard's images cannot be read, and at least 3 "
                        "or all: a systemic failure such as no access from the workers (default 0.25); fewer are "
                        "quarantined, passed through with their coarse masks, and retried by the next run (exit 3)")
    r.add_argument("--verbose", action="store_true",
                   help="show Ray's own log lines (hidden: its INFO lines and a few known-harmless warnings) and "
                        "the Ray Data stage stats")
    r.add_argument("--progress-interval", type=_number(float, lo=0.0), default=30.0, metavar="S",
                   help="print a progress line at least every S seconds while the flow runs (default 30; 0: at commits only)")
    return ap


def ensure_demo_data(out: str) -> tuple[str, str, str]:
    from bpr_core.synthetic import write_dataset

    data = Path(out) / "data"
    if not (data / "coarse.json").is_file():
        print(f"generating the demo set ({DEMO_IMAGES} synthetic images, seed {DEMO_SEED}) in {data}", file=sys.stderr)
        write_dataset(data, DEMO_IMAGES, seed=DEMO_SEED)
    return str(data / "images"), str(data / "coarse.json"), str(data / "annotations.json")


def choose_refiner(args) -> str:
    if args.refiner:
        return args.refiner
    if args.checkpoint or DEFAULT_WEIGHTS.is_file():
        return "network"
    print("NOTE: no trained model is shipped yet and no --checkpoint was given: refining with the "
          "non-learned guided-filter baseline, not the BPR network.", file=sys.stderr)
    return "guided-filter"


def config_overrides(args) -> dict:
    """The algorithm options given on the command line, and only those: everything else comes from
    the checkpoint (a network owns its patch geometry and its calibrated do-no-harm rules)."""
    given = {"patch_size": args.patch_size, "nms_iou": args.nms_iou, "context_pad": args.context_pad, "min_area": args.min_area,
             "gate_margin": args.gate_margin, "min_keep_iou": args.min_keep_iou, "tta_flip": args.tta_flip}
    if args.official:
        for k, v in OFFICIAL_RULES.items():
            if given[k] not in (None, 0):
                raise InputError(f"--official turns the do-no-harm rules off; drop --{k.replace('_', '-')}")
            given[k] = v
    return {k: v for k, v in given.items() if v is not None}


def options_from_args(args):
    from pipeline.refine_job import RefineOptions

    cfg = config_overrides(args)
    return RefineOptions(images=args.images, coarse=getattr(args, "coarse", None) or "", image_info=args.image_info,
                         out=args.out, method=choose_refiner(args), checkpoint=args.checkpoint, config=cfg,
                         shard_size=args.shard_size, batch_size=args.batch_size, refine_actors=args.refine_actors,
                         extract_actors=args.extract_actors, refine_cpus=args.refine_cpus, device=args.device,
                         images_per_block=args.images_per_block, instances_per_call=args.instances_per_call,
                         instances_per_part=args.instances_per_part, object_store_mb=args.object_store_mb,
                         visualize=args.visualize, visualize_ids=args.visualize_ids, exif=args.exif,
                         max_image_pixels=args.max_image_pixels, allow_absolute_paths=args.allow_absolute_paths,
                         progress_interval=args.progress_interval, max_unreadable_share=args.max_unreadable_share,
                         fail_on_batch=int(os.environ["BPR_FAIL_ON_BATCH"]) if os.environ.get("BPR_FAIL_ON_BATCH") else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = [args.images, args.coarse, args.image_info]
    if args.demo:
        if any(given):
            raise InputError("--demo refines the embedded synthetic set; drop --images/--coarse/--image-info, or drop --demo")
        args.out = args.out or "demo_out"
        if args.out.startswith("s3://"):
            raise InputError("the embedded demo writes locally; give --out a local path")
        args.images, args.coarse, args.image_info = ensure_demo_data(args.out)
        args.out = str(Path(args.out) / "refined")
    else:
        missing = [f"--{n}" for n, v in zip(("images", "coarse", "image-info", "out"), [*given, args.out]) if not v]
        if missing:
            raise InputError(f"missing {', '.join(missing)}: give --images, --coarse, --image-info and --out "
                             "(or --demo for the embedded synthetic example); see --help")
    import time

    from pipeline.refine_job import prepare_shards, run
    from pipeline.runtime import init_ray

    started = time.time()
    opts = options_from_args(args)
    # Options, inputs, output location and checkpoint are checked, and the whole input read and
    # validated record by record, before Ray starts: a malformed file or bad option is one line.
    prepared = prepare_shards(opts)
    from pipeline.console import quiet_ray

    with quiet_ray(args.verbose):
        try:
            init_ray(args.address, args.num_cpus)
            from pipeline.runtime import check_paths_on_every_node

            check_paths_on_every_node({"--images": opts.images, "--checkpoint": opts.checkpoint}, out=opts.out)
        except BaseException:
            prepared[0].close()
            raise
        manifest = run(opts, prepared, started)
    stats = manifest.pop("_stats", "")
    return report(manifest, stats if args.verbose else "")


# Exit statuses: 0 done; 1 failed (invariant, systemic read failure); 2 bad input or option;
# 3 done, but some images could not be read: their instances are in the outputs with their coarse
# masks, and re-running the same command retries them.
EXIT_READ_FAILURES = 3


def report(manifest: dict, stats: str = "") -> int:
    """The closing lines; the last one says how many instances were quarantined and why."""
    c = manifest["counts"]
    if stats:
        print("\nstage stats (ray.data, the one flow of this run):\n" + "\n".join(l for l in str(stats).splitlines() if l.startswith(("Operator", "*", "Dataset"))))
    print(f"\nrefined {c.get('refined', 0)}, passed through {c.get('passed_through', 0)}, quarantined "
          f"{c.get('quarantined', 0)} of {c['input']} instances in {manifest['timings']['total_seconds']:.1f} s "
          f"({manifest['timings']['shards_run']} shards run, {manifest['timings']['shards_skipped']} already done; "
          + ", ".join(f"{n} {stage} actor{'s' if n != 1 else ''}" for stage, n in manifest["timings"].get("actors", {}).items())
          + " for the whole run)")
    print(f"outputs: {manifest['outputs']['refined_json']} ({c.get('in_refined_json', 0)} detections; manifest.json, parts/, "
          "quarantine.parquet beside it)")
    if not manifest["invariant"]["ok"]:
        print(f"error: instance invariant violated: {json.dumps(manifest['invariant'])}", file=sys.stderr)
        return 1
    reasons = manifest.get("quarantine_reasons") or {}
    if not c.get("quarantined"):
        print("quarantined: none")
        return 0
    if c.get("read_failures"):
        print(f"warning: {c['read_failures']} instances are on images that could not be read; their shards are not marked "
              "done: re-run the same command to retry them", file=sys.stderr, flush=True)
    print(f"quarantined {c['quarantined']}: " + ", ".join(f"{n} {kind}" for kind, n in reasons.items())
          + " (each reason in quarantine.parquet)", flush=True)
    return EXIT_READ_FAILURES if c.get("read_failures") else 0

if __name__ == "__main__":
    run_main(main)
