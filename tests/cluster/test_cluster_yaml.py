"""cluster.yaml checked offline with Ray's own schema and config validation (never `ray up`)."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


def _load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _check(config):
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_ray_validation():
    config = _load()
    _check(config)
    types = config["available_node_types"]
    assert types["gpu_workers"]["resources"]["GPU"] == 1 and types["head"]["resources"]["CPU"] == 0


def test_unknown_field_fails():
    config = _load()
    config["available_node_types"]["gpu_workers"]["gpus_please"] = 1
    with pytest.raises(jsonschema.ValidationError):
        _check(config)


def test_head_type_missing_from_node_types_fails():
    config = _load()
    config["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="no_such_type|head_node_type"):
        _check(config)
