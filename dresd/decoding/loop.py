"""The decoding loop: prefill, then draft -> plan -> verify -> accept until EOS or the token limit.

Plain greedy decoding runs through this same loop with no drafter, so speed and outputs
of the methods are compared on equal machinery. The query for the next draft is the
hidden state the verification forward already produced for the bonus token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from dresd.decoding.budget import CostModel, DraftPlanner
from dresd.config import SpeculativeConfig
from dresd.drafters import Drafter, DraftRequest
from dresd.decoding.kv_cache import GrowingCache
from dresd.decoding.metrics import DecodeMetrics
from dresd.decoding.tree import build_tree
from dresd.decoding.verify import forward, verify_batch, verify_token_tree

if TYPE_CHECKING:
    from dresd.config import SamplingParams


@dataclass
class Generation:
    """One request's result."""

    token_ids: list[int]  # generated tokens (EOS included when generation stopped on it)
    metrics: DecodeMetrics
    text: str = ""  # decoded text (filled when a tokenizer is at hand)


def _sync(device: torch.device) -> None:
    # CUDA launches are asynchronous: wall-clock splits are only honest after a sync.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SpeculativeDecoder:
    """Decoding with optional drafts: propose -> plan (draft budget) -> verify -> accept.

    Greedy acceptance is token-identical to plain greedy decoding; with sampling params
    (temperature > 0) acceptance is speculative sampling, which keeps the target's
    sampling distribution exactly (dresd.decoding.acceptance).
    """

    def __init__(self, model, eos_id: int, max_context: int, spec: SpeculativeConfig, drafter: Drafter | None = None,
                 cost: CostModel | None = None):
        if spec.method != "greedy" and drafter is None:
            raise ValueError(f"method {spec.method!r} needs a drafter")
        if spec.budget == "auto" and spec.method != "greedy" and spec.verify == "tree" and cost is None:
            raise ValueError("budget 'auto' needs a cost model (dresd.decoding.calibration.cached_cost_model)")
        self.model = model
        self.eos_id = eos_id
        self.max_context = max_context
        self.spec = spec
        self.drafter = drafter if spec.method != "greedy" else None
        # The planner's calibration persists across requests: a decoder learns its drafter.
        budgeted = spec.budget == "auto" and spec.verify == "tree"
        self.planner = DraftPlanner(cost if budgeted else None, spec.max_verify)

    def _accept_fn(self, sampling: SamplingParams | None):
        if sampling is None or sampling.temperature == 0:
            return None
        if self.spec.verify == "batch" and self.drafter is not None:
            raise ValueError("speculative sampling needs verify='tree'")
        from dresd.decoding.acceptance import acceptor

        return acceptor(sampling)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int,
                     sampling: SamplingParams | None = None,
                     on_tokens: Callable[[list[int]], bool] | None = None) -> Generation:
        """Generate up to `max_new_tokens` tokens after `prompt_ids` (greedy unless `sampling` says otherwise).

        `on_tokens` sees each step's committed tokens as they come (a streamer, stopping
        criteria); returning True ends generation after that step."""
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context}")
        accept = self._accept_fn(sampling)
        budget = min(max_new_tokens, self.max_context - len(prompt_ids))
        device = self.model.device
        metrics = DecodeMetrics()
        start = time.perf_counter()
        cache = GrowingCache()
        query = None
        # Hidden states of committed positions not yet shown to the drafter (its keys for
        # the request's own text); the prefill's cover every prompt position but the last.
        fresh_keys: list[torch.Tensor] = []
        if len(prompt_ids) > 1:
            hidden, _ = forward(self.model, torch.tensor([prompt_ids[:-1]], device=device), cache, logits=False)
            query = hidden[0, -1]
            fresh_keys.append(hidden[0])
        _sync(device)
        metrics.prefill_s = time.perf_counter() - start
        drafter, planner = self.drafter, self.planner
        if drafter is not None:
            drafter.begin(list(prompt_ids))
            planner.begin(accept is not None)
        context = list(prompt_ids)
        out: list[int] = []
        while len(out) < budget:
            remaining = budget - len(out)
            pending = context[-1]
            tree, cands, drafted = build_tree(pending, []), None, False
            # The bonus token is always emitted, so drafts longer than remaining-1 are waste.
            if drafter is not None and remaining > 1 and planner.should_draft():
                t0 = time.perf_counter()
                q = None if query is None else query.float().cpu().numpy()
                keys = torch.cat(fresh_keys).float().cpu().numpy() if fresh_keys else None
                fresh_keys.clear()
                cands = drafter.propose(DraftRequest(context, remaining - 1, q, keys))
                if self.spec.verify == "tree":
                    tree = planner.plan(build_tree(pending, cands.paths, None, cands.weights, cands.sources, cands.total))
                drafted = True
                retrieval = time.perf_counter() - t0
                metrics.retrieval_s += retrieval
            t0 = time.perf_counter()
            if self.spec.verify == "batch" and cands is not None and cands.paths:
                step = verify_batch(self.model, cache, pending, cands.paths)
            else:
                step = verify_token_tree(self.model, cache, tree, accept)
            _sync(device)
            verify_s = time.perf_counter() - t0
            metrics.model_s += verify_s
            if drafter is not None and self.spec.verify == "tree":
                planner.observe_step(len(tree), verify_s)
            if drafted:
                planner.record(tree, step.path, True, retrieval)
            new = step.new_tokens[:remaining]
            if self.eos_id in new:
                new = new[: new.index(self.eos_id) + 1]
            metrics.record_step(step.accepted, step.drafted, step.verified, step.offered_depth, len(new))
            if drafter is not None:
                planner.emitted(new)
            out.extend(new)
            context.extend(new)
            if (on_tokens is not None and on_tokens(new)) or out[-1] == self.eos_id:
                break
            query = step.query
            if drafter is not None:
                fresh_keys.append(step.keys)
        if drafter is not None:
            drafter.end(out)
        metrics.wall_s = time.perf_counter() - start
        return Generation(token_ids=out, metrics=metrics)
