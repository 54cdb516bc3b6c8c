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
from dresd.decoding.tree import TokenTree, build_tree
from dresd.drafters import Drafter, DraftRequest


def accepted_in(tree: TokenTree, true_tokens: list[int]) -> list[int]:
    """The node path greedy acceptance takes in `tree` when the target's tokens are `true_tokens`."""
    path = [0]
    for token in true_tokens:
        child = tree.children[path[-1]].get(token)
        if child is None:
            break
        path.append(child)
    return path


def walk(drafter: Drafter, planner: DraftPlanner, cost: CostModel, text: dict, evict=None) -> tuple[int, float]:
    """The planner decoding one recorded text on its own: (tokens, seconds).

    `text` holds `tokens` (prompt + greedy output), `prompt_len`, and `hidden`: row i is the
    hidden state at position i, the one that produced token i + 1, as decoding hands them to
    its drafters. `evict` (an array) is read through before each consult, uncharged: in
    decoding a forward streams the weights between two consults, so drafting runs from cold
    caches.
    """
    tokens, hidden, t = text["tokens"], text["hidden"], text["prompt_len"] - 1
    drafter.begin(tokens[: t + 1])
    handed, emitted, seconds = 0, 0, 0.0
    while t < len(tokens) - 1:
        remaining = len(tokens) - 1 - t
        # As in the decoding loop: the bonus token is always emitted, so a step with one
        # token left does not draft.
        if remaining > 1 and planner.should_draft():
            if evict is not None:
                evict.sum()
            start = time.perf_counter()
            request = DraftRequest(tokens[: t + 1], remaining - 1, hidden[t - 1], hidden[handed:t])
            handed = t
            cands = drafter.propose(request)
            kept = planner.plan(build_tree(tokens[t], cands.paths, None, cands.weights, cands.sources, cands.total))
            drafting = time.perf_counter() - start
            path = accepted_in(kept, tokens[t + 1 :])
            planner.record(kept, path, True, drafting)
            seconds += cost.cost(len(kept)) + drafting
        else:
            path = [0]
            seconds += cost.cost(1)
        t += len(path)
        emitted += len(path)
    drafter.end(tokens[text["prompt_len"] :])
    return emitted, seconds
