"""Decoding metrics, per request and aggregated, defined once.

- acceptance rate = accepted draft tokens / draft positions verified;
- mean accepted tokens per call (MAT) = new tokens / target calls after prefill, which
  INCLUDES the bonus token (the vLLM / Spec-Bench convention);
- per-position acceptance: for draft depth d, the share of drafted steps that offered a
  depth-d token and accepted it;
- wall time split into model forwards, retrieval (compress + search + drafting) and other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class DecodeMetrics:
    """Counters of one request (or a sum of requests)."""

    new_tokens: int = 0  # tokens generated (bonus tokens included)
    target_calls: int = 0  # verification forwards after the prefill
    drafted_steps: int = 0  # steps that verified at least one draft token
    drafted: int = 0  # draft positions verified
    accepted: int = 0  # draft tokens accepted
    verified_positions: int = 0  # positions run through the target, roots included
    full_accepts: int = 0  # drafted steps whose whole deepest draft was accepted
    partial_accepts: int = 0  # drafted steps that accepted some but not all of it
    rejects: int = 0  # drafted steps that accepted nothing
    offered_at: list[int] = field(default_factory=list)  # offered_at[d-1]: steps offering depth d
    accepted_at: list[int] = field(default_factory=list)  # accepted_at[d-1]: steps accepting depth d
    prefill_s: float = 0.0  # prompt forward
    model_s: float = 0.0  # verification forwards (incl. acceptance + cache cut)
    retrieval_s: float = 0.0  # drafting: compress + search + filter + values
    wall_s: float = 0.0  # whole request, prefill included

    def record_step(self, accepted: int, drafted: int, verified: int, offered_depth: int, new_tokens: int) -> None:
        """Account for one verification step."""
        self.target_calls += 1
        self.new_tokens += new_tokens
        self.verified_positions += verified
        if drafted == 0:
            return
        self.drafted_steps += 1
        self.drafted += drafted
        self.accepted += accepted
        if accepted == 0:
            self.rejects += 1
        elif accepted >= offered_depth:
            self.full_accepts += 1
        else:
            self.partial_accepts += 1
        while len(self.offered_at) < offered_depth:
            self.offered_at.append(0)
            self.accepted_at.append(0)
        for d in range(offered_depth):
            self.offered_at[d] += 1
            if d < accepted:
                self.accepted_at[d] += 1

    def merge(self, other: "DecodeMetrics") -> "DecodeMetrics":
        """Sum of two metric sets (for aggregation)."""
        out = DecodeMetrics()
        for name, value in asdict(self).items():
            theirs = getattr(other, name)
            if isinstance(value, list):
                n = max(len(value), len(theirs))
                setattr(out, name, [(value[i] if i < len(value) else 0) + (theirs[i] if i < len(theirs) else 0) for i in range(n)])
            else:
                setattr(out, name, value + theirs)
        return out

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens per target call, bonus included."""
        return self.new_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / o if o else 0.0 for a, o in zip(self.accepted_at, self.offered_at)]

    @property
    def other_s(self) -> float:
        """Wall time outside the prefill, the verification forwards and drafting: the loop itself."""
        return max(self.wall_s - self.prefill_s - self.model_s - self.retrieval_s, 0.0)

    @property
    def retrieval_share(self) -> float:
        return self.retrieval_s / self.wall_s if self.wall_s else 0.0

    @classmethod
    def from_summary(cls, data: dict) -> "DecodeMetrics":
        """The counters back from a summary() dict (derived rates are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> dict:
        """Counters plus derived rates, JSON-ready."""
        out = asdict(self)
        out.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted_tokens=self.mean_accepted_tokens,
            tokens_per_s=self.tokens_per_s,
            per_position_acceptance=self.per_position_acceptance,
            retrieval_share=self.retrieval_share,
            other_s=self.other_s,
        )
        return out


def aggregate(items: list[DecodeMetrics]) -> DecodeMetrics:
    """Sum per-request metrics."""
    total = DecodeMetrics()
    for m in items:
        total = total.merge(m)
    return total
