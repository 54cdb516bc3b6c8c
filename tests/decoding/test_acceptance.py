"""Tree acceptance: greedy equivalence, the target distribution, and losslessness of sampling.

The statistical tests draw many acceptance steps (or, at the end, whole generations through
the decoding loop on a tiny model) from seeded generators, so they are deterministic; their
chi-square thresholds are the p = 0.001 critical values (a correct acceptor would fail with
probability 0.001 on a fresh seed). The negative controls show
the same statistic rejects subtly biased acceptors.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import pytest
import torch

from dresd.config import SamplingParams
from dresd.decoding.acceptance import _nucleus, _nucleus_of_row, sample_accept, seeded_generator, target_probs
from dresd.decoding.tree import TokenTree, build_tree, greedy_accept
from dresd.drafters import Candidates
from fake_drafters import FakeDrafter

# Chi-square critical values at p = 0.001, degrees of freedom 1..50 (no scipy in the venv;
# computed once with mpmath's regularised incomplete gamma).
CHI2_CRIT_999 = [
    10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588,
    31.264, 32.909, 34.528, 36.123, 37.697, 39.252, 40.790, 42.312, 43.820, 45.315,
    46.797, 48.268, 49.728, 51.179, 52.620, 54.052, 55.476, 56.892, 58.301, 59.703,
    61.098, 62.487, 63.870, 65.247, 66.619, 67.985, 69.346, 70.703, 72.055, 73.402,
    74.745, 76.084, 77.419, 78.750, 80.077, 81.400, 82.720, 84.037, 85.351, 86.661,
]

V = 6
N = 20_000
Acceptor = Callable[[TokenTree, torch.Tensor, SamplingParams, torch.Generator], tuple[list[int], int]]


# --- target_probs ---------------------------------------------------


def test_target_probs_temperature():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for t in (0.3, 1.0, 2.0):
        p = target_probs(logits, t, 1.0)
        assert torch.allclose(p, torch.softmax(logits / t, -1))
        assert torch.allclose(p.sum(-1), torch.ones(4))
    # Hotter is flatter: the top probability falls as the temperature rises.
    tops = [target_probs(logits, t, 1.0).max(-1).values for t in (0.3, 1.0, 2.0)]
    assert bool((tops[0] > tops[1]).all() and (tops[1] > tops[2]).all())
    # Temperature 0 is greedy: a one-hot at argmax, first index on ties like torch.argmax.
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert target_probs(tied, 0.0, 0.5).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_target_probs_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.allclose(target_probs(logits, 1.0, 0.75), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(target_probs(logits, 1.0, 0.9), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert target_probs(logits, 1.0, 1e-6).tolist() == [1.0, 0.0, 0.0, 0.0]  # the top token stays
    # On random rows: the kept set is a prefix of the sorted probabilities, reaches top_p,
    # is minimal (without its smallest member it falls short), and is renormalised.
    gen = torch.Generator().manual_seed(1)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        logits = torch.randn(16, 40, generator=gen) * 2
        full, cut = target_probs(logits, 0.8, 1.0), target_probs(logits, 0.8, top_p)
        assert torch.allclose(cut.sum(-1), torch.ones(16))
        for f, c in zip(full, cut):
            kept = c > 0
            mass = float(f[kept].sum())
            assert mass >= top_p - 1e-6 and mass - float(f[kept].min()) < top_p
            assert float(f[kept].min()) >= float(torch.cat([f[~kept], f.new_zeros(1)]).max())
            assert torch.allclose(c[kept], f[kept] / mass)


def test_candidate_nucleus_equals_the_full_sort():
    """The CPU fast path (sorting only the tokens that can be in the nucleus) cuts exactly
    where sorting the whole vocabulary does, ties included (equal probabilities by id)."""
    gen = torch.Generator().manual_seed(2)
    for scale, top_p in ((0.5, 0.9), (3.0, 0.95), (8.0, 0.5), (1.0, 0.999999), (0.0, 0.3)):
        logits = (torch.randn(8, 1000, generator=gen) * scale).round()  # rounding makes ties
        probs = torch.softmax(logits, -1)
        full = _nucleus(probs, top_p)
        assert all(torch.equal(_nucleus_of_row(r, top_p), f) for r, f in zip(probs, full))
    # Uniform: every token ties; the nucleus is the lowest ids.
    assert _nucleus_of_row(torch.full((10,), 0.1), 0.25).nonzero().squeeze(-1).tolist() == [0, 1, 2]


# --- greedy ------------------------------------------------------------------------


def test_greedy_params_reproduce_greedy_accept():
    gen = torch.Generator().manual_seed(0)
    long_paths = 0
    for trial in range(300):
        vocab = 5  # small, so drafts often match the argmax and paths go deep
        drafts = torch.randint(0, vocab, (int(torch.randint(1, 6, (1,), generator=gen)), 4),
                               generator=gen).tolist()
        tree = build_tree(int(torch.randint(0, vocab, (1,), generator=gen)), drafts)
        # Integer logits make argmax ties common: tie-breaking must match torch.argmax.
        logits = torch.randint(0, 3, (len(tree), vocab), generator=gen).float()
        predicted = logits.argmax(-1).tolist()
        expected = greedy_accept(tree, predicted)
        sampler = torch.Generator().manual_seed(trial)
        state = sampler.get_state()
        for top_p in (1.0, 0.3):
            path, bonus = sample_accept(tree, logits, SamplingParams(0.0, top_p), sampler)
            assert (path, bonus) == (expected, predicted[expected[-1]])
        assert sample_accept(tree, logits, SamplingParams(), None) == (expected, predicted[expected[-1]])
        assert torch.equal(sampler.get_state(), state)  # greedy consumes no randomness
        long_paths += len(expected) > 2
    assert long_paths > 20


# --- losslessness (statistical) ----------------------------------------------------


def _stat_tree() -> tuple[TokenTree, torch.Tensor]:
    """Root children 0, 1, 2 (0 -> 3 -> 4 a chain, 1 with children 3 and 5, 2 a leaf);
    tokens 3, 4, 5 are not root children. Fixed logits per node."""
    tree = build_tree(5, [[0, 3, 4], [1, 3], [1, 5], [2]])
    logits = torch.randn(len(tree), V, generator=torch.Generator().manual_seed(7))
    return tree, logits


def _emitted(tree: TokenTree, path: list[int], bonus: int) -> tuple[int, ...]:
    """The tokens one step emits: the accepted draft tokens, then the bonus."""
    return tuple(tree.tokens[n] for n in path[1:]) + (bonus,)


def _step_probs(tree: TokenTree, logits: torch.Tensor, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """Exact probability of every emitted sequence under plain sampling from the target:
    the product of p(t_i | prefix) along the tree path, ending at the first token that
    leaves the tree (the bonus)."""
    p = target_probs(logits, params.temperature, params.top_p).double().tolist()
    out: dict[tuple[int, ...], float] = {}

    def walk(node: int, prefix: tuple[int, ...], mass: float) -> None:
        for tok in range(V):
            child = tree.children[node].get(tok)
            if child is None:
                out[prefix + (tok,)] = mass * p[node][tok]
            else:
                walk(child, prefix + (tok,), mass * p[node][tok])

    walk(0, (), 1.0)
    return out


def _marginal(probs: dict[tuple[int, ...], float], k: int) -> dict[tuple[int, ...], float]:
    """Probability of each first-k-tokens prefix (shorter steps keep their whole sequence)."""
    out: Counter = Counter()
    for seq, q in probs.items():
        out[seq[:k]] += q
    return dict(out)


def _chi_square(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom. Impossible categories must be unseen;
    categories expected fewer than 5 times are pooled into one bin."""
    assert set(counts) <= set(probs), set(counts) - set(probs)
    assert all(counts[c] == 0 for c, q in probs.items() if q == 0.0), "drew a token outside the nucleus"
    bins, small_obs, small_exp = [], 0, 0.0
    for c, q in probs.items():
        if q == 0.0:
            continue
        if n * q < 5:
            small_obs, small_exp = small_obs + counts[c], small_exp + n * q
        else:
            bins.append((counts[c], n * q))
    if small_exp > 0:
        bins.append((small_obs, small_exp))
    assert math.isclose(sum(e for _, e in bins), n, rel_tol=1e-6)
    return sum((o - e) ** 2 / e for o, e in bins), len(bins) - 1


