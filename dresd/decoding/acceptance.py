"""Lossless acceptance of a retrieved token tree: greedy or speculative sampling.

Drafts come from retrieval, so they are deterministic token paths: there is no draft
distribution q to correct for. One target forward over the flattened `TokenTree` gives
`logits[i]`, the target's next-token logits after node i. `target_probs` is the one
definition of the distribution plain sampling draws from (temperature, then top-p);
`sample_accept` walks the tree drawing from it, so that the emitted tokens are
distributed exactly as plain sampling from the target would emit them.
"""

from __future__ import annotations


import torch

from dresd.config.schema import SamplingParams
from dresd.decoding.tree import TokenTree


def seeded_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device`, seeded with `params.seed` (or randomly when None)."""
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def acceptor(params: SamplingParams | None):
    """The `accept(tree, logits)` a decoding loop hands to verification: None for greedy
    (temperature 0 or no params), else speculative sampling with a generator seeded from
    `params`, so a request draws the same tokens whenever it is decoded."""
    if params is None or params.temperature == 0:
        return None
    generator = seeded_generator(params)
    return lambda tree, logits: sample_accept(tree, logits, params, generator)


def target_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities plain sampling draws from.

    softmax(logits / temperature), then the top-p nucleus: the smallest prefix of the
    probabilities sorted in decreasing order (equal ones by token id) whose mass reaches
    `top_p` (the top token is always kept), renormalised. Temperature 0 is greedy: a
    one-hot at `argmax` (same tie-breaking as `torch.argmax`).
    """
    if temperature <= 0.0:
        top = logits.argmax(-1, keepdim=True)
        return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(-1, top, 1.0)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    rows = probs.reshape(-1, probs.shape[-1])
    if rows.device.type == "cpu":  # sorting the whole vocabulary dominates on CPU
        kept = torch.stack([_nucleus_of_row(r, top_p) for r in rows])
    else:
        kept = _nucleus(rows, top_p)
    return (kept / kept.sum(-1, keepdim=True)).reshape(probs.shape)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(R, V) probabilities with the tokens outside each row's top-p nucleus zeroed."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    # A token is dropped when the mass strictly before it already reaches top_p.
    sorted_p = sorted_p.masked_fill((sorted_p.cumsum(-1) - sorted_p) >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def _nucleus_of_row(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`_nucleus` of one (V,) row, sorting only the tokens that can be in it.

    Tokens below (1 - top_p) / V hold less than 1 - top_p in all, so the tokens at or
    above it reach top_p and, coming first in the sorted order, contain the nucleus.
    """
    cand = (probs >= (1.0 - top_p) / probs.shape[-1]).nonzero().squeeze(-1)
    if float(probs[cand].sum()) < top_p:  # float rounding with top_p next to 1
        return _nucleus(probs[None], top_p)[0]
    return torch.zeros_like(probs).index_copy_(0, cand, _nucleus(probs[cand][None], top_p)[0])


def _draw(row: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from target_probs(row): the target's choice after one tree node."""
    if params.greedy:
        return int(row.argmax())
    probs = target_probs(row, params.temperature, params.top_p)
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_accept(tree: TokenTree, logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Accept a root path of `tree` against the target; returns (node path, bonus token).

    `logits` is (len(tree), V): row i is the target's next-token logits after node i.
    From the root: draw x ~ p(. | node) = target_probs(logits[node]); if a child of the
    node holds x, move to it and repeat; else stop, and x is the bonus token. The path is
    root first; the step emits the path's draft tokens (path[1:]) and then the bonus.
    Only the rows along the path are read (one softmax, plus one sort under top-p, per
    accepted token + 1; under top-p the sort covers only the candidates of
    the nucleus). Greedy params (temperature 0) give exactly `greedy_accept` with
    predicted = logits.argmax(-1), and consume no randomness.

    Why it is lossless: a retrieved draft token d is a point mass q = delta(d), so the
    speculative-sampling test accepts it with probability min(1, p(d) / q(d)) = p(d), and
    on rejection draws from the residual norm(max(0, p - q)) = p with d removed,
    renormalised. Trying several children in turn (SpecInfer's multi-step verification,
    Miao et al. 2024; the same reasoning as multi-draft speculative sampling with
    deterministic drafts) makes child d_k emitted with probability
    p(d_k) / (1 - p(d_1) - ... - p(d_{k-1})) times the probability all earlier ones were
    rejected, i.e. exactly p(d_k), and a non-child token x with probability p(x): the same
    as drawing x ~ p once and following the child that holds x, which is what this does.
    By induction on the depth: the node we stand on is the prefix emitted so far, the
    next emitted token is drawn from p(. | that prefix) whether it turns out to be a draft
    token or the bonus, so every emitted token is distributed exactly as plain sampling
    from the target (with the same temperature and top-p) would draw it.
    """
    node, path = 0, [0]
    while True:
        x = _draw(logits[node], params, generator)
        child = tree.children[node].get(x)
        if child is None:
            return path, x
        node = child
        path.append(node)
