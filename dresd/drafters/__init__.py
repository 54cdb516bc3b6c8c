"""Draft proposers: decoding state in, weighted candidate continuations out.

Every drafter (dense retrieval, prompt lookup, REST, SuffixDecoding, hybrid) speaks the
same small protocol, so the decoding loop, the draft budget and the verifiers treat them
alike and the benchmark compares them on equal machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class DraftRequest:
    """What the decoding loop knows when it asks for drafts."""

    # Prompt + generated tokens so far; context[-1] is the token just emitted (the root of
    # the next verification, not yet in the KV cache). Drafts continue after it.
    context: list[int]
    # Longest useful draft: tokens after context[-1] (the loop's remaining budget - 1).
    max_len: int
    # The target's last-layer hidden state that produced context[-1]; None when unknown
    # (a one-token prompt before the first forward).
    query: np.ndarray | None = None
    # Last-layer hidden states of the positions committed since the previous request (the
    # prompt's at the first one), in order; its last row is `query`. With them a drafter can
    # keep keys for every position of the request's own text (None = not tracked).
    new_keys: np.ndarray | None = None
    # Keys compressed per compressor, filled by the first drafter that asks: the dense
    # drafters of one step share a compressor, so the query is compressed once.
    _compressed: dict = field(default_factory=dict, repr=False, compare=False)

    def compressed(self, compressor) -> np.ndarray | None:
        """`new_keys` (or `query` alone without them) compressed with `compressor`; the last row
        is the query's key. None when there is no query."""
        from dresd.datastore.compression import compress

        if self.query is None:
            return None
        if id(compressor) not in self._compressed:
            rows = self.new_keys if self.new_keys is not None and len(self.new_keys) else self.query
            self._compressed[id(compressor)] = compress(compressor, rows)
        return self._compressed[id(compressor)]


@dataclass
class Candidates:
    """Draft paths (each continues after context[-1]) with the evidence behind each."""

    paths: list[list[int]] = field(default_factory=list)
    # weights[i] >= 0: how much evidence supports paths[i] (neighbour counts, frequencies,
    # probabilities); only ratios within one call matter. Tree nodes get the summed weight
    # of the paths through them, normalised by the total: the node's "support".
    weights: list[float] = field(default_factory=list)
    # Which drafter proposed each path (for per-source acceptance statistics in a hybrid).
    sources: list[str] = field(default_factory=list)
    # The evidence total a node's support is measured against (None = sum of weights); a
    # drafter sets it higher when part of its evidence backs no path at all (e.g. dense
    # neighbours that predicted another token than the one just emitted).
    total: float | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, path: list[int], weight: float, source: str) -> None:
        if path:
            self.paths.append([int(t) for t in path])
            self.weights.append(float(weight))
            self.sources.append(source)


class Drafter(Protocol):
    """What the decoding loop asks of a drafter."""

    name: str  # short label used in metrics and reports ("dense", "pld", "rest", "suffix", ...)

    def begin(self, prompt_ids: list[int]) -> None:
        """A new request starts with these prompt tokens (per-request state resets here)."""
        ...

    def propose(self, request: DraftRequest) -> Candidates:
        """Candidate continuations after request.context[-1], each at most request.max_len tokens."""
        ...

    def end(self, generated: list[int]) -> None:
        """The request finished with these generated tokens (e.g. to learn from them)."""
        ...

    # Optional: `sibling() -> Drafter`, a drafter for another request decoding at the same
    # time (a batch slot) that shares what this one built (a warmed suffix tree, an index)
    # instead of building it again; drafters without it are built anew per slot
    # (dresd.drafters.registry.drafter_factory).


def sibling_of(drafter: "Drafter") -> "Drafter | None":
    """`drafter.sibling()` where the drafter offers one, else None."""
    make = getattr(drafter, "sibling", None)
    return make() if callable(make) else None


def truncate_at(path: list[int], max_len: int, eos_id: int | None) -> list[int]:
    """`path` cut to `max_len` tokens and after its first EOS (nothing follows an EOS)."""
    path = list(path[:max_len])
    if eos_id is not None and eos_id in path:
        path = path[: path.index(eos_id) + 1]
    return path