def _run(acceptor: Acceptor, params: SamplingParams, seed: int = 0) -> tuple[dict, Counter]:
    tree, logits = _stat_tree()
    gen = torch.Generator().manual_seed(seed)
    seqs = Counter(_emitted(tree, *acceptor(tree, logits, params, gen)) for _ in range(N))
    return _step_probs(tree, logits, params), seqs


def _tests(exact: dict, seqs: Counter) -> dict[str, tuple[float, int]]:
    """(statistic, df) for: (a) the first emitted token, (b) the first two (a step that
    stops at its first token counts as its own category: p(t1) alone, exactly), (full) the
    whole emitted sequence."""
    out = {}
    for name, k in (("first", 1), ("first_two", 2), ("full", 10)):
        counts = Counter()
        for seq, c in seqs.items():
            counts[seq[:k]] += c
        out[name] = _chi_square(counts, _marginal(exact, k), N)
    return out


@pytest.mark.parametrize("params", [SamplingParams(1.0, 1.0), SamplingParams(0.7, 0.9),
                                    SamplingParams(1.5, 0.6)])
def test_sample_accept_emits_the_target_distribution(params):
    exact, seqs = _run(sample_accept, params)
    # The first-token marginal is exactly target_probs at the root; the two-token joint is
    # p(t1) * p(t2 | t1) when t1 is a root child.
    tree, logits = _stat_tree()
    p = target_probs(logits, params.temperature, params.top_p).double()
    first = _marginal(exact, 1)
    assert all(math.isclose(first[(t,)], float(p[0, t]), rel_tol=1e-6, abs_tol=1e-12) for t in range(V))
    two = _marginal(exact, 2)
    for t1, node in tree.children[0].items():
        for t2 in range(V):
            assert math.isclose(two[(t1, t2)], float(p[0, t1] * p[node, t2]), rel_tol=1e-6, abs_tol=1e-12)
    for name, (stat, df) in _tests(exact, seqs).items():
        assert stat < CHI2_CRIT_999[df - 1], (name, stat, df)
    # Steps that go deeper than one token do occur: the test exercises accepted drafts.
    assert sum(c for s, c in seqs.items() if len(s) >= 3) > N // 20


