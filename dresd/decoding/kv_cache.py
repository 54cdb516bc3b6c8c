"""A KV cache that grows in place: the decode loop's cache without a copy per step.

transformers' DynamicLayer appends each step's keys and values with torch.cat, which copies
the layer's whole cache at every step, a cost that grows with the context (measured in
docs/cpu-fast-path.md#lean-forward-and-in-place-kv-cache). Here each layer keeps a buffer
with spare room (the capacity doubles when it runs out): a step writes its new entries in
place and the layer's keys and values are views of the filled part, so a crop copies
nothing and a cut to an accepted tree path copies only the moved entries.
"""

from __future__ import annotations

import functools
import inspect

import torch
import transformers
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Smallest buffer (entries per head); trades idle memory against regrow copies: most prompts and answers fit.
MIN_CAPACITY = 256


class GrowingLayer(DynamicLayer):
    """One layer's keys and values in a buffer with spare room; `keys`/`values` view the filled part.

    Anything that replaces `keys`/`values` with tensors of its own (DynamicLayer's batch
    repeat/select, beam reordering) is adopted as the filled part at the next update.
    """

    _key_buf: torch.Tensor | None = None
    _value_buf: torch.Tensor | None = None
    # Whether spare room starts as zeros: a batch whose rows attend to different lengths keeps
    # masked entries in the view, and attention multiplies them by zero, which a NaN left in
    # uninitialised memory would survive.
    _zero_room = False

    def _owns_keys(self) -> bool:
        return (self._key_buf is not None and self.keys.numel() > 0
                and self.keys.untyped_storage().data_ptr() == self._key_buf.untyped_storage().data_ptr())

    def _view(self, length: int) -> None:
        self.keys = self._key_buf[..., :length, :]
        self.values = self._value_buf[..., :length, :]

    def _room_for(self, end: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        """Make the buffers own the filled part and hold `end` entries (adopting replaced tensors)."""
        owned = self._owns_keys()
        if owned and self._key_buf.shape[-2] >= end:
            return
        start = self.get_seq_length()
        capacity = max(MIN_CAPACITY, end, 2 * self._key_buf.shape[-2] if owned else 0)
        alloc_k, alloc_v = (like_k.new_zeros, like_v.new_zeros) if self._zero_room else (like_k.new_empty, like_v.new_empty)
        k_buf = alloc_k(*like_k.shape[:-2], capacity, like_k.shape[-1])
        v_buf = alloc_v(*like_v.shape[:-2], capacity, like_v.shape[-1])
        if start:
            k_buf[..., :start, :].copy_(self.keys)
            v_buf[..., :start, :].copy_(self.values)
        self._key_buf, self._value_buf = k_buf, v_buf
        self._view(start)

    @torch.inference_mode()  # the buffers are inference tensors: in-place writes must be too
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new entries after the filled part; returns the filled keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        self._room_for(end, key_states, value_states)
        self._key_buf[..., start:end, :].copy_(key_states)
        self._value_buf[..., start:end, :].copy_(value_states)
        self._view(end)
        return self.keys, self.values

    @torch.inference_mode()
    def keep(self, prefix_len: int, kept: torch.Tensor) -> None:
        """Keep the first `prefix_len` entries, then entries prefix_len + kept[i], in that order."""
        self._room_for(self.get_seq_length(), self.keys, self.values)
        moved_k = self.keys[..., prefix_len + kept, :]  # the gather copies: safe to write back
        moved_v = self.values[..., prefix_len + kept, :]
        end = prefix_len + len(kept)
        self._key_buf[..., prefix_len:end, :].copy_(moved_k)
        self._value_buf[..., prefix_len:end, :].copy_(moved_v)
        self._view(end)


class GrowingCache(DynamicCache):
    """The decode loops' KV cache: a DynamicCache whose layers grow in place (GrowingLayer)."""

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer


@functools.cache
def _cache_argument(forward) -> str:
    """The name a model's forward takes its KV cache under: transformers 5.2x calls it
    `cache`, earlier 5.x releases `past_key_values` (and swallow an unknown keyword)."""
    params = inspect.signature(forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{forward.__qualname__} takes no KV cache argument (cache / past_key_values)")


def cached_forward(decoder, cache: DynamicCache, **inputs):
    """`decoder(**inputs)` (a transformers base model) appending its keys and values to `cache`.

    Raises when the cache did not grow by the new positions: a forward that ignored the
    cache would attend to nothing before them, and every method, plain greedy included,
    would decode the same wrong text without any check noticing.
    """
    before, writes = cache.get_seq_length(), getattr(cache, "writes", None)
    out = decoder(**inputs, use_cache=True, **{_cache_argument(type(decoder).forward): cache})
    grown, new = cache.get_seq_length() - before, inputs["input_ids"].shape[1]
    # A row cache writes each row's entries at columns of its own (dresd.decoding.row_cache):
    # its view need not grow by the new positions, but the forward must have written.
    if (cache.writes == writes) if writes is not None else grown != new:
        raise RuntimeError(f"{type(decoder).__name__}'s forward put {grown} of {new} new positions in the KV cache "
                           f"(transformers {transformers.__version__}): decoding would be wrong")
    return out
