import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_job(module: str, args: list[str], env_extra: dict | None = None, timeout: float = 300, wait: bool = True):
    """Run `python -m <module>` as a user would, with its own private Ray (in its own temp dir when
    BPR_RAY_TEMP_DIR is given). Returns (returncode, output), or the process when wait=False."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc, env.get("BPR_RAY_TEMP_DIR"))
        raise
    return proc.returncode, out


def run_refine_subprocess(args: list[str], env_extra: dict | None = None, timeout: float = 300, wait: bool = True):
    return run_job("jobs.refine", args, env_extra, timeout, wait)


def kill_tree(proc, temp_dir: str | None = None) -> None:
    """Stop what this test started: the driver's process group, and any process of the Ray it
    started in its own temp dir (found by that dir in the command line), by pid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if temp_dir:
        kill_temp_dir_processes(temp_dir)


def kill_temp_dir_processes(temp_dir: str) -> None:
    """SIGKILL every process whose command line names `temp_dir` (a Ray this test started)."""
    assert temp_dir.startswith("/tmp/bprt-"), temp_dir
    deadline = time.time() + 10
    while time.time() < deadline:
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if temp_dir.encode() in (d / "cmdline").read_bytes():
                        pids.append(int(d.name))
                except OSError:
                    pass
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
