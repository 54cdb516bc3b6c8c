"""Tests for dresd.evaluation.replay: the planner decodes a recorded text on its own,
drafting at the positions its own steps reach."""

from __future__ import annotations

import numpy as np

from dresd.decoding.budget import CostModel, DraftPlanner
from dresd.drafters import Candidates
from dresd.evaluation.replay import walk
from fake_drafters import FakeDrafter

TEXT = list(range(100, 140))
PROMPT_LEN = 8
FLAT = CostModel([1, 2, 64], [1.0, 1.0, 1.0])  # every forward costs the same


def next_three_and_a_wrong_one(request):
    """The recorded text's next three tokens, and a wrong token beside them; the drafter
    never sees past the position it is asked at."""
    t = len(request.context) - 1
    assert request.context == TEXT[: t + 1]
    assert request.new_keys is not None and len(request.new_keys) >= 1
    out = Candidates()
    out.add(TEXT[t + 1 : t + 1 + min(3, request.max_len)], 1.0, "oracle")
    out.add([99999], 0.01, "oracle")
    return out


def recorded(text=TEXT):
    return dict(prompt_len=PROMPT_LEN, tokens=text, hidden=np.zeros((len(text) - 2, 4), dtype=np.float32))


def test_the_walk_drafts_where_its_own_steps_land_and_counts_every_token():
    drafter = FakeDrafter(next_three_and_a_wrong_one, "oracle")
    emitted, seconds = walk(drafter, DraftPlanner(FLAT), FLAT, recorded())
    assert emitted == len(TEXT) - PROMPT_LEN
    positions = [len(c) - 1 for c in drafter.contexts]
    # Three accepted drafts + the bonus per step once the planner trusts the drafter: the
    # consults land 4 positions apart, so far fewer steps than tokens.
    assert positions[0] == PROMPT_LEN - 1
    assert all(b - a == 4 for a, b in zip(positions[2:], positions[3:]))
    assert seconds < 0.4 * emitted
    # Each position's hidden state is handed over once, in order, up to the one asked about.
    assert sum(len(r.new_keys) for r in drafter.requests) == positions[-1]
    assert drafter.begun == [TEXT[:PROMPT_LEN]] and drafter.ended == [TEXT[PROMPT_LEN:]]


def test_a_walk_without_drafts_costs_a_plain_step_per_token_plus_the_drafting():
    cost = CostModel([1, 64], [0.5, 2.0])
    drafter = FakeDrafter()
    emitted, seconds = walk(drafter, DraftPlanner(cost), cost, recorded())
    assert emitted == len(TEXT) - PROMPT_LEN
    # Consulted at every step but the last (one token left: the bonus alone).
    assert len(drafter.requests) == emitted - 1
    # Each step a one-position forward; the consults' own (tiny) time on top.
    assert emitted * 0.5 <= seconds < emitted * 0.5 + 0.5


def test_the_oracle_walk_verifies_only_confirmed_nodes_and_never_pays_for_empty_consults():
    # Positions cost: the planner must price the wrong sibling in; the oracle never verifies it.
    cost = CostModel([1, 2, 3, 4, 5], [1.0, 1.5, 2.0, 2.5, 3.0])
    drafter = FakeDrafter(next_three_and_a_wrong_one, "oracle")
    emitted, seconds = walk(drafter, DraftPlanner(cost), cost, recorded(), oracle=True)
    assert emitted == len(TEXT) - PROMPT_LEN
    positions = [len(c) - 1 for c in drafter.contexts]
    assert all(b - a == 4 for a, b in zip(positions, positions[1:]))  # three drafts + the bonus from the first step
    # Each drafted step: root + 3 confirmed nodes = cost(4); the tail's steps are shorter.
    steps = len(positions)
    assert seconds < steps * 2.5 + 0.5
    planned, planned_s = walk(FakeDrafter(next_three_and_a_wrong_one, "oracle"), DraftPlanner(cost), cost, recorded())
    assert planned == emitted and seconds < planned_s
    # Drafts that never hold the next token: the oracle skips every consult, a plain step each.
    emitted, seconds = walk(FakeDrafter(), DraftPlanner(cost), cost, recorded(), oracle=True)
    assert seconds == emitted * 1.0
