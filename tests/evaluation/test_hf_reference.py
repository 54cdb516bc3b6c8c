"""Tests for dresd.evaluation.hf_reference: HF generate() as the external reference gives exactly the
tokens of our greedy loop (tiny random Llama), stops at EOS, and times the call."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dresd.config import SpeculativeConfig
from dresd.decoding.loop import SpeculativeDecoder
from dresd.evaluation.hf_reference import PROJECT_THREAD_ENV, PlainHFProcess, hf_generate
from tests_support import TINY_VOCAB, one_torch_thread

VOCAB = TINY_VOCAB
BUDGET = 24


single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def ours(lm, prompt: list[int], eos: int, n: int = BUDGET) -> list[int]:
    dec = SpeculativeDecoder(lm.model, eos, lm.max_context, SpeculativeConfig(method="greedy"))
    return dec.generate_ids(prompt, n).token_ids


@pytest.fixture(scope="module")
def case(tiny_lm):
    """A prompt that repeats itself (prompt lookup finds matches), our greedy continuation
    and an EOS id that greedy never emits."""
    rng = np.random.default_rng(1)
    head = rng.integers(3, 259, 6).tolist()
    prompt = head + rng.integers(3, 259, 3).tolist() + head
    never = next(t for t in range(3, VOCAB) if t not in prompt)
    ref = ours(tiny_lm, prompt, never)
    never = next(t for t in range(3, VOCAB) if t not in prompt + ref)
    assert ours(tiny_lm, prompt, never) == ref
    return {"prompt": prompt, "ref": ref, "no_eos": never}


def test_reference_is_not_trivial(case):
    assert len(case["ref"]) == BUDGET
    assert len(set(case["ref"])) > 3  # not one token repeated


@pytest.mark.parametrize("lookup", [None, 3])
def test_same_tokens_as_our_greedy_loop(tiny_lm, case, lookup):
    gen = hf_generate(tiny_lm.model, case["prompt"], BUDGET, case["no_eos"], prompt_lookup_num_tokens=lookup)
    assert gen.token_ids == case["ref"]
    assert all(type(t) is int for t in gen.token_ids)
    m = gen.metrics
    assert m.new_tokens == BUDGET
    assert m.wall_s > 0
    assert m.target_calls == 0 and m.drafted == 0 and m.verified_positions == 0  # not observable
    assert m.tokens_per_s == pytest.approx(BUDGET / m.wall_s)


def first_new_token(ref: list[int], start: int) -> int:
    """Index of the first token at or after `start` that does not occur earlier in ref."""
    return next(i for i in range(start, len(ref)) if ref[i] not in ref[:i])


@pytest.mark.parametrize("lookup", [None, 3])
def test_stops_at_eos(tiny_lm, case, lookup):
    ref = case["ref"]
    k = first_new_token(ref, 3)
    eos = ref[k]  # the model emits it early, and not before position k
    want = ours(tiny_lm, case["prompt"], eos)
    assert want == ref[: k + 1]  # our loop stops on it, EOS included
    gen = hf_generate(tiny_lm.model, case["prompt"], BUDGET, eos, prompt_lookup_num_tokens=lookup)
    assert gen.token_ids == want
    assert gen.token_ids[-1] == eos and eos not in gen.token_ids[:-1]
    assert gen.metrics.new_tokens == k + 1 < BUDGET
    assert gen.metrics.wall_s > 0 and gen.metrics.target_calls == 0


def test_max_new_tokens_is_respected(tiny_lm, case):
    gen = hf_generate(tiny_lm.model, case["prompt"], 5, case["no_eos"])
    assert gen.token_ids == case["ref"][:5] and gen.metrics.new_tokens == 5


def test_model_generation_config_is_left_greedy(tiny_lm, case):
    """Sampling defaults in the model's generation_config must not turn the reference into sampling."""
    cfg = tiny_lm.model.generation_config
    saved = (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k)
    cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = True, 1.5, 0.9, 20
    try:
        for _ in range(2):
            assert hf_generate(tiny_lm.model, case["prompt"], 10, case["no_eos"]).token_ids == case["ref"][:10]
    finally:
        cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = saved


@pytest.mark.parametrize("lookup", [None, 3])
def test_prompt_lookup_really_verifies_drafts(tiny_lm, case, lookup, monkeypatch):
    """With prompt_lookup_num_tokens some forward after the prefill covers several positions
    (drafted tokens are verified); plain greedy runs one position per forward."""
    widths = []
    inner = tiny_lm.model.forward

    def spy(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        widths.append(int(ids.shape[1]))
        return inner(*args, **kwargs)

    monkeypatch.setattr(tiny_lm.model, "forward", spy)
    gen = hf_generate(tiny_lm.model, case["prompt"], BUDGET, case["no_eos"], prompt_lookup_num_tokens=lookup)
    assert gen.token_ids == case["ref"]
    # Positions each forward adds after the prompt (the first forward may carry drafts already).
    new = [widths[0] - len(case["prompt"]) + 1] + widths[1:]
    if lookup:
        assert max(new) > 1 and len(widths) <= BUDGET
    else:
        assert set(new) == {1} and len(widths) == BUDGET


# ----------------------------------------------------------------------------- a fresh process


@pytest.fixture(scope="module")
def plain(tiny_lm):
    """HF generate() in a fresh plain-transformers process on the tiny model's folder."""
    with PlainHFProcess(tiny_lm.model.name_or_path, timeout_s=300) as proc:
        yield proc


def test_fresh_process_is_plain_transformers_with_user_defaults(plain):
    assert plain.info["dresd_imported"] is False
    assert plain.info["dtype"] == "torch.float32"
    # tests/conftest.py sets the project's thread settings here; they stay out of the child.
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and set(PROJECT_THREAD_ENV) == set(plain.info["env"])
    assert plain.info["env"] == {"OMP_WAIT_POLICY": None, "OPENBLAS_NUM_THREADS": None}


@pytest.mark.parametrize("lookup", [None, 3])
def test_fresh_process_gives_our_greedy_tokens_and_stops_at_eos(tiny_lm, plain, case, lookup):
    eos = plain.info["eos"][0]  # the folder's generation_config: the tokenizer's EOS
    prompt = [t for t in case["prompt"] if t != eos]
    want = ours(tiny_lm, prompt, eos)
    gen = plain.generate(prompt, BUDGET, prompt_lookup_num_tokens=lookup)
    assert gen.token_ids == want and gen.metrics.new_tokens == len(want)
    assert gen.metrics.wall_s > 0 and gen.metrics.target_calls == 0
    assert plain.generate(prompt, 5).token_ids == want[:5]


def test_a_dead_or_silent_child_is_an_error_not_a_hang(tiny_lm, tmp_path):
    with pytest.raises(RuntimeError, match="exited with code"):
        PlainHFProcess(tmp_path / "no-such-model", timeout_s=120)
    proc = PlainHFProcess(tiny_lm.model.name_or_path, timeout_s=120)
    proc.timeout_s = 0.001  # no forward answers that fast
    with pytest.raises(RuntimeError, match="no answer within"):
        proc.generate([5, 6, 7], 64)
    assert proc.proc.poll() is not None  # ended, not left behind
