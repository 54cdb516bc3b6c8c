"""Tests for dresd.config.schema: the sampling values are checked in one place, for
SamplingParams and for the configs that hold them flat."""

from __future__ import annotations

import pytest

from dresd.config import SamplingParams
from dresd.config.schema import sampling_problems


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=-1.0), dict(temperature=float("nan")),
                                    dict(temperature=float("inf")), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(top_p=float("nan"))])
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_are_greedy_at_temperature_zero_only():
    assert SamplingParams().greedy and SamplingParams(0, 0.5).greedy
    assert not SamplingParams(0.5).greedy and SamplingParams(0.7, 0.9, 1).greedy is False


def test_sampling_problems_names_each_bad_value():
    assert sampling_problems(0.0, 1.0) == [] and sampling_problems(2, 0.5) == []
    both = sampling_problems(-1.0, 2.0)
    assert both == ["temperature must be a finite number >= 0, got -1.0", "top_p must be in (0, 1], got 2.0"]
    # A YAML `true` is a bool, which Python counts as an int: it is still no temperature.
    assert sampling_problems(True, 1.0) == ["temperature must be a finite number >= 0, got True"]
    assert sampling_problems(0.5, True) == ["top_p must be in (0, 1], got True"]
    assert sampling_problems("0.5", 1.0) == ["temperature must be a finite number >= 0, got '0.5'"]
    # SamplingParams raises with the same messages.
    with pytest.raises(ValueError, match=r"^temperature must be a finite number >= 0, got -1.0; top_p must be in"):
        SamplingParams(-1.0, 2.0)


def test_a_negative_suffix_cache_bound_is_refused_naming_the_key():
    from dresd.config import ConfigError, GenerateConfig, SpeculativeConfig
    from dresd.config.loader import load_config

    assert SpeculativeConfig().problems() == []
    assert SpeculativeConfig(suffix_cached_responses=-1).problems() == [
        "suffix_cached_responses must be an integer >= 0, got -1"]
    with pytest.raises(ConfigError, match=r"GenerateConfig.speculative: suffix_cached_responses must be"):
        load_config(GenerateConfig, overrides=["speculative.suffix_cached_responses=-1"])


def test_the_cache_bound_loads_through_every_filling_command_and_is_checked(tmp_path):
    from dresd.config import BuildConfig, CacheConfig, ConfigError, DecodeConfig, GenerateConfig, UpdateConfig
    from dresd.config.loader import load_config

    assert CacheConfig().max_gb is None and CacheConfig().problems() == []
    assert CacheConfig(max_gb=-1).problems() == ["max_gb must be a number >= 0 (or .inf), got -1"]
    for cls in (BuildConfig, UpdateConfig, GenerateConfig, DecodeConfig):
        assert load_config(cls, overrides=["cache.max_gb=20", "output=r"] if cls is UpdateConfig
                           else ["cache.max_gb=20"]).cache.max_gb == 20.0
    path = tmp_path / "build.yaml"
    path.write_text("cache:\n  max_gb: .inf\n")
    assert load_config(BuildConfig, path).cache.max_gb == float("inf")
    with pytest.raises(ConfigError, match=r"BuildConfig.cache: max_gb must be a number >= 0"):
        load_config(BuildConfig, overrides=["cache.max_gb=-2"])
