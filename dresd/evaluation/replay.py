"""Replaying a recorded greedy text through the draft budget, without the model.

A timed decoding run moves with the machine's load, which hides most planner changes. Here
the planner walks a text whose greedy tokens and hidden states were recorded once: at each
step the real drafter is consulted where the planner's own previous steps got to, the tree
it keeps is planned, the part of it the recorded text confirms is accepted, and the step is
charged the calibrated forward over the kept positions plus the measured drafting time.
benchmarks/budget_replay.py records the texts and reports the rates.
"""

from __future__ import annotations

import time

from dresd.decoding.budget import CostModel, DraftPlanner
from dresd.decoding.tree import accepted_in, build_tree, subtree
from dresd.drafters import Drafter, DraftRequest


def walk(drafter: Drafter, planner: DraftPlanner, cost: CostModel, text: dict, evict=None,
         oracle: bool = False) -> tuple[int, float]:
    """The planner decoding one recorded text on its own: (tokens, seconds).

    `text` holds `tokens` (prompt + greedy output), `prompt_len`, and `hidden`: row i is the
    hidden state at position i, the one that produced token i + 1, as decoding hands them to
    its drafters. `evict` (an array) is read through before each consult, uncharged: in
    decoding a forward streams the weights between two consults, so drafting runs from cold
    caches.

    `oracle` walks the bound no planner can pass with these drafts: every step consults the
    drafter and keeps exactly the drafted nodes the text confirms (all of them, from the
    whole untrimmed tree), and a consult whose tree holds none is charged as a plain step
    without its drafting time, as if a perfect gate had skipped it. The planner only
    records the steps (for walk_detail); its decisions are not used.
    """
    tokens, hidden, t = text["tokens"], text["hidden"], text["prompt_len"] - 1
    drafter.begin(tokens[: t + 1])
    handed, emitted, seconds = 0, 0, 0.0
    while t < len(tokens) - 1:
        remaining = len(tokens) - 1 - t
        # As in the decoding loop: the bonus token is always emitted, so a step with one
        # token left does not draft.
        if remaining > 1 and (oracle or planner.should_draft()):
            if evict is not None:
                evict.sum()
            start = time.perf_counter()
            request = DraftRequest(tokens[: t + 1], remaining - 1, hidden[t - 1], hidden[handed:t])
            handed = t
            cands = drafter.propose(request)
            tree = build_tree(tokens[t], cands.paths, None, cands.weights, cands.sources, cands.total)
            if oracle:
                kept = subtree(tree, accepted_in(tree, tokens[t + 1 :])[1:])
            else:
                kept = planner.plan(tree)
            drafting = time.perf_counter() - start
            path = accepted_in(kept, tokens[t + 1 :])
            if oracle and len(path) == 1:
                seconds += cost.cost(1)  # the perfect gate: a consult that finds nothing is not made
            else:
                planner.record(kept, path, True, drafting)
                seconds += cost.cost(len(kept)) + drafting
        else:
            path = [0]
            seconds += cost.cost(1)
        planner.emitted(tokens[t + 1 : t + 1 + len(path)])
        t += len(path)
        emitted += len(path)
    drafter.end(tokens[text["prompt_len"] :])
    return emitted, seconds
