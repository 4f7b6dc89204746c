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


def tree_rss_bytes(root: int | None = None) -> int:
    """Sum of VmRSS over `root` (default: this process) and all its descendants."""
    root = root or os.getpid()
    kids = _children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class PeakRSS:
    """with PeakRSS() as m: ...; m.peak (bytes), m.samples [(seconds, bytes)]."""

    def __init__(self, interval: float = 0.5, root: int | None = None):
        self.interval, self.root = interval, root
        self.peak, self.samples = 0, []
        self._stop = threading.Event()

    def _run(self):
        t0 = time.time()
        while not self._stop.is_set():
            rss = tree_rss_bytes(self.root)
            self.peak = max(self.peak, rss)
            self.samples.append((round(time.time() - t0, 2), rss))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False
