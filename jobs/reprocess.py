"""Refine the detector outputs under a prefix that the current model/config has not refined yet.

    python -m jobs.reprocess --detections s3://bucket/detections/ --images s3://bucket/images \\
        --image-info s3://bucket/image_info.json --out s3://bucket/refined/

Every *.json / *.parquet under --detections is one detector output; its results go to
OUT/<file name>/ (refined.json, parts/, manifest.json, ...). A file already refined with the same
content, model version and config hash is skipped, so the command is idempotent. A lease object
(OUT/_lease.json, owner + expiry, renewed between files) keeps two scheduled runs from working at
once: a run that finds a live lease exits 0 without work; an expired one (crashed run) is taken
over. Suitable for cron, e.g.:

    */30 * * * * cd /opt/bpr && .venv/bin/python -m jobs.reprocess --detections ... --out ...
"""

from __future__ import annotations

import sys

from . import refine
from ._cli import prog_name, run_main


def main(argv: list[str] | None = None) -> int:
    ap = refine.build_parser(prog_name("reprocess"), __doc__, coarse=False)
    ap.add_argument("--detections", required=True, help="prefix holding detector outputs (local or s3://)")
    ap.add_argument("--lease-seconds", type=float, default=3600.0, help="lease length, renewed after each file (default 3600)")
    args = ap.parse_args(argv)
    if not args.images or not args.image_info or not args.out:
        ap.error("--images, --image-info and --out are required")
    from pipeline.reprocess import list_detections, reprocess
    from pipeline.runtime import init_ray

    template = refine.options_from_args(args)
    list_detections(args.detections)  # fail fast before Ray starts
    from pipeline.console import quiet_ray

    with quiet_ray(args.verbose):
        init_ray(args.address, args.num_cpus)
        from pipeline.runtime import check_paths_on_every_node

        check_paths_on_every_node({"--images": template.images, "--checkpoint": template.checkpoint,
                                   "--detections": args.detections}, out=template.out)
        result = reprocess(args.detections, template, args.lease_seconds)
    if not result["skipped_lease"]:
        print(f"refined {len(result['refined'])} detector output(s): {', '.join(result['refined']) or '-'}; "
              f"{len(result['up_to_date'])} already up to date"
              + (f"; {len(result['retry'])} with unreadable images, retried next run: {', '.join(result['retry'])}"
                 if result["retry"] else ""), file=sys.stderr)
    return 3 if result["retry"] else 0


if __name__ == "__main__":
    run_main(main)
