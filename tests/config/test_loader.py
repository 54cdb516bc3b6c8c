"""dresd.config.loader: --set overrides converted by field type, YAML values checked by
field type and choices, flags and the configs' own checks, and one-line errors naming the key."""

from __future__ import annotations

import pytest

from dresd.config import BuildConfig, DecodeConfig, GenerateConfig
from dresd.config.loader import ConfigError, apply_overrides, check_value, from_dict, load_config, load_yaml


def test_overrides_convert_by_field_type():
    cfg = BuildConfig()
    out = apply_overrides(cfg, [
        "corpus.max_records=100", "corpus.max_tokens=none", "corpus.paths=a.jsonl, b.jsonl",
        "index.refine=false", "index.refine_k_factor=2.5", "embed_gpus=1", "model.path=/m",
        "corpus.kind=conversations", "output=x=y",
    ])
    assert out.corpus.max_records == 100 and out.corpus.max_tokens is None
    assert out.corpus.paths == ["a.jsonl", "b.jsonl"]
    assert out.index.refine is False and out.index.refine_k_factor == 2.5
    assert out.embed_gpus == 1.0 and isinstance(out.embed_gpus, float)
    assert out.model.path == "/m" and out.corpus.kind == "conversations"
    assert out.output == "x=y"  # only the first '=' splits
    assert cfg.corpus.max_records is None  # the input is not modified
    assert apply_overrides(cfg, ["corpus.paths=[sharegpt, 'c d.jsonl']"]).corpus.paths == ["sharegpt", "c d.jsonl"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("corpus.bogus=1", r"unknown key 'bogus' in corpus"),
        ("bogus.x=1", r"unknown key 'bogus' in BuildConfig"),
        ("corpus=1", r"corpus is a section"),
        ("value_len.x=1", r"value_len is a value, not a section"),
        ("batch_size=8.5", r"batch_size: '8.5' is not an integer"),
        ("index.refine=maybe", r"not a boolean"),
        ("corpus.on_error=ignore", r"not one of \['skip', 'fail'\]"),
        ("no_equals_sign", r"expected KEY=VALUE"),
    ],
)
def test_bad_overrides_raise_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(BuildConfig(), [override])


@pytest.mark.parametrize("data, message", [
    ({"corpus": {"kind": "tsv"}}, "corpus.kind: 'tsv' is not one of"),
    ({"corpus": {"paths": "a.jsonl"}}, "corpus.paths: 'a.jsonl' is not a list of a string"),
    ({"corpus": {"max_records": 1.5}}, "corpus.max_records: 1.5 is not an integer or null"),
    ({"index": {"refine": "yes"}}, "index.refine: 'yes' is not a boolean"),
    ({"index": 3}, "index: expected a section of IndexConfig fields, got 3"),
    ({"embed_actors": True}, "embed_actors: True is not an integer"),
    ({"model": {"pth": "x"}}, "model: unknown key(s) ['pth'] for ModelConfig"),
])
def test_yaml_values_are_checked_by_field_type(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(BuildConfig, data)
    assert message in str(err.value)


def test_yaml_values_convert_losslessly(tmp_path):
    cfg = from_dict(BuildConfig, {"embed_gpus": 1, "corpus": {"max_tokens": None, "paths": ["a"]}})
    assert cfg.embed_gpus == 1.0 and isinstance(cfg.embed_gpus, float) and cfg.corpus.max_tokens is None
    assert check_value([1, 2], tuple[int, ...], "k") == (1, 2)
    path = tmp_path / "c.yaml"
    path.write_text("corpus:\n  kind: text\n")
    assert load_yaml(BuildConfig, path).corpus.kind == "text"
    path.write_text("- a\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(BuildConfig, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(BuildConfig, tmp_path / "none.yaml")


def test_load_config_layers_defaults_yaml_flags_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output: from-yaml\nvalue_len: 9\nbatch_size: 3\n")
    cfg = load_config(BuildConfig, path, ["batch_size=5"], {"value_len": 7, "batch_size": 4})
    assert (cfg.output, cfg.value_len, cfg.batch_size, cfg.shard_rows) == ("from-yaml", 7, 5, BuildConfig().shard_rows)
    with pytest.raises(ConfigError, match="value_len: 'x' is not an integer"):
        load_config(BuildConfig, None, (), {"value_len": "x"})


@pytest.mark.parametrize("cls, overrides, message", [
    (DecodeConfig, ["top_p=0"], "top_p must be in (0, 1]"),
    (DecodeConfig, ["temperature=-0.5"], "temperature must be a finite number >= 0"),
    (DecodeConfig, ["batch_size=0"], "batch_size, chunk_rows, actors must be >= 1"),
    (DecodeConfig, ["limit=-1"], "skip and limit must be >= 0"),
    (GenerateConfig, ["temperature=nan"], "temperature must be a finite number >= 0"),
])
def test_config_checks_run_when_loaded(cls, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, overrides)
    assert message in str(err.value)
