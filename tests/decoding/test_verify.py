"""Tests for dresd.decoding.verify and dresd.decoding.loop on a tiny random Llama: tree attention equals
per-path decoding, the KV cache is compacted correctly, and speculative decoding (tree and
batch verification) is token-identical to plain greedy decoding, with honest metrics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from dresd.config import SpeculativeConfig
from dresd.decoding.loop import SpeculativeDecoder
from dresd.drafters import Candidates
from dresd.decoding.kv_cache import GrowingCache
from dresd.decoding.tree import build_tree, tree_attention_mask, tree_position_ids
from dresd.decoding.verify import forward, keep_cache_positions, verify_batch, verify_tree
from tests_support import greedy_reference, identity_compressor, one_torch_thread, tiny_llama_lm

VOCAB = 272
BUDGET = 40  # reference greedy length per prompt
ATOL = 1e-4


single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_llama_lm(tmp_path_factory, VOCAB)


@pytest.fixture(scope="module")
def model(lm):
    return lm.model


@pytest.fixture(scope="module")
def case(model):
    """A prompt, its greedy continuation, hidden states and an EOS id greedy never emits."""
    prompt = np.random.default_rng(0).integers(3, 259, 8).tolist()
    ref = greedy_reference(model, prompt, BUDGET)
    seq = prompt + ref
    with torch.inference_mode():
        out = model.model(input_ids=torch.tensor([seq]))
        hidden = out.last_hidden_state[0].float().numpy()
        logits = model.lm_head(out.last_hidden_state)[0]
    never = next(t for t in range(3, VOCAB) if t not in seq)
    return {"prompt": prompt, "ref": ref, "seq": seq, "hidden": hidden, "logits": logits, "no_eos": never}


def test_greedy_steps_have_clear_margins(case):
    """Exact token equality below is only meaningful when argmaxes are not near-ties."""
    n = len(case["prompt"])
    logits = case["logits"][n - 1 : -1]  # the logits that chose each reference token
    assert logits.argmax(-1).tolist() == case["ref"]
    top2 = logits.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    assert gap > 1e-2, f"top-2 logit gap {gap} too small for exact comparisons"
    # The continuation is not a trivial repetition (drafts must discriminate).
    assert len(set(case["ref"])) > BUDGET // 2


def prefill(model, prompt: list[int]) -> DynamicCache:
    cache = GrowingCache()  # the decode loop's cache; check_cache_matches compares with a DynamicCache
    forward(model, torch.tensor([prompt[:-1]]), cache)
    return cache


# ------------------------------------------------------------------- tree attention


def test_tree_logits_equal_per_path_runs(model, case):
    prompt, ref = case["prompt"], case["ref"]
    drafts = [
        [ref[0], ref[1], ref[2], 5],
        [ref[0], 7, 8],
        [ref[0], ref[1], 9],
        [11, 12, 13, 14, 15],
        [ref[0], 7, 16],
    ]
    base = prefill(model, prompt)
    prefix = base.get_seq_length()
    tree = build_tree(prompt[-1], drafts)
    assert len(tree) == 1 + 4 + 2 + 1 + 5 + 1
    cache = copy.deepcopy(base)
    hidden, logits = forward(
        model,
        torch.tensor([tree.tokens]),
        cache,
        tree_position_ids(tree, prefix),
        tree_attention_mask(tree, prefix, model.dtype),
    )
    leaves = [i for i in range(len(tree)) if not tree.children[i]]
    assert len(leaves) == len(drafts)
    for leaf in leaves:
        path = tree.path_to(leaf)
        c = copy.deepcopy(base)
        h_ref, l_ref = forward(model, torch.tensor([[tree.tokens[n] for n in path]]), c)
        torch.testing.assert_close(logits[0, path], l_ref[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(hidden[0, path], h_ref[0], atol=ATOL, rtol=0)
    # The root's logits are the reference greedy's first step.
    assert int(logits[0, 0].argmax()) == ref[0]


def check_cache_matches(cache: DynamicCache, model, tokens: list[int]) -> None:
    """`cache` holds exactly the K/V of a plain causal forward over `tokens`."""
    ref_cache = DynamicCache()
    forward(model, torch.tensor([tokens]), ref_cache)
    assert cache.get_seq_length() == len(tokens)
    for got, want in zip(cache.layers, ref_cache.layers):
        assert got.keys.shape == want.keys.shape
        torch.testing.assert_close(got.keys, want.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)


def continue_greedy(model, cache, pending: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        step = verify_tree(model, cache, pending, [])
        assert step.accepted == 0 and step.verified == 1 and step.drafted == 0
        pending = step.new_tokens[0]
        out.append(pending)
    return out


@pytest.mark.parametrize("layout", ["second_branch_of_child", "second_root_child"])
def test_verify_tree_non_first_branch_compacts_cache(model, case, layout):
    prompt, ref, hidden = case["prompt"], case["ref"], case["hidden"]
    wrong = (ref[1] + 1) % VOCAB
    if layout == "second_branch_of_child":
        drafts = [[ref[0], wrong, 3], [ref[0], ref[1], ref[2], ref[3]]]
        expected_path_len = 5
    else:
        drafts = [[(ref[0] + 1) % VOCAB, 4, 5], [ref[0], ref[1], wrong], [ref[0], ref[1], ref[2]]]
        expected_path_len = 4
    cache = prefill(model, prompt)
    step = verify_tree(model, cache, prompt[-1], drafts)
    accepted = expected_path_len - 1
    assert step.accepted == accepted
    assert step.new_tokens == ref[: accepted + 1]
    assert step.offered_depth == 4 if layout == "second_branch_of_child" else 3
    assert step.drafted == step.verified - 1
    # The query is the hidden state that produced the bonus token.
    np.testing.assert_allclose(step.query.numpy(), hidden[len(prompt) - 1 + accepted], atol=ATOL)
    # Cache: prompt + accepted tokens (the bonus token is pending, not cached).
    check_cache_matches(cache, model, prompt + ref[:accepted])
    # Decoding on from the compacted cache reproduces greedy.
    more = continue_greedy(model, cache, step.new_tokens[-1], 12)
    assert more == ref[accepted + 1 : accepted + 13]


def test_verify_tree_contiguous_and_rejected(model, case):
    prompt, ref = case["prompt"], case["ref"]
    cache = prefill(model, prompt)
    step = verify_tree(model, cache, prompt[-1], [[ref[0], ref[1], (ref[2] + 1) % VOCAB, 6]])
    assert step.accepted == 2 and step.new_tokens == ref[:3] and step.offered_depth == 4
    check_cache_matches(cache, model, prompt + ref[:2])
    # Nothing accepted: only the root stays in the cache.
    step = verify_tree(model, cache, ref[2], [[(ref[3] + 1) % VOCAB, 1], [(ref[3] + 2) % VOCAB]])
    assert step.accepted == 0 and step.new_tokens == [ref[3]]
    check_cache_matches(cache, model, prompt + ref[:3])


@pytest.mark.parametrize("packed", [True, False])
def test_cpu_greedy_verify_runs_the_head_only_where_acceptance_reads(model, case, monkeypatch, packed):
    """LazyGreedyTokens: a packed head computes the asked node with the nodes below it
    (breadth-first, ROWS_PER_PASS per product); a stock head only the accepted path + bonus."""
    from dresd.model.fastpath.cpu_linear import ROWS_PER_PASS, DualLayoutLinear

    prompt, ref = case["prompt"], case["ref"]
    head = model.get_output_embeddings()
    assert isinstance(head, DualLayoutLinear)
    if not packed:
        stock = torch.nn.Linear(head.in_features, head.out_features, bias=False)
        stock.weight = head.weight
        monkeypatch.setitem(model._modules, "lm_head", stock)  # setattr would delete it on undo
        head = stock
    rows = []
    original = head.forward
    monkeypatch.setattr(head, "forward", lambda x: rows.append(x.shape[-2]) or original(x))
    cache = prefill(model, prompt)
    rows.clear()
    wrong = (ref[1] + 1) % VOCAB
    drafts = [[ref[0], wrong, 3, 4], [ref[0], ref[1], 7], [(ref[0] + 1) % VOCAB, 5, 6]]
    step = verify_tree(model, cache, prompt[-1], drafts)
    assert step.accepted == 2 and step.new_tokens == ref[:3]
    # Packed: root, its 2 children, their 3 children in one product (the path root ->
    # ref[0] -> ref[1] is among them). Stock: root, ref[0], ref[1]: 3 of the 10 positions.
    assert rows == ([ROWS_PER_PASS] if packed else [1, 1, 1])
    # A chain longer than one product: the next product starts where acceptance went on.
    cache = prefill(model, prompt)
    rows.clear()
    step = verify_tree(model, cache, prompt[-1], [ref[:9]])
    assert step.accepted == 9 and step.new_tokens == ref[:10]
    assert rows == ([ROWS_PER_PASS, 10 - ROWS_PER_PASS] if packed else [1] * 10)


@pytest.mark.parametrize("cache_class", [DynamicCache, GrowingCache])
def test_keep_cache_positions_direct(cache_class):
    """Unit check of the cut: prefix kept, then the chosen tree entries in order."""
    cache = cache_class()
    k = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1).expand(1, 2, 10, 3).contiguous()
    cache.update(k.clone(), k.clone() + 100, 0)
    keep_cache_positions(cache, 4, [0, 2, 5])
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert cache.layers[0].values[0, 1, :, 0].tolist() == [100, 101, 102, 103, 104, 106, 109]
    cache = cache_class()
    cache.update(k.clone(), k.clone(), 0)
    keep_cache_positions(cache, 4, [0, 1, 2])  # contiguous: a crop
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_verify_batch_picks_longest_row_and_keeps_its_cache(model, case):
    prompt, ref, hidden = case["prompt"], case["ref"], case["hidden"]
    drafts = [
        [ref[0], (ref[1] + 1) % VOCAB, 3, 4, 5, 6],  # longest row, 1 match
        [ref[0], ref[1], ref[2]],  # 3 matches: the winner (fully accepted)
        [(ref[0] + 1) % VOCAB],
        [ref[0], ref[1], ref[2]],  # tie with row 1: first row wins
    ]
    cache = prefill(model, prompt)
    step = verify_batch(model, cache, prompt[-1], drafts)
    assert step.accepted == 3 and step.new_tokens == ref[:4]
    assert step.offered_depth == 6
    assert step.drafted == 6 + 3 + 1 + 3
    assert step.verified == 4 * 7
    np.testing.assert_allclose(step.query.numpy(), hidden[len(prompt) - 1 + 3], atol=ATOL)
    assert cache.layers[0].keys.shape[0] == 1
    check_cache_matches(cache, model, prompt + ref[:3])
    assert continue_greedy(model, cache, ref[3], 8) == ref[4:12]
    # No drafts: a plain greedy step.
    step = verify_batch(model, cache, ref[11], [])
    assert step.new_tokens == [ref[12]] and step.drafted == 0 and step.verified == 1


def test_verify_batch_logits_equal_per_row(model, case):
    """Rows padded to the widest draft give the same accepted tokens as separate runs."""
    prompt, ref = case["prompt"], case["ref"]
    for drafts in ([[ref[0]], [ref[0], ref[1], ref[2], ref[3], ref[4]]], [[ref[0], ref[1]], [9, 9, 9, 9]]):
        cache = prefill(model, prompt)
        step = verify_batch(model, cache, prompt[-1], drafts)
        best = max(len(d) if d == ref[: len(d)] else 0 for d in drafts)
        assert step.accepted == best
        assert step.new_tokens == ref[: best + 1]
        check_cache_matches(cache, model, prompt + ref[:best])


# ------------------------------------------------------------------- decoding loop


def common_prefix(a: list[int], b: list[int]) -> int:
    m = 0
    while m < min(len(a), len(b)) and a[m] == b[m]:
        m += 1
    return m


class OracleDrafter:
    """Drafts built from the known greedy continuation, in a cycle of behaviours.

    It tracks how far decoding has got by predicting, from its own drafts, how many tokens
    a lossless verifier accepts (m + 1 per step); it checks every call's inputs against
    the reference (last token, query hidden state, max_len = tokens left - 1).
    """

    def __init__(self, seq, prompt_len, budget, modes, length=5, hidden=None, ignore_max_len=False):
        self.seq, self.budget, self.modes, self.length = seq, budget, modes, length
        self.prompt_len = prompt_len
        # Index in seq of the pending token at the first call (a one-token prompt has no
        # query yet, so its first step is plain greedy).
        self.pos = prompt_len - 1 if prompt_len > 1 else prompt_len
        self.hidden = hidden
        self.ignore_max_len = ignore_max_len
        self.calls: list[dict] = []
        self.keys: list[np.ndarray] = []  # every new_keys row handed over, in order

    name = "oracle"

    def begin(self, prompt_ids):
        assert list(prompt_ids) == list(self.seq[: self.prompt_len])

    def end(self, generated):
        self.ended = list(generated)

    def propose(self, request):
        query, last_token, max_len = request.query, request.context[-1], request.max_len
        if query is None:  # a one-token prompt: no hidden state before the first forward
            assert self.prompt_len == 1 and request.context == list(self.seq[:1])
            return Candidates()
        assert list(request.context) == list(self.seq[: self.pos + 1])
        assert isinstance(query, np.ndarray) and query.dtype == np.float32 and query.ndim == 1
        assert last_token == self.seq[self.pos], "decoder diverged from greedy"
        emitted = self.pos - (self.prompt_len - 1)
        assert max_len == self.budget - emitted - 1
        if self.hidden is not None:
            # The query is the hidden state at the position before last_token: the one
            # whose prediction last_token is (as a datastore key predicts its value[0]).
            np.testing.assert_allclose(query, self.hidden[self.pos - 1], atol=ATOL)
            # new_keys: the hidden state of every committed position since the last call,
            # so over the request they cover positions 0 .. pos - 1, each exactly once.
            if request.new_keys is not None:
                self.keys.extend(request.new_keys)
            assert len(self.keys) == self.pos
            np.testing.assert_allclose(np.stack(self.keys), self.hidden[: self.pos], atol=ATOL)
            np.testing.assert_allclose(self.keys[-1], query, atol=ATOL)
        n = self.length if self.ignore_max_len else min(self.length, max_len)
        t = list(self.seq[self.pos + 1 : self.pos + 1 + n])
        mode = self.modes[len(self.calls) % len(self.modes)]
        wrong = [(x + 7) % VOCAB for x in t]
        corrupt = list(t)
        corrupt[min(2, len(t) - 1)] = (corrupt[min(2, len(t) - 1)] + 1) % VOCAB
        drafts = {
            "full": [wrong, corrupt, t, t[:1]],
            "partial": [corrupt, t[:1], wrong],
            "almost": [t[:-1] + [(t[-1] + 1) % VOCAB], t[:1]],  # all but the last token
            "reject": [wrong],
            "none": [],
            "prefix": [t[:2]],
        }[mode]
        m = max((common_prefix(d, t) for d in drafts), default=0)
        self.calls.append({"mode": mode, "m": m, "depth": max((len(d) for d in drafts), default=0), "drafts": drafts})
        self.pos += m + 1
        out = Candidates()
        for d in drafts:
            out.add(list(d), 1.0, self.name)
        return out

    def expected(self) -> dict:
        drafted = [c for c in self.calls if c["drafts"]]
        depth = max((c["depth"] for c in drafted), default=0)
        return {
            "full": sum(c["m"] > 0 and c["m"] >= c["depth"] for c in drafted),
            "partial": sum(0 < c["m"] < c["depth"] for c in drafted),
            "rejects": sum(c["m"] == 0 for c in drafted),
            "accepted": sum(c["m"] for c in drafted),
            "offered_at": [sum(c["depth"] > d for c in drafted) for d in range(depth)],
            "accepted_at": [sum(c["m"] > d for c in drafted) for d in range(depth)],
            "batch_drafted": sum(sum(len(d) for d in c["drafts"]) for c in drafted),
        }


def decoder(lm, method, verify="tree", drafter=None, eos=None, max_context=None):
    spec = SpeculativeConfig(method=method, verify=verify, len_drafts=5, budget="off")
    return SpeculativeDecoder(lm.model, eos, max_context or lm.max_context, spec, drafter)


MODES = ["full", "partial", "reject", "none", "prefix", "almost"]


@pytest.fixture(scope="module")
def greedy_run(lm, case):
    gen = decoder(lm, "greedy", eos=case["no_eos"]).generate_ids(case["prompt"], BUDGET)
    return gen


def test_greedy_decoder_matches_reference(greedy_run, case):
    assert greedy_run.token_ids == case["ref"]
    m = greedy_run.metrics
    assert m.new_tokens == BUDGET and m.target_calls == BUDGET
    assert m.drafted_steps == m.drafted == m.accepted == 0
    assert m.verified_positions == BUDGET
    assert m.mean_accepted_tokens == 1.0


@pytest.mark.parametrize("verify", ["tree", "batch"])
def test_dresd_oracle_is_lossless_with_honest_metrics(lm, case, greedy_run, verify):
    oracle = OracleDrafter(case["seq"], len(case["prompt"]), BUDGET, MODES, hidden=case["hidden"])
    gen = decoder(lm, "dresd", verify, oracle, eos=case["no_eos"]).generate_ids(case["prompt"], BUDGET)
    assert gen.token_ids == greedy_run.token_ids == case["ref"]
    m, exp = gen.metrics, oracle.expected()
    assert m.new_tokens == len(gen.token_ids) == BUDGET
    assert m.target_calls < greedy_run.metrics.target_calls
    # Every step but possibly the last (1 token left: no drafting) consulted the oracle.
    assert len(oracle.calls) in (m.target_calls, m.target_calls - 1)
    assert m.full_accepts == exp["full"] > 0
    assert m.partial_accepts == exp["partial"] > 0
    assert m.rejects == exp["rejects"] > 0
    assert m.drafted_steps == m.full_accepts + m.partial_accepts + m.rejects
    assert m.drafted_steps == sum(bool(c["drafts"]) for c in oracle.calls)
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
    if verify == "batch":
        assert m.drafted == exp["batch_drafted"]
    else:
        # The tree shares prefixes: fewer positions than the rows, one root per call.
        assert m.drafted < exp["batch_drafted"]
        assert m.verified_positions == m.drafted + m.target_calls


@pytest.mark.parametrize("verify", ["tree", "batch"])
def test_context_keys_drafter_is_lossless(lm, model, verify):
    """Dense retrieval over the request's own keys, fed by the real loop's verification
    (that its drafts get accepted is tested on the real model: tests/test_e2e_real.py)."""
    from dresd.drafters.dense import ContextDenseDrafter

    identity = identity_compressor(model.config.hidden_size)
    # A prompt that repeats a phrase, so the filter token matches and drafts get verified.
    phrase = np.random.default_rng(3).integers(3, 259, 12).tolist()
    prompt = phrase * 3 + phrase[:4]
    n = 30
    ref = greedy_reference(model, prompt, n)
    never = next(t for t in range(3, VOCAB) if t not in prompt + ref)
    drafter = ContextDenseDrafter(identity, SpeculativeConfig(len_drafts=5), never)
    gen = decoder(lm, "dresd", verify, drafter, eos=never).generate_ids(prompt, n)
    assert gen.token_ids == ref
    assert gen.metrics.drafted > 0


@pytest.mark.parametrize("verify", ["tree", "batch"])
@pytest.mark.parametrize("n", [1, 2, 7, 13, 25])
def test_max_new_tokens_respected_exactly(lm, case, verify, n):
    oracle = OracleDrafter(case["seq"], len(case["prompt"]), n, ["full", "prefix", "partial"])
    gen = decoder(lm, "dresd", verify, oracle, eos=case["no_eos"]).generate_ids(case["prompt"], n)
    assert gen.token_ids == case["ref"][:n]
    assert gen.metrics.new_tokens == n


@pytest.mark.parametrize("verify", ["tree", "batch"])
def test_drafter_ignoring_max_len_still_stops_exactly(lm, case, verify):
    for n in (3, 8):
        oracle = OracleDrafter(case["seq"], len(case["prompt"]), n, ["full"], ignore_max_len=True)
        gen = decoder(lm, "dresd", verify, oracle, eos=case["no_eos"]).generate_ids(case["prompt"], n)
        assert gen.token_ids == case["ref"][:n]
        assert gen.metrics.new_tokens == n


def test_greedy_max_new_tokens_and_context_cap(lm, case):
    prompt, ref = case["prompt"], case["ref"]
    for n in (1, 5):
        gen = decoder(lm, "greedy", eos=case["no_eos"]).generate_ids(prompt, n)
        assert gen.token_ids == ref[:n] and gen.metrics.target_calls == n
    # The context caps the budget: room for 3 more tokens only.
    for method in ("greedy", "dresd"):
        oracle = OracleDrafter(case["seq"], len(prompt), 3, ["full"])
        dec = decoder(lm, method, drafter=oracle, eos=case["no_eos"], max_context=len(prompt) + 3)
        assert dec.generate_ids(prompt, 50).token_ids == ref[:3]


def eos_position(ref: list[int], stride: int) -> int:
    """An index k >= 8 where ref[k] occurs first and that falls inside a full draft."""
    return next(k for k in range(8, len(ref)) if ref[k] not in ref[:k] and k % stride in (1, 2, 3))


@pytest.mark.parametrize("verify", ["tree", "batch"])
def test_eos_stops_generation(lm, case, verify):
    ref = case["ref"]
    k = eos_position(ref, stride=6)  # "full" steps emit 6 tokens: EOS lands mid-draft
    eos = ref[k]
    greedy = decoder(lm, "greedy", eos=eos).generate_ids(case["prompt"], BUDGET)
    assert greedy.token_ids == ref[: k + 1]
    oracle = OracleDrafter(case["seq"], len(case["prompt"]), BUDGET, ["full"])
    gen = decoder(lm, "dresd", verify, oracle, eos=eos).generate_ids(case["prompt"], BUDGET)
    assert gen.token_ids == ref[: k + 1]
    assert gen.token_ids[-1] == eos
    assert gen.metrics.new_tokens == k + 1
    assert gen.metrics.target_calls == k // 6 + 1


def test_one_token_prompt(lm, model):
    prompt = [65]
    ref = greedy_reference(model, prompt, 20)
    eos = next(t for t in range(3, VOCAB) if t not in ref and t != 65)
    assert decoder(lm, "greedy", eos=eos).generate_ids(prompt, 20).token_ids == ref
    for verify in ("tree", "batch"):
        oracle = OracleDrafter(prompt + ref, 1, 20, MODES)
        gen = decoder(lm, "dresd", verify, oracle, eos=eos).generate_ids(prompt, 20)
        assert gen.token_ids == ref
        assert gen.metrics.target_calls < 20


def test_bad_prompts_and_config_raise(lm, case):
    dec = decoder(lm, "greedy", eos=case["no_eos"])
    with pytest.raises(ValueError, match="empty"):
        dec.generate_ids([], 5)
    small = decoder(lm, "greedy", eos=case["no_eos"], max_context=8)
    with pytest.raises(ValueError, match="context"):
        small.generate_ids(list(range(3, 11)), 5)  # 8 tokens = the whole context
    with pytest.raises(ValueError, match="context"):
        small.generate_ids(list(range(3, 20)), 5)
    assert small.generate_ids(list(range(3, 10)), 5).token_ids.__len__() == 1
    with pytest.raises(ValueError, match="needs a drafter"):
        decoder(lm, "dresd", drafter=None, eos=0)
