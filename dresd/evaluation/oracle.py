"""The oracle bound: a method's speed had each step verified exactly the tokens it accepts.

A drafted step that accepts `a` draft tokens emits a + 1 tokens (the bonus included). The
cheapest verification that still emits them runs a + 1 positions (the root and the accepted
path), so with the same drafts, the same drafting time and the same loop, the decode would
take

    oracle_wall_s = wall_s - model_s + sum over steps of step_s * cost(a + 1) / cost(1)

where `cost(k)` is the measured forward time over k positions (CostModel, this machine) and
`step_s` the measured time of one plain verification step (our greedy loop's model_s per
call in the same run; cost(1) when none is given), so the cost curve is taken at this run's
level. oracle tokens/s = new_tokens / oracle_wall_s. The gap between a method's measured
tokens/s and its oracle is what verifying rejected positions costs it; plain greedy decoding
sits at its own bound. Steps are not stored one by one: DecodeMetrics.accepted_at[d] counts
the steps that accepted more than d draft tokens, which gives how many steps accepted
exactly a, the only per-step figure the bound needs.
"""

from __future__ import annotations

from dresd.decoding.budget import CostModel
from dresd.decoding.metrics import DecodeMetrics


def accepted_histogram(m: DecodeMetrics) -> list[int]:
    """steps[a]: target calls that accepted exactly `a` draft tokens (steps[0] includes undrafted calls)."""
    at = list(m.accepted_at)
    hist = [m.target_calls - (at[0] if at else 0)] + [at[a - 1] - (at[a] if a < len(at) else 0)
                                                      for a in range(1, len(at) + 1)]
    if any(h < 0 for h in hist) or sum(a * h for a, h in enumerate(hist)) != m.accepted:
        raise ValueError(f"metrics are inconsistent: accepted_at {at} over {m.target_calls} calls does not add up "
                         f"to {m.accepted} accepted tokens")
    return hist


def oracle_forward_s(m: DecodeMetrics, cost: CostModel, step_s: float | None = None) -> float:
    """Seconds of verification forwards over exactly the accepted positions (root included)."""
    scale = (step_s / cost.cost(1)) if step_s else 1.0
    return scale * sum(n * cost.cost(a + 1) for a, n in enumerate(accepted_histogram(m)) if n)


def oracle_wall_s(m: DecodeMetrics, cost: CostModel, step_s: float | None = None) -> float:
    """The request time with the measured verification forwards replaced by the oracle's."""
    return max(m.wall_s - m.model_s, 0.0) + oracle_forward_s(m, cost, step_s)


def oracle_tokens_per_s(m: DecodeMetrics, cost: CostModel, step_s: float | None = None) -> float:
    """new tokens / oracle_wall_s (0.0 for metrics without target calls, e.g. an HF reference)."""
    if not m.target_calls:
        return 0.0
    wall = oracle_wall_s(m, cost, step_s)
    return m.new_tokens / wall if wall > 0 else 0.0


def plain_step_s(m: DecodeMetrics) -> float | None:
    """A plain loop's verification seconds per call (the oracle's step_s), None without calls."""
    return m.model_s / m.target_calls if m.target_calls and m.model_s > 0 else None