def _first_child_acceptor(tree, logits, params, gen):
    """Biased: always takes the root's first child, then samples correctly below it."""
    node = next(iter(tree.children[0].values()))
    path = [0, node]
    while True:
        p = target_probs(logits[node], params.temperature, params.top_p)
        x = int(torch.multinomial(p, 1, generator=gen))
        if (child := tree.children[node].get(x)) is None:
            return path, x
        node = child
        path.append(node)


def _naive_residual_acceptor(tree, logits, params, gen):
    """Biased: accepts each child d with probability p(d) without renormalising after the
    earlier rejections, then draws the bonus from p without the children."""
    node, path = 0, [0]
    while True:
        p = target_probs(logits[node], params.temperature, params.top_p)
        for tok, child in tree.children[node].items():
            if float(torch.rand((), generator=gen)) < float(p[tok]):
                node = child
                path.append(node)
                break
        else:
            rest = p.clone()
            rest[list(tree.children[node])] = 0.0
            if float(rest.sum()) == 0.0:
                rest = p  # every allowed token is a child: nothing else to emit
            return path, int(torch.multinomial(rest, 1, generator=gen))


def test_first_child_acceptor_is_rejected():
    stats = _tests(*_run(_first_child_acceptor, SamplingParams(1.0, 1.0)))
    assert all(stat > CHI2_CRIT_999[df - 1] for stat, df in stats.values()), stats


@pytest.mark.parametrize("params", [SamplingParams(1.0, 1.0), SamplingParams(0.7, 0.9)])
def test_naive_residual_acceptor_is_rejected(params):
    stats = _tests(*_run(_naive_residual_acceptor, params))
    assert all(stat > CHI2_CRIT_999[df - 1] for stat, df in stats.values()), stats


