"""A lean decoder forward for CPU decode steps: the Llama forward without HF's layers of Python.

A decode step multiplies a few rows by every weight; with the packed kernel making that cheap
(dresd.model.fastpath.cpu_linear), a large share of a one-token step goes to what surrounds it in HF's
forward: module calls, keyword plumbing and mask building in every layer. HF's attention also
copies every layer's cached keys and values per step whenever more than one position is
verified (`repeat_kv` for grouped-query attention under a mask), so a tree of drafts pays for
the whole cache three times over.

This runs the same computation, op for op where it matters (RMSNorm in float32, rotary
embeddings from the model's own rotary module, the model's activation), as plain calls,
and lets SDPA read the grouped key/value heads in place (`enable_gqa`) under a boolean mask.
On the packaged model its outputs equal HF's bit for bit (checked for a prefill, one
position, a chain and a tree; tests/model/fastpath/test_lean_forward.py). What it saves per
step: docs/cpu-fast-path.md#lean-forward-and-in-place-kv-cache.

It applies to models the CPU fast path converted (dresd.model.fastpath.cpu_linear) of the families listed
in MODEL_TYPES with SDPA attention and no sliding-window layers; everything else keeps HF's
forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dresd.model.fastpath.cpu_linear import DualLayoutLinear

# Families whose decoder layer is Llama's: pre-norm RMSNorm, rotary q/k, GQA attention, gated
# MLP (Qwen2 adds q/k/v biases, which its linears carry); sliding-window layers are not.
MODEL_TYPES = ("llama", "qwen2")


def applies(model) -> bool:
    """Whether `decoder_forward` serves this model (a converted Llama-family model on SDPA,
    every layer attending to the whole context)."""
    config = model.config
    if config.model_type not in MODEL_TYPES or getattr(config, "_attn_implementation", "sdpa") != "sdpa":
        return False
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    return bool(layers) and isinstance(layers[0].self_attn.q_proj, DualLayoutLinear)


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm's ops in its order: the same bits.
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x32 * torch.rsqrt(variance + norm.variance_epsilon)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attention_mask(attention_mask: torch.Tensor | None, past: int, n: int, device) -> tuple[torch.Tensor | None, bool]:
    """(boolean mask with True = may attend, or None; is_causal) for SDPA."""
    if attention_mask is not None:
        return (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0), False
    if n == 1:
        return None, False  # one new position attends to everything cached
    if past == 0:
        return None, True  # a prefill: SDPA's causal kernel skips the masked blocks
    # New positions in order after a cache: causal over the cache plus themselves.
    return torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past), False


@torch.inference_mode()
def decoder_forward(model, input_ids: torch.Tensor, cache, position_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last-layer hidden states (after the final norm) for `input_ids` (B, n),
    appending their keys and values to `cache`. `attention_mask` is None (causal) or a 4-D
    mask over cache + new positions, additive (0 = attend) or boolean (True = attend)."""
    decoder = model.model
    n = input_ids.shape[1]
    past = cache.get_seq_length()
    x = decoder.embed_tokens(input_ids)
    if position_ids is None:
        position_ids = torch.arange(past, past + n, device=x.device)[None]
    cos, sin = decoder.rotary_emb(x, position_ids)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    mask, causal = _attention_mask(attention_mask, past, n, x.device)
    for index, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        shape = (*input_ids.shape, -1, attn.head_dim)
        h = _rms_norm(layer.input_layernorm, x)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        k, v = cache.update(_rotate(k, cos, sin), v, index)
        o = F.scaled_dot_product_attention(_rotate(q, cos, sin), k, v, attn_mask=mask, is_causal=causal,
                                           scale=attn.scaling, enable_gqa=True)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(*input_ids.shape, -1))
        h = _rms_norm(layer.post_attention_layernorm, x)
        x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
    return _rms_norm(decoder.norm, x)
