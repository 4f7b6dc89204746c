"""Soak run: many synthetic images through `jobs.refine` on a local Ray, with the resident memory of
the whole process tree sampled throughout, to show it stays flat as shards go by.

    python -m jobs.soak --images 2000 [--work DIR] [--out soak.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ._cli import prog_name, run_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("soak"), description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=200,
                    help="small shards on purpose (default 200): many shard cycles for leaks to show")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    ap.add_argument("--out", default="soak.json")
    ap.add_argument("--refiner", default="network", choices=["network", "guided-filter", "identity"])
    args = ap.parse_args(argv)
    from bpr_core.synthetic import write_dataset
    from bench.procmem import PeakRSS
    from pipeline.refine_job import RefineOptions, run
    from pipeline.runtime import init_ray

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bpr-soak-"))
    data = work / "data"
    if not (data / "coarse.json").exists():
        write_dataset(data, args.images, seed=700, min_size=160, max_size=320)
    init_ray()
    opts = RefineOptions(images=str(data / "images"), coarse=str(data / "coarse.json"), image_info=str(data / "annotations.json"),
                         out=str(work / f"out-{int(time.time())}"), method=args.refiner, shard_size=args.shard_size)
    with PeakRSS(interval=1.0) as mem:
        m = run(opts)
    samples = mem.samples
    mb = [s[1] / 2**20 for s in samples]
    q = len(mb) // 4 or 1
    result = {"images": args.images, "instances": m["counts"]["input"], "invariant_ok": m["invariant"]["ok"],
              "seconds": m["timings"]["total_seconds"], "shards": len(m["shards"]),
              "rss_mb": {"peak": round(max(mb), 1), "first_quarter_peak": round(max(mb[:q]), 1),
                         "last_quarter_peak": round(max(mb[-q:]), 1),
                         # the peak of each eighth of the run (level once the actors' memory has settled)
                         "peaks_by_eighth": [round(max(mb[i * len(mb) // 8 : (i + 1) * len(mb) // 8] or [0.0]), 1)
                                             for i in range(8)]},
              "per_shard": m["timings"]["per_shard"], "samples": samples}
    Path(args.out).write_text(json.dumps(result, indent=2))
    r = result["rss_mb"]
    print(f"{args.images} images, {result['instances']} instances in {result['seconds']:.0f} s over {result['shards']} shards; "
          f"invariant {'ok' if result['invariant_ok'] else 'VIOLATED'}; process-tree RSS peak {r['peak']:.0f} MB "
          f"(first quarter {r['first_quarter_peak']:.0f} MB, last quarter {r['last_quarter_peak']:.0f} MB; "
          f"by eighths of the run: {', '.join(f'{m:.0f}' for m in r['peaks_by_eighth'])} MB)")
    return 0 if result["invariant_ok"] else 1


if __name__ == "__main__":
    run_main(main)
