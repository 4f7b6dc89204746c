"""What a job prints: progress with rate and ETA, and Ray's known-harmless chatter kept off the
console (all of it comes back with --verbose).

Ray writes to the driver's stderr from Python loggers (INFO lines per dataset, a warning that a
dataset "will hang" while our actor pools hold the CPUs on purpose, a note that progress bars are
off) and from its C++ core worker (an ERROR-level line for every Ray Data actor pool, "has
constructor arguments in the object store and max_restarts > 0": ray-project/ray#57733, harmless
here). `quiet_ray()` drops Ray's INFO lines and exactly those known lines at the file-descriptor
level, where the C++ line is written; anything else passes through.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

# Substrings of the lines `quiet_ray` drops; each is a message Ray prints in a clean run.
KNOWN_HARMLESS = (
    b"has constructor arguments in the object store and max_restarts > 0",  # core_worker.cc, ray#57733
    b"The Dataset job will hang unless more CPUs are freed up",  # our actor pools hold their CPUs on purpose
    b"Progress bars disabled. To enable",
    b"registers for logging while another dataset",
)
# Ray's own console format for INFO records ("<date> <time>\tINFO file.py:N -- message"); Ray
# re-applies its logging config at init and at each dataset's start, so levels set beforehand do
# not hold, and these are dropped by format instead (ours use a space, not a tab, before INFO).
RAY_INFO = b"\tINFO "


class _FdFilter:
    """Route fd 2 through a pipe; a thread forwards every line except the known-harmless ones."""

    def __init__(self, drop: tuple[bytes, ...]):
        self.drop = drop
        self.dropped = 0

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self.thread = threading.Thread(target=self._pump, args=(r,), name="bpr-stderr-filter", daemon=True)
        self.thread.start()
        return self

    def _pump(self, r: int) -> None:
        with os.fdopen(r, "rb", buffering=0) as f:
            pending = b""
            while chunk := f.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                out = []
                for line in lines:
                    if any(p in line for p in self.drop) or (RAY_INFO in line and b" -- " in line):
                        self.dropped += 1
                    else:
                        out.append(line + b"\n")
                if out:
                    os.write(self.saved, b"".join(out))
            if pending:
                os.write(self.saved, pending)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)  # our write end closes: the pump drains what is left and stops
        self.thread.join(timeout=2.0)
        return False


@contextlib.contextmanager
def quiet_ray(verbose: bool = False):
    """Within: Ray's INFO lines and its known-harmless warnings dropped (nothing changes with
    `verbose`)."""
    if verbose:
        yield
        return
    with _FdFilter(KNOWN_HARMLESS):
        yield


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Progress:
    """Images / instances / patches done, rate and ETA, on stderr: one line rewritten in place on a
    terminal, else a line per update and at least every `interval` seconds (logs, `ray job logs`).
    Work found already done (committed shards) counts as done but not towards the rate."""

    def __init__(self, total_images: int, total_instances: int, stream=None, tty: bool | None = None, interval: float = 30.0,
                 clock=time.monotonic):
        self.total_images, self.total_instances = total_images, total_instances
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval, self.clock = interval, clock
        self.started = clock()
        self.images = self.instances = self.patches = 0
        self.skipped_images = 0
        self.note = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, images: int, instances: int, patches: int, already_done: bool = False, note: str = "",
            emit: bool = True) -> None:
        """Count work done; emit=False counts it for the next line without writing one."""
        with self._lock:
            self.images += images
            self.instances += instances
            self.patches += patches
            if already_done:
                self.skipped_images += images
            if note:
                self.note = note
        if emit:
            self.emit()

    def rate(self) -> float:
        """Images per second over the work done in this run."""
        elapsed = self.clock() - self.started
        return (self.images - self.skipped_images) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        elapsed = self.clock() - self.started
        rate = self.rate()
        left = self.total_images - self.images
        eta = "--" if rate <= 0 else _duration(left / rate)
        pct = 100.0 * self.images / self.total_images if self.total_images else 100.0
        text = (f"{self.images:,}/{self.total_images:,} images ({pct:.0f}%), {self.instances:,}/{self.total_instances:,} "
                f"instances, {self.patches:,} patches | {rate:.1f} img/s, {_duration(elapsed)} elapsed, ETA {eta}")
        return text + (f" | {self.note}" if self.note else "")

    def emit(self) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self):
        if self.interval > 0:
            self._thread = threading.Thread(target=self._beat, name="bpr-progress", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.emit()

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=1.0)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return False
