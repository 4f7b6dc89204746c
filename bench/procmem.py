"""Resident memory of a whole process tree (driver + local Ray: raylet, GCS, workers), sampled in a
background thread from /proc (Linux). Used by the benchmark and the soak run, never by tests."""

from __future__ import annotations

import os
import threading
import time


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_memory(root: int | None = None) -> dict[str, int]:
    """Memory of `root` (default: this process) and all its descendants, in bytes:
    rss    the sum of VmRSS: a page mapped by several processes (Ray's object store is shared
           memory every worker maps) counts once per process that has touched it;
    shmem  the part of rss that is shared memory (RssShmem);
    pss    the sum of Pss (/proc/PID/smaps_rollup): each shared page divided among the processes
           mapping it, so the sum is the memory the tree really holds."""
    root = root or os.getpid()
    kids = _children()
    out = {"rss": 0, "shmem": 0, "pss": 0}
    stack = [root]
    while stack:
        pid = stack.pop()
        stack.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out["rss"] += int(line.split()[1]) * 1024
                    elif line.startswith("RssShmem:"):
                        out["shmem"] += int(line.split()[1]) * 1024
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        out["pss"] += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return out


def tree_rss_bytes(root: int | None = None) -> int:
    """Sum of VmRSS over `root` (default: this process) and all its descendants."""
    return tree_memory(root)["rss"]


class PeakRSS:
    """with PeakRSS() as m: ...; m.peak (bytes, summed RSS), m.peak_pss (bytes, summed PSS),
    m.peak_shmem (the shared-memory part of the summed RSS at its peak), m.samples [(seconds, rss)]."""

    def __init__(self, interval: float = 0.5, root: int | None = None):
        self.interval, self.root = interval, root
        self.peak = self.peak_pss = self.peak_shmem = 0
        self.samples = []
        self._stop = threading.Event()

    def _run(self):
        t0 = time.time()
        while not self._stop.is_set():
            m = tree_memory(self.root)
            if m["rss"] > self.peak:
                self.peak, self.peak_shmem = m["rss"], m["shmem"]
            self.peak_pss = max(self.peak_pss, m["pss"])
            self.samples.append((round(time.time() - t0, 2), m["rss"]))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False
