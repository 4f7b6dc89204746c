import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synth30(tmp_path_factory):
    """30 synthetic images with coarse detections (seed 21), shared by pipeline tests."""
    from bpr_core.synthetic import write_dataset

    out = tmp_path_factory.mktemp("synth30")
    write_dataset(out, 30, seed=21)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray for the whole test session (ray.init costs seconds)."""
    import ray

    from pipeline.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
