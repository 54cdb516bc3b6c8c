"""Hybrid drafting: several drafters' candidates in one token tree.

Each drafter's weights are normalised by its own evidence total, so every source brings
at most a support of 1 to the tree; where sources agree on a node their supports add up
and the node is labelled by all of them ("dense+suffix"), a calibration cell of its own.
The draft budget then ranks the merged nodes by expected acceptance (support times the
per-source calibration) and keeps what pays.
"""

from __future__ import annotations

from dresd.drafters import Candidates, Drafter, DraftRequest, sibling_of


class HybridDrafter:
    """Dense neighbours + prompt lookup (+ any other drafters) merged per step."""

    def __init__(self, drafters: list[Drafter], name: str = "hybrid"):
        if not drafters:
            raise ValueError("a hybrid drafter needs at least one drafter")
        self.drafters = drafters
        self.name = name

    def sibling(self) -> "HybridDrafter | None":
        """The siblings of every part (None when a part offers none: built anew instead)."""
        parts = [sibling_of(d) for d in self.drafters]
        return None if any(p is None for p in parts) else HybridDrafter(parts, self.name)

    def begin(self, prompt_ids: list[int]) -> None:
        for d in self.drafters:
            d.begin(prompt_ids)

    def end(self, generated: list[int]) -> None:
        for d in self.drafters:
            d.end(generated)

    def propose(self, request: DraftRequest) -> Candidates:
        """All drafters' candidates, each source's weights scaled to sum to its share (<= 1)."""
        out = Candidates(total=1.0)
        for d in self.drafters:
            c = d.propose(request)
            total = c.total if c.total is not None else sum(c.weights)
            if not c.paths or total <= 0:
                continue
            for path, w, src in zip(c.paths, c.weights, c.sources):
                out.add(path, w / total, src or d.name)
        return out
