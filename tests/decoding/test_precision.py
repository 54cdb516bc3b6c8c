"""Decoding with a model in bfloat16 on a tiny random Llama.

Greedy speculative decoding accepts exactly the tokens its verification forward's argmax
gives; in float32 those equal one-token steps' (tests/decoding/test_loop.py). In bfloat16 a
multi-position forward rounds differently from one-token steps, so the two can part where
two tokens are nearly tied. What is checked here: speculative output equals plain bfloat16
greedy through the same loop except after such a near-tie, and every parting is one (the
float32 model scores both tokens within a small share of its logit range). The engine warns
when the store's keys were made in another dtype, and decodes anyway.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dresd.config import ModelConfig, SpeculativeConfig
from dresd.decoding.engine import Engine
from dresd.decoding.loop import SpeculativeDecoder
from dresd.model.loading import load_model
from fake_drafters import FakeDrafter
from tests_support import TINY_VOCAB, one_torch_thread, publish_for_model
from tiny_models import make_tiny_llama

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
PROMPTS, TOKENS, DRAFT = 10, 40, 5
# A parting is a near-tie when the float32 model's logits of the two tokens differ by less
# than this share of its logit range (bfloat16 keeps 8 significant bits).
NEAR_TIE = 0.02


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = make_tiny_llama(tmp_path_factory.mktemp("bf16") / "tiny-bf16", vocab_size=TINY_VOCAB, init_std=0.5)
    load = lambda dtype: load_model(ModelConfig(path=str(folder), device="cpu", dtype=dtype))  # noqa: E731
    return load("bfloat16"), load("float32")


def oracle(seq: list[int]) -> FakeDrafter:
    """Drafts the given greedy text from wherever the request stands, plus a wrong variant."""
    def draft(request):
        t = seq[len(request.context) : len(request.context) + DRAFT]
        return [t, [(x + 1) % TINY_VOCAB for x in t]] if t else []
    return FakeDrafter(draft)


def test_bfloat16_speculative_output_parts_from_greedy_only_at_near_ties(models):
    bf16, f32 = models
    assert bf16.dtype == "bfloat16"
    greedy = SpeculativeDecoder(bf16.model, None, bf16.max_context, SpeculativeConfig(method="greedy"))
    spec = SpeculativeConfig(method="dresd", len_drafts=DRAFT, budget="off")
    same, calls = 0, []
    for seed in range(PROMPTS):
        prompt = np.random.default_rng(seed).integers(3, 259, 8).tolist()
        plain = greedy.generate_ids(prompt, TOKENS).token_ids
        gen = SpeculativeDecoder(bf16.model, None, bf16.max_context, spec, oracle(prompt + plain)).generate_ids(prompt, TOKENS)
        calls.append(gen.metrics.target_calls)
        if gen.token_ids == plain:
            same += 1
            continue
        at = next(i for i, (a, b) in enumerate(zip(gen.token_ids, plain)) if a != b)
        with torch.inference_mode():
            logits = f32.model(torch.tensor([prompt + plain[:at]])).logits[0, -1]
        gap = abs(float(logits[plain[at]] - logits[gen.token_ids[at]]))
        span = float(logits.max() - logits.min())
        assert gap < NEAR_TIE * span, (f"prompt {seed}: speculative and greedy part at token {at} "
                                       f"({gen.token_ids[at]} vs {plain[at]}) with a float32 gap of {gap:.3f} "
                                       f"of a logit range {span:.1f}: not a near-tie")
    assert same >= PROMPTS // 2  # partings are the exception
    assert max(calls) < TOKENS  # the drafts were accepted: the comparison ran through verification


def test_engine_warns_when_keys_were_made_in_another_dtype(models, tmp_path, caplog):
    from dresd.datastore.store import Datastore

    bf16, f32 = models
    publish_for_model(tmp_path / "s", f32)  # a store recorded without a dtype: float32 keys
    with caplog.at_level(logging.WARNING, logger="dresd.datastore.store"):
        Engine(f32, Datastore(tmp_path / "s"))
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="dresd.datastore.store"):
        engine = Engine(bf16, Datastore(tmp_path / "s"))
    assert any("keys made in float32 but the model decodes in bfloat16" in r.getMessage() for r in caplog.records)
    out = engine.generate("hello", SpeculativeConfig(method="dresd", budget="off"), 6)
    assert len(out.token_ids) == 6  # warned, not refused
