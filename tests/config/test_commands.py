"""Tests for dresd.config.commands: each command's own checks (`problems()`), the sampling
parameters a generate run builds, and defaults that fit together across commands."""

from __future__ import annotations

import pytest

from dresd.config import (PACKAGED_PROMPTS, BuildConfig, DatastoreCommandConfig, DecodeConfig, GenerateConfig,
                          SamplingParams, SpeculativeConfig, UpdateConfig)


def test_defaults_have_no_problems():
    for cls in (GenerateConfig, DecodeConfig):
        assert cls().problems() == []
    assert DecodeConfig().prompts in PACKAGED_PROMPTS
    # A default decode drafts from a default build: drafts must fit the stored values.
    assert SpeculativeConfig().len_drafts <= BuildConfig().value_len - 1


@pytest.mark.parametrize("changes, problem", [
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(batch_size=0), "batch_size, chunk_rows, actors must be >= 1"),
    (dict(chunk_rows=0), "batch_size, chunk_rows, actors must be >= 1"),
    (dict(actors=0), "batch_size, chunk_rows, actors must be >= 1"),
    (dict(skip=-1), "skip and limit must be >= 0"),
    (dict(limit=-1), "skip and limit must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
])
def test_decode_config_problems(changes, problem):
    assert DecodeConfig(**changes).problems() == [problem]


def test_decode_config_problems_are_all_listed():
    cfg = DecodeConfig(max_new_tokens=-1, actors=0, limit=-2, temperature=-1.0)
    assert len(cfg.problems()) == 4
    # The bounds themselves are allowed.
    assert DecodeConfig(max_new_tokens=0, skip=0, limit=0, batch_size=1, chunk_rows=1, actors=1).problems() == []


def test_update_and_datastore_commands_need_a_root():
    assert UpdateConfig().problems() == ["output is empty (give the datastore root: --datastore ROOT)"]
    assert UpdateConfig(output="store").problems() == []
    # An update is a build of the added corpus: it takes every build setting.
    assert UpdateConfig(output="store", value_len=9).value_len == 9 and isinstance(UpdateConfig(), BuildConfig)
    assert DatastoreCommandConfig().problems() == ["root is empty (give the datastore root)"]
    assert DatastoreCommandConfig(root="store").problems() == []


def test_generate_config_builds_its_sampling_params():
    assert GenerateConfig().sampling() is None
    assert GenerateConfig(temperature=0.7, seed=3).sampling() == SamplingParams(0.7, 1.0, 3)
    assert GenerateConfig(temperature=0.5, top_p=0.9).sampling() == SamplingParams(0.5, 0.9, None)
    # top_p alone does not make a greedy run sample.
    assert GenerateConfig(top_p=0.5).sampling() is None
    assert GenerateConfig(temperature=float("nan")).problems() == ["temperature must be a finite number >= 0, got nan"]


def test_serve_config_names_each_bad_limit():
    from dresd.config import ServeConfig, SpeculativeConfig

    assert ServeConfig().problems() == []
    bad = ServeConfig(port=0, max_batch=0, max_queued_requests=-2, request_timeout_s=0,
                      speculative=SpeculativeConfig(verify="batch")).problems()
    assert bad == ["port must be in 1..65535, got 0", "max_batch must be >= 1, got 0",
                   "max_queued_requests must be >= 0 or -1 (no limit), got -2", "request_timeout_s must be > 0, got 0",
                   "speculative.verify must be 'tree' (replicas verify every sequence's tree in one batch)"]
