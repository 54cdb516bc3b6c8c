"""The decoding loop: prefill, then draft -> verify -> accept until EOS or the token limit.

Plain greedy decoding runs through this same loop with no drafter, so speed and outputs
of the methods are compared on equal machinery. The query for the next draft is the
hidden state the verification forward already produced for the bonus token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from dresd.config import SpeculativeConfig
from dresd.drafters import Drafter
from dresd.metrics import DecodeMetrics
from dresd.verify import forward, verify_batch, verify_tree


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
    """Greedy decoding with optional drafts, verified as a tree or as a batch of rows."""

    def __init__(self, model, eos_id: int, max_context: int, spec: SpeculativeConfig, drafter: Drafter | None = None):
        if spec.method != "greedy" and drafter is None:
            raise ValueError(f"method {spec.method!r} needs a drafter (a datastore)")
        self.model = model
        self.eos_id = eos_id
        self.max_context = max_context
        self.spec = spec
        self.drafter = drafter if spec.method != "greedy" else None

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        """Generate up to `max_new_tokens` tokens after `prompt_ids` (greedy, lossless)."""
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context}")
        budget = min(max_new_tokens, self.max_context - len(prompt_ids))
        device = self.model.device
        metrics = DecodeMetrics()
        start = time.perf_counter()
        cache = DynamicCache()
        query = None
        if len(prompt_ids) > 1:
            hidden, _ = forward(self.model, torch.tensor([prompt_ids[:-1]], device=device), cache)
            query = hidden[0, -1]
        _sync(device)
        metrics.prefill_s = time.perf_counter() - start
        pending = prompt_ids[-1]
        out: list[int] = []
        while len(out) < budget:
            remaining = budget - len(out)
            drafts: list[list[int]] = []
            if self.drafter is not None and query is not None and remaining > 1:
                t0 = time.perf_counter()
                # The bonus token is always emitted, so drafts longer than remaining-1 are waste.
                drafts = self.drafter.propose(query.float().cpu().numpy(), pending, remaining - 1)
                metrics.retrieval_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            if self.spec.verify == "batch" and drafts:
                step = verify_batch(self.model, cache, pending, drafts)
            else:
                step = verify_tree(self.model, cache, pending, drafts)
            _sync(device)
            metrics.model_s += time.perf_counter() - t0
            new = step.new_tokens[:remaining]
            if self.eos_id in new:
                new = new[: new.index(self.eos_id) + 1]
            metrics.record_step(step.accepted, step.drafted, step.verified, step.offered_depth, len(new))
            out.extend(new)
            if out[-1] == self.eos_id:
                break
            pending, query = out[-1], step.query
        metrics.wall_s = time.perf_counter() - start
        return Generation(token_ids=out, metrics=metrics)