# --- determinism -------------------------------------------------------------------


def test_same_seed_same_outputs():
    tree, logits = _stat_tree()

    def draws(params: SamplingParams) -> list[tuple[list[int], int]]:
        gen = seeded_generator(params)
        return [sample_accept(tree, logits, params, gen) for _ in range(200)]

    a = SamplingParams(0.9, 0.95, seed=3)
    assert draws(a) == draws(a)
    assert draws(a) != draws(SamplingParams(0.9, 0.95, seed=4))


# --- losslessness of the whole decoding loop (statistical) -------------------------
#
# The tests above check one acceptance step on fixed logits. These run the real loop
# (SpeculativeDecoder.generate_ids: prefill, drafts merged into a token tree, tree-attention
# verification, KV-cache cut, sample_accept, the next step from the accepted context) on a
# tiny random Llama, once per seed, and compare the first two generated tokens with their
# exact distribution p(t1 | prompt) * p(t2 | prompt, t1) computed from the model's logits.

LOOP_PROMPT = [72, 101, 108, 108]
LOOP_NEW = 3  # tokens per generation: step 1 drafts up to 2 tokens, step 2 one
LOOP_N = 600  # generations per positive test
LOOP_N_BIASED = 300  # generations per negative control
LOGIT_SCALE = 4.0  # lm_head scaled: top token ~0.5 instead of ~0.1, so few categories


@pytest.fixture(scope="module")
def loop_model(tiny_model_dir):
    """A private copy of the tiny Llama (lm_head scaled so its distributions are peaked),
    run single-threaded: the model is tiny and the 2 cores are shared."""
    from dresd.config import ModelConfig
    from dresd.model.loading import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from dresd.model.fastpath.cpu_linear import use_dual_layout

    model = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu", dual_layout=False)).model
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    use_dual_layout(model)  # after the edit: the packed copies are taken at conversion
    yield model
    torch.set_num_threads(threads)


@torch.inference_mode()
def _next_logits(model, contexts: list[list[int]]) -> torch.Tensor:
    """(len(contexts), V) next-token logits after each context (equal lengths, no cache)."""
    return model(torch.tensor(contexts)).logits[:, -1].float()


def _top_k_drafts(model, seed: int):
    """A draft function whose drafts are often right and sometimes not: the model's top-3
    next tokens, each followed by its argmax continuation; the top token followed by its
    second-best continuation (two children at depth 2); one random path."""
    gen = torch.Generator().manual_seed(seed)
    memo: dict[tuple[int, ...], list[int]] = {}

    def ranked(context: list[int]) -> list[int]:
        key = tuple(context)
        if key not in memo:
            memo[key] = _next_logits(model, [context])[0].argsort(descending=True)[:3].tolist()
        return memo[key]

    def draft(request):
        cands = Candidates()
        ctx, n = request.context, request.max_len
        top = ranked(ctx)
        for rank, tok in enumerate(top):
            cands.add([tok, ranked(ctx + [tok])[0]][:n], 3 - rank, "topk")
        cands.add([top[0], ranked(ctx + [top[0]])[1]][:n], 1, "topk")
        cands.add(torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist(), 1, "topk")
        return cands

    return draft


def _exact_first_two(model, params: SamplingParams, eos: int) -> dict[tuple[int, ...], float]:
    """Exact probability of the first two generated tokens under plain sampling (EOS first
    ends the generation: category (eos,))."""
    p1 = target_probs(_next_logits(model, [LOOP_PROMPT])[0], params.temperature, params.top_p).double()
    firsts = [t for t in range(len(p1)) if p1[t] > 0 and t != eos]
    p2 = target_probs(_next_logits(model, [LOOP_PROMPT + [t] for t in firsts]),
                      params.temperature, params.top_p).double()
    out = {(eos,): float(p1[eos])}
    for t1, row in zip(firsts, p2):
        for t2, q in enumerate(row.tolist()):
            out[(t1, t2)] = float(p1[t1]) * q
    return out


