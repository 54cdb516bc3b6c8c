"""The `dresd datastore list|show|verify` commands, on a local root and a URI root."""

from __future__ import annotations

import json
import uuid

import pytest

from dresd.cli import main
from dresd.datastore import publish
from tests_support import make_manifest, make_parts


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    r = str(tmp_path / "store") if request.param == "local" else f"memory://cli-{uuid.uuid4().hex}/store"
    publish(r, make_parts(), make_manifest(), version="v1")
    publish(r, make_parts(seed=1), make_manifest(), version="v2")
    return r


def test_list_marks_current_and_show_prints_the_manifest(root, capsys):
    assert main(["datastore", "list", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["v1", "keys=9"], ["*", "v2"]]
    assert main(["datastore", "show", root, "--version", "v1"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["version"] == "v1" and manifest["counts"]["keys"] == 9 and "sha256" in manifest["files"]["tokens.npy"]


def test_verify_passes_then_names_a_corrupt_file(tmp_path, capsys):
    root = tmp_path / "store"
    vdir = publish(root, make_parts(), make_manifest(), version="v1")
    assert main(["datastore", "verify", str(root)]) == 0
    assert "all 6 files match" in capsys.readouterr().out
    data = bytearray((vdir / "tokens.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    (vdir / "tokens.npy").write_bytes(bytes(data))
    assert main(["datastore", "verify", str(root)]) == 1
    assert "tokens.npy checksum mismatch" in capsys.readouterr().err


def test_list_of_a_folder_without_versions_says_so(tmp_path, capsys):
    assert main(["datastore", "list", str(tmp_path)]) == 1
    assert "no datastore versions" in capsys.readouterr().err


def test_generate_flags_reach_the_speculative_configs():
    from dresd.cli import build_parser, generate_specs

    args = build_parser().parse_args(["generate", "--prompt", "hi", "--method", "greedy,dresd,hybrid",
                                      "--verify", "tree,batch", "--top-k", "7", "--budget", "off"])
    specs = generate_specs(args)
    assert list(specs) == ["greedy", "dresd-tree", "dresd-batch", "hybrid-tree"]
    assert specs["dresd-batch"].verify == "batch" and specs["dresd-tree"].top_k == 7
    assert all(s.budget == "off" and s.context_keys and s.hybrid_exact == "pld" for s in specs.values())
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--method", "hybrid", "--no-context-keys",
                                      "--hybrid-exact", "suffix"])
    (spec,) = generate_specs(args).values()
    assert not spec.context_keys and spec.hybrid_exact == "suffix"
