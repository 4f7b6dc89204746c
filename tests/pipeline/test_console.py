"""Progress lines (rate, ETA, already-done work) and the stderr filter that keeps Ray's
known-harmless lines off the console."""

import io
import os
import subprocess
import sys

from pipeline.console import KNOWN_HARMLESS, Progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_lines_count_rate_and_eta_from_work_done_in_this_run():
    clock, out = Clock(), io.StringIO()
    p = Progress(total_images=100, total_instances=400, stream=out, tty=False, interval=0, clock=clock)
    p.add(20, 80, 0, already_done=True, note="shard-00000 already done")  # resumed: not part of the rate
    clock.t += 10
    p.add(30, 120, 500, note="shard-00001 committed")
    assert out.getvalue().splitlines() == [
        "20/100 images (20%), 80/400 instances, 0 patches | 0.0 img/s, 0s elapsed, ETA -- | shard-00000 already done",
        "50/100 images (50%), 200/400 instances, 500 patches | 3.0 img/s, 10s elapsed, ETA 17s | shard-00001 committed",
    ]


def test_progress_rewrites_one_line_on_a_terminal():
    out = io.StringIO()
    with Progress(10, 10, stream=out, tty=True, interval=0, clock=Clock()) as p:
        p.add(5, 5, 1)
        p.add(5, 5, 1)
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_quiet_ray_drops_only_the_known_lines_written_to_fd_2():
    """A child writes, at the file-descriptor level like Ray's C++ core worker, one known-harmless
    line, a Ray INFO line, a real error and a line of ours; only the last two come out, in order."""
    code = (
        "import os, sys\n"
        "from pipeline.console import quiet_ray\n"
        "with quiet_ray():\n"
        f"    os.write(2, b'[E core_worker.cc:2465] Actor with class name X ' + {KNOWN_HARMLESS[0]!r} + b'\\n')\n"
        "    os.write(2, b'2026-01-01 00:00:00,000\\tINFO worker.py:1 -- Started a local Ray instance.\\n')\n"
        "    os.write(2, b'[E core_worker.cc:1] something real\\n')\n"
        "    print('progress line', file=sys.stderr)\n"
        "print('after', file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == ["[E core_worker.cc:1] something real", "progress line", "after"]