def _loop_eos(model) -> int:
    """The least likely first token: an EOS the loop essentially never emits (still
    accounted for exactly)."""
    return int(_next_logits(model, [LOOP_PROMPT])[0].argmin())


def _loop_samples(model, method: str, params: SamplingParams, n: int, seed0: int) -> tuple[Counter, int]:
    """First-two-token counts of `n` generations (seeds seed0..seed0+n-1), and the draft
    tokens accepted in all."""
    from dresd.config import SpeculativeConfig
    from dresd.decoding.loop import SpeculativeDecoder

    eos = _loop_eos(model)
    drafter = FakeDrafter(_top_k_drafts(model, seed0), "topk") if method == "dresd" else None
    spec = SpeculativeConfig(method=method, budget="off", verify="tree")
    decoder = SpeculativeDecoder(model, eos, 2048, spec, drafter)
    counts, accepted = Counter(), 0
    for i in range(n):
        sampling = SamplingParams(params.temperature, params.top_p, seed=seed0 + i)
        gen = decoder.generate_ids(LOOP_PROMPT, LOOP_NEW, sampling)
        toks = gen.token_ids
        assert len(toks) == LOOP_NEW or toks[-1] == eos, toks
        counts[tuple(toks[:2])] += 1
        accepted += gen.metrics.accepted
    return counts, accepted


def _loop_stats(model, counts: Counter, params: SamplingParams, n: int) -> dict[str, tuple[float, int]]:
    exact = _exact_first_two(model, params, _loop_eos(model))
    out = {}
    for name, k in (("first", 1), ("first_two", 2)):
        marg = Counter()
        for seq, c in counts.items():
            marg[seq[:k]] += c
        stat, df = _chi_square(marg, _marginal(exact, k), n)
        assert 1 <= df <= len(CHI2_CRIT_999), (name, df)
        out[name] = (stat, df)
    return out


LOOP_PARAMS = [SamplingParams(1.0, 1.0), SamplingParams(0.8, 0.9)]


@pytest.mark.parametrize("params", LOOP_PARAMS, ids=["t1.0", "t0.8-p0.9"])
@pytest.mark.parametrize("method", ["dresd", "greedy"], ids=["speculative", "plain"])
def test_decoding_loop_samples_the_target_distribution(loop_model, method, params):
    """Speculative sampling through the whole loop (drafts accepted with sample_accept) and
    plain sampling through the same loop both draw the first two tokens from the exact
    p(t1 | prompt) * p(t2 | prompt, t1)."""
    counts, accepted = _loop_samples(loop_model, method, params, LOOP_N, 1000 if method == "dresd" else 50_000)
    stats = _loop_stats(loop_model, counts, params, LOOP_N)
    assert all(stat < CHI2_CRIT_999[df - 1] for stat, df in stats.values()), stats
    if method == "dresd":  # drafts were accepted: the test exercises acceptance in the loop
        assert accepted > LOOP_N // 2, accepted
    else:
        assert accepted == 0


@pytest.mark.parametrize("biased", [_naive_residual_acceptor, _first_child_acceptor], ids=["naive", "first_child"])
def test_decoding_loop_with_a_biased_acceptor_is_rejected(loop_model, monkeypatch, biased):
    """The same statistic run through the loop rejects a subtly biased acceptance."""
    import dresd.decoding.acceptance
    import dresd.decoding.loop

    def accept(tree, logits, params, gen):
        if not tree.children[0]:  # a lone root (no drafts): nothing to be biased about
            return sample_accept(tree, logits, params, gen)
        return biased(tree, logits, params, gen)

    monkeypatch.setattr(dresd.decoding.acceptance, "sample_accept", accept)
    monkeypatch.setattr(dresd.decoding.loop, "sample_accept", accept, raising=False)
    params = SamplingParams(1.0, 1.0)
    counts, accepted = _loop_samples(loop_model, "dresd", params, LOOP_N_BIASED, 1000)
    assert accepted > 0
    stats = _loop_stats(loop_model, counts, params, LOOP_N_BIASED)
    assert all(stat > CHI2_CRIT_999[df - 1] for stat, df in stats.values()), stats
