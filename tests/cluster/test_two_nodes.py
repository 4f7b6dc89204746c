"""Two Ray nodes on this machine, the second in a private mount namespace (`unshare -m`) where a
directory the head sees is hidden under an empty tmpfs: a local path only the head can see is
refused before any work, naming the option and the node; with paths every node sees, a refine
job runs across both nodes."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpr_core.synthetic import write_dataset

from ..pipeline.conftest import run_job
from .ports import free_ports

RAY = str(Path(sys.executable).parent / "ray")


def _kill_tree(marker: str) -> None:
    """SIGKILL every process whose command line names `marker`, and all their descendants (Ray's
    agents rename themselves and would outlive their raylet)."""
    assert marker.startswith("/tmp/bprt-")
    for _ in range(20):
        parent, named = {}, set()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                if marker.encode() in (d / "cmdline").read_bytes():
                    named.add(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
        doomed, grew = set(named), True
        while grew:
            kids = {p for p, pp in parent.items() if pp in doomed} - doomed
            grew = bool(kids)
            doomed |= kids
        if not doomed:
            return
        for pid in doomed:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (a private mount namespace) to hide a directory from the second node")
    temp = f"/tmp/bprt-2n-{os.getpid()}"
    hidden = Path(temp) / "hidden"
    shared = Path(temp) / "shared"
    write_dataset(hidden / "data", 6, seed=5)
    write_dataset(shared / "data", 6, seed=5)
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    # Both nodes get the S3 endpoint and credentials in their environment, as instance profiles
    # would give them on AWS.
    s3_env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bprtestkey",
              "AWS_SECRET_ACCESS_KEY": "bprTestSecret", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **s3_env})
    # Both nodes' ports picked at once, so no two of them can coincide.
    gcs, *p = free_ports(12)
    agents = lambda: [f"--dashboard-agent-listen-port={p.pop()}", f"--dashboard-agent-grpc-port={p.pop()}",  # noqa: E731
                      f"--runtime-env-agent-port={p.pop()}", f"--metrics-export-port={p.pop()}"]
    try:
        subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
                        f"--temp-dir={temp}/ray", "--include-dashboard=false", "--disable-usage-stats", *agents()],
                       env=env, check=True, capture_output=True, timeout=120)
        worker = [RAY, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                  f"--node-manager-port={p.pop()}", f"--object-manager-port={p.pop()}", f"--min-worker-port={p.pop()}",
                  "--max-worker-port=0", "--disable-usage-stats", *agents()]
        script = f"mount -t tmpfs tmpfs {hidden} && exec " + " ".join(worker)
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=env, check=True,
                       capture_output=True, timeout=120)
        yield {"address": f"127.0.0.1:{gcs}", "hidden": hidden / "data", "shared": shared / "data", "temp": temp, "s3": s3_env}
    finally:
        _kill_tree(temp)
        moto.stop()


def _refine(nodes, data, out, extra_env=None):
    return run_job("jobs.refine", ["--address", nodes["address"], "--images", str(data / "images"), "--coarse",
                                   str(data / "coarse.json"), "--image-info", str(data / "annotations.json"),
                                   "--out", str(out), "--refiner", "guided-filter"], extra_env, timeout=300)


def test_a_path_only_the_head_sees_is_refused_naming_the_node(two_nodes):
    rc, log = _refine(two_nodes, two_nodes["hidden"], two_nodes["shared"] / "out-a")
    assert rc == 2, log
    line = [l for l in log.splitlines() if l.startswith("error:")][-1]
    assert re.fullmatch(rf"error: --images {re.escape(str(two_nodes['hidden'] / 'images'))} is a local path that node "
                        r"[0-9.]+ \([0-9a-f]{8}\) cannot see; on a cluster give an s3:// URI or a directory every node mounts",
                        line), line
    assert "Traceback" not in log
    assert not (two_nodes["shared"] / "out-a" / "manifest.json").exists()
    rc, log = _refine(two_nodes, two_nodes["shared"], two_nodes["hidden"].parent / "out-b")
    assert rc == 2 and f"error: --out {two_nodes['hidden'].parent / 'out-b'} is a local path that node" in log, log


def test_paths_every_node_sees_refine_across_both_nodes(two_nodes):
    out = two_nodes["shared"] / "out"
    rc, log = _refine(two_nodes, two_nodes["shared"], out)
    assert rc == 0, log
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["invariant"]["ok"]
    assert len(json.loads((out / "refined.json").read_text())) == m["counts"]["input"]


def test_s3_inputs_and_outputs_work_across_both_nodes(two_nodes):
    import boto3

    env = two_nodes["s3"]
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"])
    s3.create_bucket(Bucket="two")
    data = two_nodes["hidden"]  # only the head can see these files locally: every node must go through S3
    for p in sorted(data.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), "two", f"in/{p.relative_to(data).as_posix()}")
    rc, log = run_job("jobs.refine", ["--address", two_nodes["address"], "--images", "s3://two/in/images", "--coarse",
                                      "s3://two/in/coarse.json", "--image-info", "s3://two/in/annotations.json",
                                      "--out", "s3://two/out", "--refiner", "guided-filter"], env, timeout=300)
    assert rc == 0, log
    m = json.loads(s3.get_object(Bucket="two", Key="out/manifest.json")["Body"].read())
    assert m["status"] == "complete" and m["invariant"]["ok"]
    out = json.loads(s3.get_object(Bucket="two", Key="out/refined.json")["Body"].read())
    assert len(out) == m["counts"]["input"] > 0
