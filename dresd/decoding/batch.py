"""Batched plain decoding: several sequences per forward, for offline throughput.

Prompts are left-padded to one width, so every row's last prompt token sits in the last
column. Position ids come from the attention mask (a row's first real token is position 0),
so a padded row computes what it would alone. On a GPU one batched prefill gives each row's
first-token logits in that column; on a CPU, where a padded position costs as much
arithmetic as a real one, each prompt is prefilled on its own and the rows' keys and values
are laid into one left-padded cache (timings: docs/cpu-fast-path.md#batched-prefill). Then
one-token decode steps run over the shared KV cache. A row stops at EOS or at its token
budget; a finished row keeps being fed a pad token (its outputs are frozen, its slot
wasted) until every row is done.

Greedy (temperature 0) matches `SpeculativeDecoder` with method "greedy" token for token,
up to fp32 near-ties (batched matmuls round differently from single-row ones). Sampling
draws from a `torch.Generator` seeded per call: the same call with the same seed gives the
same tokens; the draws of a row depend on the batch it is in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dresd.config import SamplingParams
from dresd.decoding.acceptance import target_probs
from dresd.decoding.kv_cache import GrowingCache, cached_forward
from dresd.model.loading import LoadedModel


@dataclass
class BatchStats:
    """Where one `generate_batch` call spent its time (filled when a stats object is passed)."""

    rows: int = 0  # sequences in the batch
    width: int = 0  # padded prompt width (longest prompt)
    prompt_tokens: int = 0  # real prompt tokens (the rest of rows * width is padding)
    new_tokens: int = 0  # tokens generated over all rows (EOS included)
    steps: int = 0  # decode forwards after the prefill
    slot_steps: int = 0  # rows * steps: row-steps run, finished rows included
    prefill_s: float = 0.0
    decode_s: float = 0.0
    per_row_new: list[int] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return self.prefill_s + self.decode_s


# Devices where one padded batched prefill beats a prefill per prompt (parallel hardware with
# spare arithmetic); elsewhere every padded position is paid for.
PADDED_PREFILL_DEVICES = ("cuda",)


def _pad_id(lm: LoadedModel) -> int:
    pad = lm.tokenizer.pad_token_id
    return int(pad) if pad is not None else lm.eos_token_id


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens: argmax, or a draw from `target_probs` (temperature / top-p)."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    probs = target_probs(logits, temperature, top_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def _prefill_rows(model, prompt_ids: list[list[int]], width: int, device) -> tuple[torch.Tensor, GrowingCache]:
    """Each prompt's forward alone (no padded position computed), then one cache left-padded to
    `width`: the last-position logits (B, V) and the cache. Padded entries are zeros, masked out."""
    logits, caches = [], []
    for p in prompt_ids:
        ids = torch.tensor([p], dtype=torch.long, device=device)
        caches.append(GrowingCache())
        logits.append(_forward_last(model, ids, torch.ones_like(ids), torch.arange(len(p), device=device)[None],
                                    caches[-1]))
    cache = GrowingCache()
    for layer in range(len(caches[0].layers)):
        k0, v0 = caches[0].layers[layer].keys, caches[0].layers[layer].values
        keys = k0.new_zeros(len(prompt_ids), k0.shape[1], width, k0.shape[3])
        values = v0.new_zeros(len(prompt_ids), v0.shape[1], width, v0.shape[3])
        for r, (p, c) in enumerate(zip(prompt_ids, caches)):
            keys[r, :, width - len(p):] = c.layers[layer].keys[0]
            values[r, :, width - len(p):] = c.layers[layer].values[0]
        cache.update(keys, values, layer)
    return torch.cat(logits), cache


@torch.inference_mode()
def _forward_last(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                  cache: GrowingCache) -> torch.Tensor:
    """Run the model over `ids` with the cache; logits (B, V) of the last column only.

    The LM head runs on one position per row: projecting a whole prefill onto a 49k
    vocabulary would cost more than the layers for small models.
    """
    out = cached_forward(model.base_model, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
    return model.get_output_embeddings()(out.last_hidden_state[:, -1])


def generate_batch(lm: LoadedModel, prompt_ids: list[list[int]], max_new_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   stats: BatchStats | None = None) -> list[list[int]]:
    """Generate after every prompt in one batch; returns each row's new tokens.

    A row's output ends with EOS when it stopped on it, and holds at most
    min(max_new_tokens, model context - prompt length) tokens. Greedy when
    temperature == 0, else temperature / top-p sampling seeded by `seed`.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    SamplingParams(temperature, top_p, seed)  # checks the values
    rows = len(prompt_ids)
    if rows == 0:
        return []
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: at least one token is needed")
        if len(p) >= lm.max_context:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context is {lm.max_context}")
    model, device, eos, pad = lm.model, lm.device, lm.eos_token_id, _pad_id(lm)
    budgets = [min(max_new_tokens, lm.max_context - len(p)) for p in prompt_ids]
    outputs: list[list[int]] = [[] for _ in range(rows)]
    st = stats if stats is not None else BatchStats()
    st.rows, st.width = rows, max(len(p) for p in prompt_ids)
    st.prompt_tokens = sum(len(p) for p in prompt_ids)
    if max(budgets) == 0:
        st.per_row_new = [0] * rows
        return outputs

    width = st.width
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, p in enumerate(prompt_ids):
        mask[r, width - len(p):] = 1
    mask = mask.to(device)
    next_pos = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long, device=device)[:, None]
    generator = None
    if temperature > 0:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))

    t0 = time.perf_counter()
    if device.type in PADDED_PREFILL_DEVICES:
        ids = torch.full((rows, width), pad, dtype=torch.long, device=device)
        for r, p in enumerate(prompt_ids):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        cache = GrowingCache()
        logits = _forward_last(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
    else:
        logits, cache = _prefill_rows(model, prompt_ids, width, device)
    active = [b > 0 for b in budgets]
    ones = torch.ones((rows, 1), dtype=torch.long, device=device)
    prefill_done = False
    while True:
        tokens = _next_tokens(logits, temperature, top_p, generator).tolist()
        if not prefill_done:
            st.prefill_s, prefill_done, t1 = time.perf_counter() - t0, True, time.perf_counter()
        feed = []
        for r in range(rows):
            if active[r]:
                outputs[r].append(int(tokens[r]))
                if tokens[r] == eos or len(outputs[r]) >= budgets[r]:
                    active[r] = False
            feed.append(outputs[r][-1] if active[r] else pad)
        if not any(active):
            break
        mask = torch.cat([mask, ones], dim=1)
        logits = _forward_last(model, torch.tensor(feed, dtype=torch.long, device=device)[:, None],
                               mask, next_pos, cache)
        next_pos = (next_pos + 1).clamp(max=lm.max_context - 1)  # finished rows only
        st.steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    st.decode_s = time.perf_counter() - t1
    st.slot_steps = rows * st.steps
    st.per_row_new = [len(o) for o in outputs]
    st.new_tokens = sum(st.per_row_new)
    return outputs
