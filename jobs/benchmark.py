"""Benchmark the refinement pipeline against the bare network and an official-style disk round trip.

    python -m jobs.benchmark [--quick] [--out bench.json]

On the same synthetic images and the same (shipped) model, batch size and threads per refinement
actor: (1) the bare network on pre-made uint8 batches, (2) `jobs.refine` end to end on a local Ray
(reading to written outputs), (3) the official tools' flow (patch PNGs + detail files, inference
over the files into one pickle, a merge pass), (4) peak RSS of the whole process tree at N and 4N
images (both committed in shards of N/2 images), (5) 4N with the job's defaults, and N with 2
refinement actors (full run only), (6) the driver's CPU and memory per instance at 0.5M and 2M
instances, for a Parquet and a results-JSON input, projected to 20M (bench.driver). Prints a table and the ratios against their targets,
and writes everything to --out. --quick: N = 16 and a small driver run (a few minutes here).

Also measured: the algorithm's serial work (extract, network, paste in one thread, no framework),
which spread over the machine's cores bounds what any flow could reach there; and, where the
machine has a CUDA GPU, the bare network at fp32/fp16/bf16 (channels_last) and `jobs.refine` end to
end on it.
--untrained hrnet18s times the pipeline around an untrained network of the paper's size instead of
the shipped one (speed only: its masks mean nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from ._cli import prog_name, run_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("benchmark"), description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small N (16 images), no actor-scaling run")
    ap.add_argument("--images", type=int, help="N (default 400, or 16 with --quick)")
    ap.add_argument("--out", default="bench.json", help="JSON results file (default bench.json)")
    ap.add_argument("--checkpoint", help="model (default: the shipped one)")
    ap.add_argument("--untrained", metavar="ARCH", choices=["hrnet18s", "hrnet_lite"],
                    help="time an untrained network of this architecture at the paper's geometry instead of the shipped "
                         "model (speed only)")
    ap.add_argument("--batch-size", type=int, default=64, help="patches per network batch, all runs (default 64)")
    ap.add_argument("--work", help="working directory for data and outputs (default: a temporary one)")
    ap.add_argument("--no-driver", action="store_true",
                    help="skip the driver-cost section (6), which does not depend on the model (~12 minutes here)")
    args = ap.parse_args(argv)
    from bench.benchmark import benchmark

    n = args.images or (16 if args.quick else 400)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bpr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if args.untrained:
        if checkpoint:
            ap.error("--untrained and --checkpoint exclude each other")
        from bench.benchmark import untrained_checkpoint

        checkpoint = untrained_checkpoint(work, args.untrained)
    res = benchmark(work, n, checkpoint, args.batch_size, quick=args.quick, driver=not args.no_driver)
    res["machine"].update(platform=platform.platform(), processor=platform.processor() or platform.machine())
    stats = res["end_to_end"].pop("stage_stats", "")
    for k in ("memory_n", "memory_4n", "end_to_end_4n", "end_to_end_2_actors", "end_to_end_1_actor"):
        if k in res:
            res[k].pop("stage_stats", None)
    res["end_to_end_stage_stats"] = str(stats)
    Path(args.out).write_text(json.dumps(res, indent=2))  # first: a printing problem never loses a run
    b, o = res["bare_model"], res["official_style"]
    print(f"\n{'run':40} {'patches':>8} {'seconds':>8} {'patches/s':>10} {'peak RSS MB':>12}")
    print(f"{'bare model (1 thread)':40} {b['patches']:>8} {b['seconds']:>8.1f} {b['patches_per_s']:>10.1f} {'':>12}")
    half = max(1, n // 2)
    for key, label in (("end_to_end", f"end to end, N={n}"), ("end_to_end_4n", f"end to end, 4N={4 * n}"),
                       ("end_to_end_2_actors", "end to end, N, 2 refine actors"),
                       ("end_to_end_1_actor", "end to end, N, 1 refine actor"),
                       ("memory_n", f"memory: N, shards of {half}"), ("memory_4n", f"memory: 4N, shards of {half}")):
        if key in res:
            r = res[key]
            print(f"{label:40} {r['patches']:>8} {r['seconds']:>8.1f} {r['patches_per_s']:>10.1f} {r['peak_rss_mb']:>12.0f}")
    print(f"{'official-style disk round trip':40} {o['patches']:>8} {o['seconds']:>8.1f} {o['patches_per_s']:>10.1f} {'':>12}"
          f"  (split {o['split_s']:.1f} s, inference {o['inference_s']:.1f} s, merge {o['merge_s']:.1f} s)")
    print()
    for k, v in res["ratios"].items():
        t = res["targets"][k]
        ok = v <= t if k.startswith("peak") else v >= t
        print(f"{k:30} {v:6.2f}  target {'<=' if k.startswith('peak') else '>='} {t}  {'met' if ok else 'NOT met'}")
    print(f"{'(end to end at 4N / bare model':30} {res['end_to_end_4n_over_bare_model']:6.2f}  for scale, no target)")
    mn, m4 = res["memory_n"], res["memory_4n"]
    print(f"{'(peak PSS 4N / N':30} {res['peak_pss_4n_over_n']:6.2f}  {mn['peak_pss_mb']:.0f} -> {m4['peak_pss_mb']:.0f} MB; "
          f"summed RSS {mn['peak_rss_mb']:.0f} -> {m4['peak_rss_mb']:.0f} MB, of it shared memory "
          f"{mn['peak_rss_shmem_mb']:.0f} -> {m4['peak_rss_shmem_mb']:.0f} MB)")
    t = res["targets"]["driver_cpu_us_per_instance"]
    for fmt, d in res.get("driver", {}).get("by_format", {}).items():
        drv, pr = d["points"][-1], d["projection_20m"]
        print(f"{'driver CPU us per instance':30} {drv['cpu_us_per_instance']:6.2f}  target <= {t}  "
              f"{'met' if drv['cpu_us_per_instance'] <= t else 'NOT met'}  ({fmt} input, {drv['instances']:,} instances, "
              f"{drv['instances'] / drv['images']:.0f} per image: {drv['index_cpu_us_per_image']:.1f} us per image + "
              f"{drv['other_cpu_us_per_instance']:.2f} us per instance; 20M projected: {pr['cpu_minutes']} CPU-minutes, "
              f"{pr['peak_rss_gb']} GB peak RSS)")
        if "memory_split" in d:
            ms = d["memory_split"]
            held = ms["held_after_plan_per_instance"]
            print(f"{'(driver memory per instance':30} {ms['heap_bytes_per_instance_at_fixed_images']:6.1f}  B of peak heap per instance on "
                  f"fixed images, {ms['heap_bytes_per_image_at_fixed_instances']:.0f} B per image; held after the plan per "
                  f"instance: {held['python_blocks']:.4f} Python blocks, {held['arrow_bytes']:.1f} Arrow bytes)")
    w, bd = res["serial_work"], res["bounds"]
    print(f"\nserial work (1 thread, no framework): extract {w['extract_s']:.1f} s + network {w['network_s']:.1f} s + paste "
          f"{w['paste_s']:.1f} s = {w['total_s']:.1f} s; over {bd['cores']} cores at best {bd['floor_s']:.1f} s "
          f"({bd['floor_s_network_on_1_thread']:.1f} s with the network on 1 thread)")
    print(f"so no flow on this machine exceeds: end to end / bare model {bd['end_to_end_over_bare_model_max']:.2f}, "
          f"ours / official-style {bd['ours_over_official_style_max']:.2f}")
    if "gpu" in res:
        g = res["gpu"]
        print(f"\nGPU ({g['device']}): bare model " + ", ".join(f"{p} {r['patches_per_s']:.0f}" for p, r in g["bare_model"].items())
              + f" patches/s; end to end {g['end_to_end']['patches_per_s']:.0f} patches/s "
              f"(ratio to fp16 bare {g['end_to_end_over_bare_model_fp16']:.2f})")
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
