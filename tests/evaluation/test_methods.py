"""Tests for dresd.evaluation.methods: the benchmark's choice of methods from a comma list
(the run itself is benchmarks/spec_bench.py)."""

from __future__ import annotations

import pytest

from dresd.drafters import registry
from dresd.drafters.registry import register_method
from dresd.evaluation.methods import chosen_methods, methods


def test_empty_list_runs_every_benchmark_method_and_greedy_always_first():
    assert [m.name for m in chosen_methods("")] == [m.name for m in methods()]
    assert [m.name for m in chosen_methods("suffix,dresd,greedy,dresd")] == ["greedy", "suffix", "dresd"]


def test_every_method_drafts_from_the_store_its_name_says():
    by_name = {m.name: m for m in methods()}
    assert len(by_name) == len(methods())  # no name twice
    for name, m in by_name.items():
        if m.spec is None:  # an HF generate() reference: no drafter, no datastore
            assert name.startswith("hf-") and m.store is None
            continue
        # SuffixDecoding drafts without a store too, but the benchmark warms it on one, as published.
        uses = registry.method_entry(m.spec.method).needs_datastore or m.spec.method == "suffix"
        assert m.store == (("ood" if name.endswith("@ood") else "id") if uses else None), name
        # "+budget" names the draft budget on; the published methods run with it off.
        if name.endswith("+budget"):
            assert m.spec.budget == "auto" and by_name[name.removesuffix("+budget")].spec.budget == "off"


def test_a_typo_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown method 'dresdd'"):
        chosen_methods("dresd,dresdd")
    with pytest.raises(ValueError, match="unknown method 'suffix@elsewhere'"):
        chosen_methods("suffix@elsewhere")


def test_registered_methods_run_on_the_store_they_name(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    register_method("mine", lambda spec, store, tokenizer, eos_id: None, needs_datastore=True)
    register_method("mine-plain", lambda spec, store, tokenizer, eos_id: None)
    chosen = {m.name: m for m in chosen_methods("mine,mine@ood,mine-plain")}
    assert [(chosen[n].store, chosen[n].spec.method, chosen[n].spec.budget) for n in ("mine", "mine@ood")] == [
        ("id", "mine", "auto"), ("ood", "mine", "auto")]
    # A method that needs no store gets one all the same: "auto" drafts from it when it is there.
    assert chosen["mine-plain"].store == "id"
    assert [(m.store, m.spec.method) for m in chosen_methods("auto,auto@ood")[1:]] == [("id", "auto"), ("ood", "auto")]
