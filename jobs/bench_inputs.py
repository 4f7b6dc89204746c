"""Benchmark of the input readers: time and peak memory to stream a COCO results JSON of 64 and 128
MB (entries of ~300 RLE characters), and of 64, 256 and 1024 MB as detectron2 writes it (its key
order, a bbox of float32 values), and time and bytes read until a corrupt file (valid first entry,
then NUL padding) is reported.

    python -m jobs.bench_inputs [--out docs/bench_inputs.json] [--repo PATH] [--pad-mb 512]

The readers the checkout has: the entry-by-entry reader (`formats.iter_results_json`), the
columnar one (`results_arrow.iter_results_batches`, the same rows), and the columnar one in byte
ranges by reader processes (`results_parallel`, one per core; their CPU and the largest one's peak
RSS apart), forced from 128 MB, below the refinement job's threshold (512 MB), to show where it
pays. Each case runs in a fresh process (peak RSS is that process's ru_maxrss; the time is wall
and CPU). `--repo` measures another checkout (e.g. a `git worktree` of an older commit) with the
same files, so before/after ratios come from one run. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

from ._cli import prog_name, run_main


def write_results(path: str, mb: int, detectron2: bool = False) -> int:
    """A results list of ~`mb` MB: realistic entries (compressed RLE of ~300 characters of
    pycocotools' alphabet, the bytes 48-111); `detectron2`: in its key order with a bbox of float32
    values, as its `instances_to_coco_json` and Python's json write them."""
    import numpy as np

    rng = np.random.default_rng(0)
    alphabet = np.arange(48, 112, dtype=np.uint8)
    n = 0
    with open(path, "w") as f:
        f.write("[")
        while f.tell() < mb << 20:
            counts = alphabet[rng.integers(0, len(alphabet), 300)].tobytes().decode()
            segmentation = {"size": [480, 640], "counts": counts}
            if detectron2:
                box = rng.uniform(0, 600, 4).astype(np.float32).tolist()
                entry = {"image_id": int(n // 8), "category_id": int(1 + n % 80), "bbox": box,
                         "score": float(rng.random()), "segmentation": segmentation}
            else:
                entry = {"image_id": int(n // 8), "category_id": int(1 + n % 80), "score": round(float(rng.random()), 4),
                         "segmentation": segmentation}
            f.write((", " if n else "") + json.dumps(entry))
            n += 1
        f.write("]")
    return n


def write_padded(path: str, mb: int) -> None:
    entry = {"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": {"size": [4, 4], "counts": "04"}}
    with open(path, "wb") as f:
        f.write(b"[" + json.dumps(entry).encode() + b",")
        block = b"\x00" * (1 << 20)
        for _ in range(mb):
            f.write(block)


# Runs in a child process whose working directory is the checkout being measured, so its
# bpr_core is the one imported. Streams the file through iter_results_json (rows built and
# validated) and prints time, rows, bytes read, peak RSS and the error, if any.
CHILD = r"""
import io, json, resource, sys, time
from bpr_core import formats
path = sys.argv[1]
read_bytes = [0]  # over every stream opened (the columnar reader reopens the file to hand it over)
class Counting(io.RawIOBase):
    def __init__(self, f):
        self.f = f
    def readable(self):
        return True
    def readinto(self, b):
        data = self.f.read(len(b))
        b[:len(data)] = data
        read_bytes[0] += len(data)
        return len(data)
    def close(self):
        self.f.close()
        super().close()
reader = sys.argv[2]
t, cpu = time.perf_counter(), time.process_time()
rows, error = 0, ""
try:
    if reader in ("columnar", "ranges"):
        from bpr_core.results_arrow import iter_results_batches
        ranged = {}
        if reader == "ranges":
            import pyarrow.fs
            from bpr_core.results_parallel import FileOpener
            ranged = {"ranged": FileOpener(pyarrow.fs.LocalFileSystem(), path), "min_bytes": 0}
        for table, others in iter_results_batches(lambda: Counting(open(path, "rb")), None, path, **ranged):
            rows += table.num_rows + len(others)
    else:
        # older readers take a text stream; this one takes bytes (gzip/BOM detection)
        counting = Counting(open(path, "rb"))
        source = counting if hasattr(formats, "open_text") else io.TextIOWrapper(io.BufferedReader(counting), encoding="utf-8")
        for _ in formats.iter_results_json(source, strict=False, name=path):
            rows += 1
except formats.InputError as e:
    error = str(e).replace(path, "FILE")[:160]
children = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": round(time.perf_counter() - t, 3), "cpu_seconds": round(time.process_time() - cpu, 3),
                  "readers_cpu_seconds": round(children.ru_utime + children.ru_stime, 3),
                  "readers_peak_rss_mb": round(children.ru_maxrss / 1024, 1),
                  "rows": rows, "error": error,
                  "bytes_read_mb": round(read_bytes[0] / 2 ** 20, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("bench_inputs"), description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/bench_inputs.json")
    ap.add_argument("--repo", action="append", default=[], help="another checkout whose reader to measure (repeatable)")
    ap.add_argument("--pad-mb", type=int, default=512, help="NUL padding after the first entry (default 512 MB)")
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    repos = [("this checkout", here)] + [(os.path.abspath(r), os.path.abspath(r)) for r in args.repo]
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "cases": []}
    with tempfile.TemporaryDirectory() as d:
        files = {}
        for mb, detectron2 in ((64, False), (128, False), (64, True), (256, True), (1024, True)):
            case = f"{'detectron2' if detectron2 else 'results'} {mb} MB"
            files[case] = os.path.join(d, f"{case.replace(' ', '_')}.json")
            results.setdefault("entries", {})[case] = write_results(files[case], mb, detectron2)
        files[f"1 entry + {args.pad_mb} MB NUL"] = os.path.join(d, "pad.json")
        write_padded(files[f"1 entry + {args.pad_mb} MB NUL"], args.pad_mb)
        print(f"{'checkout':<24} {'reader':<10} {'input':<22} {'s':>7} {'cpu s':>7} {'readers':>7} {'rows':>8} {'read MB':>8} "
              f"{'peak MB':>8}  error")
        for label, repo in repos:
            readers = ["entries"] + (["columnar"] if os.path.exists(os.path.join(repo, "bpr_core", "results_arrow.py")) else [])
            readers += ["ranges"] if os.path.exists(os.path.join(repo, "bpr_core", "results_parallel.py")) else []
            for reader in readers:
                for case, path in files.items():
                    if reader == "ranges" and os.path.getsize(path) < 128 << 20:
                        continue  # (readers forced from 128 MB, below the job's threshold: to show why it is there)
                    p = subprocess.run([sys.executable, "-c", CHILD, path, reader], cwd=repo, capture_output=True, text=True,
                                       timeout=1800)
                    if p.returncode:
                        raise RuntimeError(p.stderr[-2000:])
                    r = {"checkout": label, "reader": reader, "input": case, **json.loads(p.stdout.strip().splitlines()[-1])}
                    results["cases"].append(r)
                    print(f"{label[-24:]:<24} {reader:<10} {case:<22} {r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} "
                          f"{r.get('readers_cpu_seconds', 0):>7.2f} {r['rows']:>8} "
                          f"{r['bytes_read_mb']:>8} {r['peak_rss_mb']:>8}  {r['error'][:60]}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
