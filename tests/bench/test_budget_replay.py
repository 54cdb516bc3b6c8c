"""Tests for benchmarks/budget_replay.py's on-policy walk: the planner decodes a recorded
text on its own, drafting at the positions its own steps reach."""

from __future__ import annotations

import numpy as np

from benchmarks.budget_replay import walk
from dresd.decoding.budget import CostModel, DraftPlanner
from dresd.drafters import Candidates


class Oracle:
    """Drafts the recorded text's next three tokens, and a wrong token beside them."""

    name = "oracle"

    def __init__(self, text: list[int]):
        self.text, self.positions = text, []

    def begin(self, prompt_ids):
        pass

    def end(self, generated):
        pass

    def propose(self, request):
        t = len(request.context) - 1
        self.positions.append(t)
        assert request.context == self.text[: t + 1]  # the drafter never sees the future
        assert request.new_keys is not None and len(request.new_keys) >= 1
        out = Candidates()
        out.add(self.text[t + 1 : t + 1 + min(3, request.max_len)], 1.0, "oracle")
        out.add([99999], 0.01, "oracle")
        return out


def test_the_walk_drafts_where_its_own_steps_land_and_counts_every_token():
    text = list(range(100, 140))
    prompt_len = 8
    hidden = np.zeros((len(text) - 2, 4), dtype=np.float32)
    flat = CostModel([1, 2, 64], [1.0, 1.0, 1.0])  # every forward costs the same
    drafter = Oracle(text)
    emitted, seconds = walk(drafter, DraftPlanner(flat), flat, dict(prompt_len=prompt_len, tokens=text, hidden=hidden))
    assert emitted == len(text) - prompt_len
    # Three accepted drafts + the bonus per step once the planner trusts the drafter: the
    # consults land 4 positions apart, so far fewer steps than tokens.
    assert drafter.positions[0] == prompt_len - 1
    assert all(b - a == 4 for a, b in zip(drafter.positions[2:], drafter.positions[3:]))
    assert seconds < 0.4 * emitted
