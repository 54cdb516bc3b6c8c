"""The `dresd` command line: datastore list|show|verify|prune on a local root and a URI root, and
every command loading its config through --config, flags and --set."""

from __future__ import annotations

import json
import uuid

import pytest

from dresd.cli.main import main
from dresd.datastore.publish import publish
from tests_support import make_manifest, make_parts


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    r = str(tmp_path / "store") if request.param == "local" else f"memory://cli-{uuid.uuid4().hex}/store"
    publish(r, make_parts(), make_manifest(), version="v1")
    publish(r, make_parts(seed=1), make_manifest(), version="v2")
    return r


def test_list_marks_current_and_show_describes_or_prints_the_manifest(root, capsys):
    assert main(["datastore", "list", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["v1", "keys=9"], ["*", "v2"]]
    assert main(["datastore", "show", root]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert summary[0].startswith("version   v2 (CURRENT), created ")
    assert summary[1] == "made by   a full build" and ", 9 keys" in summary[4]
    assert main(["datastore", "show", root, "--version", "v1", "--json"]) == 0
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


def _flip_header(vdir):
    data = bytearray((vdir / "tokens.npy").read_bytes())
    data[1] ^= 0xFF  # inside the .npy magic string
    (vdir / "tokens.npy").write_bytes(bytes(data))


def _truncate_index(vdir):
    data = (vdir / "index.faiss").read_bytes()
    (vdir / "index.faiss").write_bytes(data[: len(data) // 2])


def _edit_manifest(vdir):
    m = json.loads((vdir / "manifest.json").read_text())
    (vdir / "manifest.json").write_text(json.dumps(dict(m, eos_id=7)))


def _wrong_current(vdir):
    (vdir.parent.parent / "CURRENT").write_text("v1 " + "0" * 64 + "\n")


def _bad_header_signed(vdir):
    """A header damaged before its checksums were taken: only parsing the file can tell."""
    from dresd.datastore.publish import set_current
    from dresd.storage.files import sha256_file

    _flip_header(vdir)
    m = json.loads((vdir / "manifest.json").read_text())
    m["files"]["tokens.npy"]["sha256"] = sha256_file(vdir / "tokens.npy")
    (vdir / "manifest.json").write_text(json.dumps(m))
    set_current(vdir.parent.parent, "v1")


@pytest.mark.parametrize("damage,expected", [
    (_flip_header, [r"tokens\.npy checksum mismatch \(corrupt file\): sha256 [0-9a-f]{64}, manifest says [0-9a-f]{64}",
                    r"tokens\.npy is unreadable \(a damaged header or content\): ValueError"]),
    (_truncate_index, [r"index\.faiss has \d+ bytes, manifest says \d+"]),
    (_edit_manifest, [r"manifest\.json checksum mismatch: sha256 [0-9a-f]{64}, CURRENT says [0-9a-f]{64}"]),
    (_wrong_current, [r"manifest\.json checksum mismatch: sha256 [0-9a-f]{64}, CURRENT says 0{64}"]),
    (_bad_header_signed, [r"tokens\.npy is unreadable \(a damaged header or content\): ValueError"]),
], ids=["npy-header", "truncated-faiss", "edited-manifest", "wrong-current", "header-signed"])
def test_verify_names_each_mismatch_and_exits_1(tmp_path, capsys, damage, expected):
    import re

    root = tmp_path / "store"
    vdir = publish(root, make_parts(), make_manifest(), version="v1")
    assert main(["datastore", "verify", str(root)]) == 0
    assert "and manifest.json matches the checksum in CURRENT" in capsys.readouterr().out
    damage(vdir)
    assert main(["datastore", "verify", str(root)]) == 1  # returns: no traceback
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(expected)
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(rf"dresd datastore verify: {re.escape(str(vdir))}: {pattern}.*", line), line


def test_list_of_a_folder_without_versions_says_so(tmp_path, capsys):
    assert main(["datastore", "list", str(tmp_path)]) == 1
    assert "no datastore versions" in capsys.readouterr().err


def test_prune_removes_the_versions_older_than_the_kept_ones(root, capsys):
    assert main(["datastore", "prune", root]) == 2  # --keep is required
    assert "give --keep N" in capsys.readouterr().err
    assert main(["datastore", "prune", root, "--keep", "0"]) == 2
    assert "keep must be >= 1" in capsys.readouterr().err
    assert main(["datastore", "prune", root, "--keep", "2"]) == 0
    assert "removed 0 version(s)" in capsys.readouterr().out
    assert main(["datastore", "prune", root, "--keep", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("CURRENT is v2") and out[1:] == ["removed 1 version(s): v1", "kept 1 version(s): v2"]
    assert main(["datastore", "list", root]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()] == [["*", "v2"]]


def _config(argv):
    from dresd.cli.main import build_parser
    from dresd.config.loader import config_from_args

    args = build_parser().parse_args(argv)
    return config_from_args(args.config_cls, args)


def test_generate_flags_reach_the_speculative_configs():
    from dresd.cli.main import generate_specs

    specs = generate_specs(_config(["generate", "--prompt", "hi", "--method", "greedy,dresd,hybrid",
                                    "--verify", "tree,batch", "--top-k", "7", "--budget", "off"]))
    assert list(specs) == ["greedy", "dresd-tree", "dresd-batch", "hybrid-tree"]
    assert specs["dresd-batch"].verify == "batch" and specs["dresd-tree"].top_k == 7
    assert all(s.budget == "off" and s.context_keys and s.hybrid_exact == "pld" for s in specs.values())
    (spec,) = generate_specs(_config(["generate", "--prompt", "hi", "--method", "hybrid", "--no-context-keys",
                                      "--hybrid-exact", "suffix"])).values()
    assert not spec.context_keys and spec.hybrid_exact == "suffix"
    # No --method: the config's own speculative.method, under its own name.
    assert list(generate_specs(_config(["generate", "--set", "speculative.method=pld"]))) == ["pld-tree"]


def test_every_command_takes_config_then_flags_then_set(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text("max_new_tokens: 5\nspeculative:\n  top_k: 3\n  num_drafts: 4\nprompts: [a]\n")
    cfg = _config(["generate", "--config", str(path), "--top-k", "9", "--set", "speculative.num_drafts=2"])
    assert (cfg.max_new_tokens, cfg.speculative.top_k, cfg.speculative.num_drafts, cfg.prompts) == (5, 9, 2, ["a"])
    # A flag's value is overridden by --set, whatever their order on the line.
    assert _config(["build", "--set", "index.dim=16", "--dim", "32"]).index.dim == 16
    assert _config(["build", "--corpus", "a.jsonl", "--corpus", "b", "--kind", "text"]).corpus.paths == ["a.jsonl", "b"]
    up = _config(["update", "delete", "--datastore", "s", "--source", "x", "--source", "y"])
    assert up.output == "s" and up.sources == ["x", "y"]
    assert _config(["datastore", "show", "r", "--version", "v2"]).version == "v2"
    assert _config(["datastore", "list", "--set", "root=r2"]).root == "r2"
    assert _config(["demo", "--prompts", "3", "--set", "records=10"]).records == 10
    # --dtype on every command that loads the model for keys or decoding (default: auto).
    assert _config(["build", "--dtype", "bfloat16"]).model.dtype == "bfloat16"
    assert _config(["update", "add", "--datastore", "s", "--dtype", "float16"]).model.dtype == "float16"
    assert _config(["generate", "--dtype", "float32"]).model.dtype == "float32"
    assert _config(["generate"]).model.dtype == "auto"


@pytest.mark.parametrize("argv, message", [
    (["build", "--set", "corpus.kind=tsv"], "corpus.kind: 'tsv' is not one of ['prompt_response', 'text', 'conversations']"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["generate", "--top-k", "many"], "speculative.top_k: 'many' is not an integer"),
    (["update", "compact", "--set", "bogus=1"], "unknown key 'bogus' in UpdateConfig"),
    (["datastore", "list"], "root is empty"),
    (["update", "compact"], "output is empty (give the datastore root: --datastore ROOT)"),
    (["demo", "--set", "prompts=lots"], "prompts: 'lots' is not an integer"),
    (["generate", "--set", "model.dtype=int8"], "model.dtype: 'int8' is not one of ['auto', 'float32', 'bfloat16', 'float16']"),
    (["build", "--set", "index.ram_share=1.5"], "ram_share must be a number in [0, 1], got 1.5"),
    (["generate", "--prompt", "x", "--method", "greedy,rest"], "--method 'rest' drafts from a datastore: give --datastore ROOT"),
])
def test_bad_config_is_one_line_before_any_work(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith(f"dresd {argv[0]}: error:")


def test_a_yaml_value_of_the_wrong_type_names_file_and_key(tmp_path, capsys):
    path = tmp_path / "b.yaml"
    path.write_text("corpus:\n  paths: [x.jsonl]\n  max_records: ten\n")
    assert main(["build", "--config", str(path)]) == 2
    assert f"{path}: corpus.max_records: 'ten' is not an integer or null" in capsys.readouterr().err


def test_a_data_error_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "store"
    publish(root, make_parts(), make_manifest(), version="v1")
    assert main(["update", "delete", "--datastore", str(root), "--source", "no-such-record"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dresd update: error: ") and "no-such-record" in err[0]
    assert main(["datastore", "show", str(tmp_path / "nowhere")]) == 1
    assert "is not a datastore" in capsys.readouterr().err


def test_serve_beyond_loopback_without_an_api_key_refuses_before_ray_starts(capsys, monkeypatch):
    monkeypatch.delenv("DRESD_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "8123", "--method", "greedy"]) == 2
    err = capsys.readouterr().err
    assert "dresd serve: error: host '0.0.0.0' is not loopback: set an API key in $DRESD_API_KEY" in err
    assert main(["serve", "--replicas", "0"]) == 2
    assert "replicas must be >= 1, got 0" in capsys.readouterr().err
    assert main(["serve", "--method", "dresd"]) == 2  # a method that drafts from a datastore, without one
    assert "speculative.method 'dresd' needs a datastore: give --datastore ROOT" in capsys.readouterr().err
    assert main(["serve", "--method", "medusa", "--datastore", "x"]) == 2
    assert "speculative.method (--method): " in capsys.readouterr().err


def test_cache_show_lists_entries_and_prune_evicts_down_to_the_bound(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DRESD_CACHE_MAX_GB", "50")  # restored after the test: the command sets it
    for name in ("a", "b"):
        (tmp_path / "cache" / "derived" / name).mkdir(parents=True)
        (tmp_path / "cache" / "derived" / name / "index").write_bytes(b"x" * 2000)
    assert main(["cache", "show", "--max-gb", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("2 evictable entries, 0.000 GB (bound 1.000 GB)") and len(out) == 3
    assert "derived cache" in out[1]
    assert main(["cache", "prune", "--set", "cache.max_gb=0.000003"]) == 0  # room for one
    out = capsys.readouterr().out
    assert "evicted derived cache" in out
    assert len([p for p in (tmp_path / "cache" / "derived").iterdir() if p.is_dir()]) == 1
    assert main(["cache", "prune", "--max-gb", "-1"]) == 2
    assert "max_gb must be a number >= 0" in capsys.readouterr().err


def test_calibrate_measures_the_layout_check_and_the_cost_curves_again(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["calibrate", "--model", str(tiny_model_dir), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "verification cost: one position" in out and "batch of" not in out
    cached = {kind: next((tmp_path / "cache" / kind).glob("*.json")) for kind in ("cost", "layout-check")}
    # Stale figures (measured while the machine was busy, say) are replaced, not read back.
    for path in cached.values():
        data = json.loads(path.read_text())
        data["value"] = {k: ([1e3] * len(v) if isinstance(v, list) else 1e3 if isinstance(v, float) else v)
                         for k, v in data["value"].items()}
        path.write_text(json.dumps(data))
    assert main(["calibrate", "--model", str(tiny_model_dir), "--threads", "1", "--batch"]) == 0
    out = capsys.readouterr().out
    assert "batch of 16: one position a row" in out
    cost = json.loads(cached["cost"].read_text())["value"]
    assert max(cost["seconds"]) < 1e3
    check = json.loads(cached["layout-check"].read_text())["value"]
    assert check["kernel_s"] < 1e3 and check["stock_s"] < 1e3
    assert len(list((tmp_path / "cache" / "cost").glob("*.json"))) == 2  # the one-sequence and the batched curve
