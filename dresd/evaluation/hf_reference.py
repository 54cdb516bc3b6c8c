"""Hugging Face `generate()` as an external reference, timed like our own loop.

Plain greedy and HF's prompt lookup (`prompt_lookup_num_tokens`) run on the same loaded
model; tokens/s counts new tokens over the whole call, prefill included, as
DecodeMetrics.wall_s does for our loop.
"""

from __future__ import annotations

import time

import torch

from dresd.decoding.loop import Generation
from dresd.decoding.metrics import DecodeMetrics


@torch.inference_mode()
def hf_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int,
                prompt_lookup_num_tokens: int | None = None) -> Generation:
    """Greedy `model.generate` (optionally with prompt lookup); target calls are not observable."""
    ids = torch.tensor([prompt_ids], device=model.device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id,
                  attention_mask=torch.ones_like(ids))
    if prompt_lookup_num_tokens:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    # The model's own generation_config may carry sampling defaults: greedy must be explicit.
    kwargs.update(temperature=None, top_p=None, top_k=None)
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    wall = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    if eos_id in new:
        new = new[: new.index(eos_id) + 1]
    return Generation(token_ids=new, metrics=DecodeMetrics(new_tokens=len(new), wall_s=wall))
