"""Tests for benchmarks/spec_bench.py's choice of methods (the run itself is the benchmark)."""

from __future__ import annotations

import pytest

from benchmarks.spec_bench import chosen_methods, methods
from dresd.drafters import registry
from dresd.drafters.registry import register_method


def test_empty_list_runs_every_benchmark_method_and_greedy_always_first():
    assert [m.name for m in chosen_methods("")] == [m.name for m in methods()]
    assert [m.name for m in chosen_methods("suffix,dresd,greedy,dresd")] == ["greedy", "suffix", "dresd"]


def test_a_typo_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown method 'dresdd'"):
        chosen_methods("dresd,dresdd")
    with pytest.raises(ValueError, match="unknown method 'suffix@elsewhere'"):
        chosen_methods("suffix@elsewhere")


def test_registered_methods_run_on_the_store_they_need(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    register_method("mine", lambda spec, store, tokenizer, eos_id: None, needs_datastore=True)
    register_method("mine-plain", lambda spec, store, tokenizer, eos_id: None)
    chosen = {m.name: m for m in chosen_methods("mine,mine@ood,mine-plain")}
    assert [(chosen[n].store, chosen[n].spec.method, chosen[n].spec.budget) for n in ("mine", "mine@ood")] == [
        ("id", "mine", "auto"), ("ood", "mine", "auto")]
    assert chosen["mine-plain"].store is None
