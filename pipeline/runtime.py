"""Starting or joining Ray the same way from every job."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """Join the cluster named by `address` or $RAY_ADDRESS (set by `ray job submit`), else start a
    private local Ray. A bare ray.init() would attach to any cluster already on the machine."""
    import ray
    from ray.data import DataContext

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        pass
    elif address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs = {}
        if os.environ.get("BPR_RAY_TEMP_DIR"):  # lets a test find and stop exactly its own Ray
            kwargs["_temp_dir"] = os.environ["BPR_RAY_TEMP_DIR"]
        ray.init("local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver, **kwargs)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def check_paths_on_every_node(paths: dict[str, str], out: str | None = None, timeout: float = 60.0) -> None:
    """On a cluster of more than one node, refuse local paths a node cannot see, before any work.

    `paths` maps an option (e.g. "--images") to a path it names; s3:// ones are skipped (every node
    reaches them through the same credentials chain). `out`, if local, must be shared too: the
    driver writes a probe file there and every node must see it (parts are written by the
    workers). Nodes an autoscaler adds later are not checked. Raises InputError naming the option,
    the path and the node."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from bpr_core.formats import InputError

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = {opt: os.path.abspath(p) for opt, p in paths.items() if p and "://" not in p}
    probe = None
    if out and "://" not in out:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(os.path.abspath(out), f".bpr-probe-{uuid.uuid4().hex[:8]}")
        open(probe, "w").close()
        local["--out"] = probe
    try:
        if len(nodes) <= 1 or not local:
            return

        @ray.remote(num_cpus=0, max_retries=0)
        def look(targets: dict) -> dict:
            return {opt: os.path.exists(p) for opt, p in targets.items()}

        refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": look.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(local) for n in nodes}
        for node, ref in refs.items():
            seen = ray.get(ref, timeout=timeout)
            for opt, ok in seen.items():
                if not ok:
                    shown = os.path.dirname(local[opt]) if opt == "--out" else local[opt]
                    raise InputError(f"{opt} {shown} is a local path that node {node} cannot see; on a cluster give "
                                     "an s3:// URI or a directory every node mounts")
    finally:
        if probe:
            os.unlink(probe)
