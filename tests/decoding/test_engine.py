"""Tests for dresd.decoding.engine on a tiny random Llama: prompts in the engine's (or the
datastore's) prompt format, datastores for another model or format refused, one decoder per
setting, the cost model measured only where the budget needs it."""

from __future__ import annotations

import pytest

import dresd.decoding.engine as engine_mod
from dresd.config import SpeculativeConfig
from dresd.datastore.formatting import format_prompt_ids
from dresd.datastore.store import Datastore, DatastoreError
from dresd.decoding.budget import CostModel
from dresd.decoding.engine import Engine
from tests_support import greedy_reference, one_torch_thread, publish_for_model

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

GREEDY = SpeculativeConfig(method="greedy")


@pytest.fixture
def no_calibration(monkeypatch):
    """Calls to the calibration (which would time the model) are counted, not run."""
    calls = []
    monkeypatch.setattr(engine_mod, "cached_cost_model",
                        lambda model: calls.append(model) or CostModel([1, 64], [0.1, 0.1]))
    return calls


def test_prompts_are_laid_out_in_the_engines_format(tiny_lm):
    tok = tiny_lm.tokenizer
    assert Engine(tiny_lm).prompt_ids("Hi there") == format_prompt_ids(tok, "Hi there", "chat")
    qa = Engine(tiny_lm, prompt_format="qa").prompt_ids("Hi there")
    assert tok.decode(qa) == "Question: Hi there\nAnswer:\n"
    for bad in ("", "  \n", None):
        with pytest.raises(ValueError, match="prompt is empty"):
            Engine(tiny_lm).prompt_ids(bad)


def test_generate_is_greedy_with_the_text_decoded(tiny_lm):
    engine = Engine(tiny_lm)
    gen = engine.generate("Say something.", GREEDY, 12)
    ref = greedy_reference(tiny_lm.model, engine.prompt_ids("Say something."), 12)
    assert gen.token_ids == ref[: len(gen.token_ids)] and gen.token_ids
    assert len(gen.token_ids) == 12 or gen.token_ids[-1] == tiny_lm.eos_token_id
    assert gen.text == tiny_lm.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    # Prompt lookup decodes the same tokens through its own (cached) decoder.
    assert engine.generate("Say something.", SpeculativeConfig(method="pld", budget="off"), 12).token_ids == gen.token_ids


def test_one_decoder_per_setting(tiny_lm, no_calibration):
    engine = Engine(tiny_lm)
    pld = engine.decoder(SpeculativeConfig(method="pld", budget="off"))
    # Equal settings share the decoder (its drafter's state and the planner's calibration).
    assert engine.decoder(SpeculativeConfig(method="pld", budget="off")) is pld
    assert engine.decoder(SpeculativeConfig(method="pld", budget="off", pld_tokens=4)) is not pld
    assert engine.decoder(GREEDY).drafter is None and pld.drafter is not None
    # Neither greedy nor a budget-off method needs the forward cost: nothing was measured.
    assert no_calibration == []


def test_the_cost_model_is_measured_once_and_only_for_the_budget(tiny_lm, no_calibration):
    engine = Engine(tiny_lm)
    auto = engine.decoder(SpeculativeConfig(method="pld"))
    assert len(no_calibration) == 1 and auto.planner.cost is engine.cost_model()
    engine.decoder(SpeculativeConfig(method="pld", pld_tokens=4))
    assert len(no_calibration) == 1  # measured once per engine
    assert engine.decoder(SpeculativeConfig(method="pld", verify="batch")).planner.cost is None
    # A cost model handed in is used as it is.
    given = CostModel([1, 8], [0.2, 0.3])
    assert Engine(tiny_lm, cost=given).decoder(SpeculativeConfig(method="pld")).planner.cost is given
    assert len(no_calibration) == 1


def test_a_datastore_sets_the_prompt_format_and_feeds_the_dense_drafters(tiny_lm, tmp_path):
    publish_for_model(tmp_path / "qa", tiny_lm, prompt_format="qa")
    store = Datastore(tmp_path / "qa")
    engine = Engine(tiny_lm, store, prompt_format="chat")
    assert engine.prompt_format == "qa"
    assert engine.prompt_ids("Hi") == format_prompt_ids(tiny_lm.tokenizer, "Hi", "qa")
    spec = SpeculativeConfig(method="dresd", budget="off", len_drafts=4)
    assert engine.decoder(spec).drafter.drafters[0].store is store
    # Drafting from the store changes no token.
    assert engine.generate("Hi", spec, 16).token_ids == engine.generate("Hi", GREEDY, 16).token_ids


def test_a_datastore_for_another_model_or_format_is_refused(tiny_lm, tmp_path):
    publish_for_model(tmp_path / "other", tiny_lm, fingerprint="another model")
    with pytest.raises(DatastoreError, match="fingerprint"):
        Engine(tiny_lm, Datastore(tmp_path / "other"))
    publish_for_model(tmp_path / "format", tiny_lm, prompt_format="chat")
    store = Datastore(tmp_path / "format")
    store.manifest["prompt_format"]["fingerprint"] = "another layout"
    with pytest.raises(DatastoreError, match="prompt format 'chat'"):
        Engine(tiny_lm, store)
