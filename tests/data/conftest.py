import pytest

from bpr_core.synthetic import write_dataset


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_small")
    write_dataset(out, 12, seed=3)
    return out
