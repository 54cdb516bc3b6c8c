"""Tests for dresd.decoding.loop on a tiny random Llama: speculative decoding (tree and batch
verification, with and without the draft budget) is token-identical to plain greedy
decoding, stops exactly at the token limit, the context and EOS, hands the drafter the
right requests, and keeps honest metrics."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dresd.config import SamplingParams, SpeculativeConfig
from dresd.decoding.budget import CostModel
from dresd.decoding.loop import SpeculativeDecoder
from dresd.decoding.tree import build_tree
from dresd.drafters import Candidates
from fake_drafters import FakeDrafter, continuation
from tests_support import CASE_TOKENS, TINY_VOCAB, greedy_reference, identity_compressor, one_torch_thread

BUDGET = CASE_TOKENS  # tokens generated per request unless a test says otherwise
ATOL = 1e-4

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def common_prefix(a: list[int], b: list[int]) -> int:
    m = 0
    while m < min(len(a), len(b)) and a[m] == b[m]:
        m += 1
    return m


def oracle(seq, prompt_len, budget, modes, length=5, hidden=None, ignore_max_len=False) -> FakeDrafter:
    """A drafter that knows the greedy text `seq` and drafts from it in a cycle of `modes`.

    It predicts from its own drafts how many tokens a lossless verifier accepts (m + 1 per
    step) and checks every request against that: the context, the query (the hidden state
    before the token just emitted), the new keys (each position's hidden state, once) and
    max_len (tokens left - 1).
    """
    # Index in seq of the pending token at the first request (a one-token prompt has no
    # query yet, so its first step is plain greedy).
    pos = prompt_len - 1 if prompt_len > 1 else prompt_len
    keys: list[np.ndarray] = []  # every new_keys row handed over, in order
    calls = 0

    def draft(request):
        nonlocal pos, calls
        query, last_token, max_len = request.query, request.context[-1], request.max_len
        if query is None:  # a one-token prompt: no hidden state before the first forward
            assert prompt_len == 1 and request.context == list(seq[:1])
            return []
        assert list(request.context) == list(seq[: pos + 1])
        assert isinstance(query, np.ndarray) and query.dtype == np.float32 and query.ndim == 1
        assert last_token == seq[pos], "decoder diverged from greedy"
        emitted = pos - (prompt_len - 1)
        assert max_len == budget - emitted - 1
        if hidden is not None:
            # The query is the hidden state at the position before last_token: the one
            # whose prediction last_token is (as a datastore key predicts its value[0]).
            np.testing.assert_allclose(query, hidden[pos - 1], atol=ATOL)
            # new_keys: the hidden state of every committed position since the last call,
            # so over the request they cover positions 0 .. pos - 1, each exactly once.
            if request.new_keys is not None:
                keys.extend(request.new_keys)
            assert len(keys) == pos
            np.testing.assert_allclose(np.stack(keys), hidden[:pos], atol=ATOL)
            np.testing.assert_allclose(keys[-1], query, atol=ATOL)
        n = length if ignore_max_len else min(length, max_len)
        t = list(seq[pos + 1 : pos + 1 + n])
        mode = modes[calls % len(modes)]
        calls += 1
        wrong = [(x + 7) % TINY_VOCAB for x in t]
        corrupt = list(t)
        corrupt[min(2, len(t) - 1)] = (corrupt[min(2, len(t) - 1)] + 1) % TINY_VOCAB
        drafts = {
            "full": [wrong, corrupt, t, t[:1]],
            "partial": [corrupt, t[:1], wrong],
            "almost": [t[:-1] + [(t[-1] + 1) % TINY_VOCAB], t[:1]],  # all but the last token
            "reject": [wrong],
            "none": [],
            "prefix": [t[:2]],
        }[mode]
        pos += max((common_prefix(d, t) for d in drafts), default=0) + 1
        return drafts

    return FakeDrafter(draft, "oracle")


def expected_metrics(drafter: FakeDrafter, seq: list[int]) -> dict:
    """What the metrics must count, from the drafts the oracle made and the greedy text."""
    steps = [(len(ctx), c.paths) for ctx, c in zip(drafter.contexts, drafter.proposed) if c.paths]
    accepted = [max(common_prefix(p, seq[n:]) for p in paths) for n, paths in steps]
    depths = [max(len(p) for p in paths) for _, paths in steps]
    deepest = max(depths, default=0)
    return {
        "full": sum(m > 0 and m >= d for m, d in zip(accepted, depths)),
        "partial": sum(0 < m < d for m, d in zip(accepted, depths)),
        "rejects": sum(m == 0 for m in accepted),
        "accepted": sum(accepted),
        "offered_at": [sum(d > k for d in depths) for k in range(deepest)],
        "accepted_at": [sum(m > k for m in accepted) for k in range(deepest)],
        "batch_drafted": sum(sum(len(p) for p in paths) for _, paths in steps),
    }


def decoder(tiny_lm, method, verify="tree", drafter=None, eos=None, max_context=None):
    spec = SpeculativeConfig(method=method, verify=verify, len_drafts=5, budget="off")
    return SpeculativeDecoder(tiny_lm.model, eos, max_context or tiny_lm.max_context, spec, drafter)


MODES = ["full", "partial", "reject", "none", "prefix", "almost"]


@pytest.fixture(scope="module")
def greedy_run(tiny_lm, tiny_case):
    return decoder(tiny_lm, "greedy", eos=tiny_case["no_eos"]).generate_ids(tiny_case["prompt"], BUDGET)


def test_greedy_decoder_matches_reference(greedy_run, tiny_case):
    assert greedy_run.token_ids == tiny_case["ref"]
    m = greedy_run.metrics
    assert m.new_tokens == BUDGET and m.target_calls == BUDGET
    assert m.drafted_steps == m.drafted == m.accepted == 0
    assert m.verified_positions == BUDGET
    assert m.mean_accepted_tokens == 1.0


@pytest.mark.parametrize("verify", ["tree", "batch"])
def test_dresd_oracle_is_lossless_with_honest_metrics(tiny_lm, tiny_case, greedy_run, verify):
    drafter = oracle(tiny_case["seq"], len(tiny_case["prompt"]), BUDGET, MODES, hidden=tiny_case["hidden"])
    gen = decoder(tiny_lm, "dresd", verify, drafter, eos=tiny_case["no_eos"]).generate_ids(tiny_case["prompt"], BUDGET)
    assert gen.token_ids == greedy_run.token_ids == tiny_case["ref"]
    # The drafter is told where each request starts and what it generated.
    assert drafter.begun == [tiny_case["prompt"]] and drafter.ended == [tiny_case["ref"]]
    m, exp = gen.metrics, expected_metrics(drafter, tiny_case["seq"])
    assert m.new_tokens == len(gen.token_ids) == BUDGET
    assert m.target_calls < greedy_run.metrics.target_calls
    # Every step but possibly the last (1 token left: no drafting) consulted the drafter.
    assert len(drafter.requests) in (m.target_calls, m.target_calls - 1)
    assert m.full_accepts == exp["full"] > 0
    assert m.partial_accepts == exp["partial"] > 0
    assert m.rejects == exp["rejects"] > 0
    assert m.drafted_steps == m.full_accepts + m.partial_accepts + m.rejects
    assert m.drafted_steps == sum(bool(c.paths) for c in drafter.proposed)
    assert m.accepted == exp["accepted"]
    assert m.offered_at == exp["offered_at"]
    assert m.accepted_at == exp["accepted_at"]
    assert sum(m.accepted_at) == m.accepted
    assert m.accepted_at[0] == m.full_accepts + m.partial_accepts
    ppa = m.per_position_acceptance
    assert len(ppa) == 5 and all(0.0 <= p <= 1.0 for p in ppa)
    assert all(a <= o for a, o in zip(m.accepted_at, m.offered_at))
    assert m.offered_at == sorted(m.offered_at, reverse=True)
    assert m.accepted_at == sorted(m.accepted_at, reverse=True)
    # One target call per step: tokens = accepted drafts + one bonus per call.
    assert m.new_tokens == m.accepted + m.target_calls
    assert m.mean_accepted_tokens == pytest.approx(BUDGET / m.target_calls)
    assert 0 < m.acceptance_rate < 1
    # The wall time holds the parts the loop times.
    assert m.wall_s >= m.prefill_s + m.model_s + m.retrieval_s > 0
    if verify == "batch":
        assert m.drafted == exp["batch_drafted"]
    else:
        # The tree shares prefixes: fewer positions than the rows, one root per call.
        assert m.drafted < exp["batch_drafted"]
        assert m.verified_positions == m.drafted + m.target_calls


@pytest.mark.parametrize("verify", ["tree", "batch"])
def test_context_keys_drafter_is_lossless(tiny_lm, verify):
    """Dense retrieval over the request's own keys, fed by the real loop's verification
    (that its drafts get accepted is tested on the real model: tests/test_e2e_real.py)."""
    from dresd.drafters.dense import ContextDenseDrafter

    model = tiny_lm.model
    identity = identity_compressor(model.config.hidden_size)
    # A prompt that repeats a phrase, so the filter token matches and drafts get verified.
    phrase = np.random.default_rng(3).integers(3, 259, 12).tolist()
    prompt = phrase * 3 + phrase[:4]
    n = 30
    ref = greedy_reference(model, prompt, n)
    never = next(t for t in range(3, TINY_VOCAB) if t not in prompt + ref)
    drafter = ContextDenseDrafter(identity, SpeculativeConfig(len_drafts=5), never)
    gen = decoder(tiny_lm, "dresd", verify, drafter, eos=never).generate_ids(prompt, n)
    assert gen.token_ids == ref
    assert gen.metrics.drafted > 0


@pytest.mark.parametrize("verify", ["tree", "batch"])
@pytest.mark.parametrize("n", [1, 2, 7, 13, 25])
def test_max_new_tokens_respected_exactly(tiny_lm, tiny_case, verify, n):
    drafter = oracle(tiny_case["seq"], len(tiny_case["prompt"]), n, ["full", "prefix", "partial"])
    gen = decoder(tiny_lm, "dresd", verify, drafter, eos=tiny_case["no_eos"]).generate_ids(tiny_case["prompt"], n)
    assert gen.token_ids == tiny_case["ref"][:n]
    assert gen.metrics.new_tokens == n


@pytest.mark.parametrize("verify", ["tree", "batch"])
def test_drafter_ignoring_max_len_still_stops_exactly(tiny_lm, tiny_case, verify):
    for n in (3, 8):
        drafter = oracle(tiny_case["seq"], len(tiny_case["prompt"]), n, ["full"], ignore_max_len=True)
        gen = decoder(tiny_lm, "dresd", verify, drafter, eos=tiny_case["no_eos"]).generate_ids(tiny_case["prompt"], n)
        assert gen.token_ids == tiny_case["ref"][:n]
        assert gen.metrics.new_tokens == n


def test_greedy_max_new_tokens_and_context_cap(tiny_lm, tiny_case):
    prompt, ref = tiny_case["prompt"], tiny_case["ref"]
    for n in (1, 5):
        gen = decoder(tiny_lm, "greedy", eos=tiny_case["no_eos"]).generate_ids(prompt, n)
        assert gen.token_ids == ref[:n] and gen.metrics.target_calls == n
    # The context caps the budget: room for 3 more tokens only.
    for method in ("greedy", "dresd"):
        drafter = oracle(tiny_case["seq"], len(prompt), 3, ["full"])
        dec = decoder(tiny_lm, method, drafter=drafter, eos=tiny_case["no_eos"], max_context=len(prompt) + 3)
        assert dec.generate_ids(prompt, 50).token_ids == ref[:3]


def eos_position(ref: list[int], stride: int) -> int:
    """An index k >= 8 where ref[k] occurs first and that falls inside a full draft."""
    return next(k for k in range(8, len(ref)) if ref[k] not in ref[:k] and k % stride in (1, 2, 3))


@pytest.mark.parametrize("verify", ["tree", "batch"])
def test_eos_stops_generation(tiny_lm, tiny_case, verify):
    ref = tiny_case["ref"]
    k = eos_position(ref, stride=6)  # "full" steps emit 6 tokens: EOS lands mid-draft
    eos = ref[k]
    greedy = decoder(tiny_lm, "greedy", eos=eos).generate_ids(tiny_case["prompt"], BUDGET)
    assert greedy.token_ids == ref[: k + 1]
    drafter = oracle(tiny_case["seq"], len(tiny_case["prompt"]), BUDGET, ["full"])
    gen = decoder(tiny_lm, "dresd", verify, drafter, eos=eos).generate_ids(tiny_case["prompt"], BUDGET)
    assert gen.token_ids == ref[: k + 1]
    assert gen.token_ids[-1] == eos
    assert gen.metrics.new_tokens == k + 1
    assert gen.metrics.target_calls == k // 6 + 1


def test_one_token_prompt(tiny_lm):
    prompt = [65]
    ref = greedy_reference(tiny_lm.model, prompt, 20)
    eos = next(t for t in range(3, TINY_VOCAB) if t not in ref and t != 65)
    assert decoder(tiny_lm, "greedy", eos=eos).generate_ids(prompt, 20).token_ids == ref
    for verify in ("tree", "batch"):
        drafter = oracle(prompt + ref, 1, 20, MODES)
        gen = decoder(tiny_lm, "dresd", verify, drafter, eos=eos).generate_ids(prompt, 20)
        assert gen.token_ids == ref
        assert gen.metrics.target_calls < 20


def test_bad_prompts_and_config_raise(tiny_lm, tiny_case):
    dec = decoder(tiny_lm, "greedy", eos=tiny_case["no_eos"])
    with pytest.raises(ValueError, match="empty"):
        dec.generate_ids([], 5)
    small = decoder(tiny_lm, "greedy", eos=tiny_case["no_eos"], max_context=8)
    with pytest.raises(ValueError, match="context"):
        small.generate_ids(list(range(3, 11)), 5)  # 8 tokens = the whole context
    with pytest.raises(ValueError, match="context"):
        small.generate_ids(list(range(3, 20)), 5)
    assert len(small.generate_ids(list(range(3, 10)), 5).token_ids) == 1
    with pytest.raises(ValueError, match="needs a drafter"):
        decoder(tiny_lm, "dresd", drafter=None, eos=0)
    with pytest.raises(ValueError, match="speculative sampling needs verify='tree'"):
        decoder(tiny_lm, "dresd", "batch", FakeDrafter(), eos=0).generate_ids([5, 6], 3, SamplingParams(0.5))


# ------------------------------------------------------------ with the draft budget


def random_drafts(seed: int, seq: list[int]):
    """A draft function: three branches of random tokens (rarely right, sometimes sharing
    prefixes); the first is, half the time, the true next two tokens followed by noise."""
    rng = np.random.default_rng(seed)

    def draft(request):
        out = Candidates()
        n = len(request.context)
        for b in range(3):
            length = min(int(rng.integers(1, 6)), request.max_len)
            path = rng.integers(3, 20, length).tolist()
            if b == 0 and rng.random() < 0.5:
                path = (seq[n : n + 2] + path)[: request.max_len]
            out.add(path, float(rng.integers(1, 5)), f"random:{b}")
        return out

    return draft


def slow(draft, seconds: float):
    """`draft` taking `seconds` per consult (a costly drafter)."""
    return lambda request: time.sleep(seconds) or draft(request)


def auto_decoder(tiny_lm, drafter, cost, eos, max_verify=64):
    spec = SpeculativeConfig(method="dresd", verify="tree", budget="auto", max_verify=max_verify)
    return SpeculativeDecoder(tiny_lm.model, eos, tiny_lm.max_context, spec, drafter, cost=cost)


def test_auto_budget_needs_cost_model(tiny_lm, tiny_case):
    with pytest.raises(ValueError, match="cost model"):
        auto_decoder(tiny_lm, FakeDrafter(continuation(tiny_case["seq"], 6)), None, tiny_case["no_eos"])


def test_auto_budget_when_drafting_pays(tiny_lm, tiny_case):
    drafter = FakeDrafter(continuation(tiny_case["seq"], 6), "oracle")
    dec = auto_decoder(tiny_lm, drafter, CostModel([1, 64], [0.1, 0.1]), tiny_case["no_eos"])
    gen = dec.generate_ids(tiny_case["prompt"], BUDGET)
    assert gen.token_ids == tiny_case["ref"]
    m = gen.metrics
    assert m.new_tokens == BUDGET
    # Every proposed token is right: 7 tokens per call (6 drafted + bonus).
    assert m.target_calls == -(-BUDGET // 7)
    assert m.drafted > 0 and m.accepted == m.drafted
    assert m.verified_positions == m.drafted + m.target_calls
    # The calibration learnt that the oracle is always right.
    assert dec.planner.acceptance.node_probs(build_tree(0, [[1]], sources=["oracle"]))[1] > 0.7
    # The loop reports each verification's time: the tiny model's trees take far less
    # than the 0.1 s this cost model claims.
    assert dec.planner.step_scale[1] < 0.9


def test_auto_budget_when_drafting_never_pays(tiny_lm, tiny_case):
    # Consults costing 20 ms of a 100 ms step: worth backing off from.
    drafter = FakeDrafter(slow(continuation(tiny_case["seq"], 6), 0.02), "oracle")
    dec = auto_decoder(tiny_lm, drafter, CostModel([1, 2, 64], [0.1, 1.0, 30.0]), tiny_case["no_eos"])
    gen = dec.generate_ids(tiny_case["prompt"], BUDGET)
    assert gen.token_ids == tiny_case["ref"]
    m = gen.metrics
    # Only the probes after each back-off verify drafts (at most probe_nodes positions each).
    assert 0 < m.drafted_steps < len(drafter.requests) < m.target_calls
    assert m.drafted <= dec.planner.probe_nodes * m.drafted_steps
    assert m.verified_positions == m.drafted + m.target_calls
    # Drafting time is counted as retrieval: every consult slept 20 ms.
    assert m.retrieval_s >= 0.02 * len(drafter.requests)
    # A consult that costs next to nothing is asked at every step, and never verified.
    cheap = FakeDrafter(continuation(tiny_case["seq"], 6), "oracle")
    dec = auto_decoder(tiny_lm, cheap, CostModel([1, 2, 64], [0.1, 1.0, 30.0]), tiny_case["no_eos"])
    gen = dec.generate_ids(tiny_case["prompt"], BUDGET)
    assert gen.token_ids == tiny_case["ref"]
    assert len(cheap.requests) == gen.metrics.target_calls - 1 and gen.metrics.drafted_steps == 0


@pytest.mark.parametrize("cost", [CostModel([1, 64], [0.1, 0.1]), CostModel([1, 8, 16, 32, 64],
                                                                           [0.11, 0.23, 0.29, 0.40, 0.55])],
                         ids=["flat", "steep"])
@pytest.mark.parametrize("seed", [0, 1])
def test_auto_budget_random_drafts_stay_greedy(tiny_lm, tiny_case, cost, seed):
    drafter = FakeDrafter(random_drafts(seed, tiny_case["seq"]), "random")
    dec = auto_decoder(tiny_lm, drafter, cost, tiny_case["no_eos"], max_verify=8)
    gen = dec.generate_ids(tiny_case["prompt"], BUDGET)
    assert gen.token_ids == tiny_case["ref"]
    m = gen.metrics
    assert m.new_tokens == BUDGET == m.accepted + m.target_calls
    assert m.verified_positions == m.drafted + m.target_calls
    assert m.verified_positions <= 8 * m.target_calls  # max_verify caps every forward
    if cost.cost(64) == cost.cost(1):
        assert m.drafted > 0 and m.accepted > 0  # on a flat cost every draft is worth verifying
    # The decoder keeps its calibration across requests: a second request is still greedy.
    again = dec.generate_ids(tiny_case["prompt"], 12)
    assert again.token_ids == tiny_case["ref"][:12]


def test_sampled_and_greedy_requests_calibrate_apart(tiny_lm, tiny_case):
    """One decoder serves both: a sampled request's outcomes land in the sampled cells."""
    drafter = FakeDrafter(continuation(tiny_case["seq"], 6, strict=False), "oracle")
    dec = auto_decoder(tiny_lm, drafter, CostModel([1, 64], [0.1, 0.1]), tiny_case["no_eos"])
    dec.generate_ids(tiny_case["prompt"], BUDGET)
    assert dec.planner.sampled is False
    assert not any(k[0] == "sampled" for k in dec.planner.acceptance.offered)
    dec.generate_ids(tiny_case["prompt"], BUDGET, SamplingParams(temperature=1.0, seed=0))
    assert dec.planner.sampled is True
    assert any(k[0] == "sampled" and v > 0 for k, v in dec.planner.acceptance.offered.items())
