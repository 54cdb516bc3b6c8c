"""Tests for dresd.decoding.kv_cache: the in-place cache holds what transformers' DynamicCache holds
through updates, crops, tree cuts and batch reshuffles, without copying itself per step."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from dresd.decoding.kv_cache import MIN_CAPACITY, GrowingCache
from dresd.decoding.verify import keep_cache_positions


def entries(batch: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, n, 4, generator=g), torch.randn(batch, 2, n, 4, generator=g)


def assert_same(got: DynamicCache, want: DynamicCache) -> None:
    assert got.get_seq_length() == want.get_seq_length()
    for a, b in zip(got.layers, want.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_matches_dynamic_cache_through_a_decode_like_sequence():
    got, want = GrowingCache(), DynamicCache()
    g = torch.Generator().manual_seed(0)
    seed = 0
    for step in range(60):
        n = 200 if step == 0 else int(torch.randint(1, 9, (1,), generator=g))
        for layer in range(3):
            seed += 1
            k, v = entries(1, n, seed)
            out_got = got.update(k, v, layer)
            out_want = want.update(k.clone(), v.clone(), layer)
            assert torch.equal(out_got[0], out_want[0]) and torch.equal(out_got[1], out_want[1])
        if step and step % 3 == 0:  # a tree step: keep some of the n new entries
            kept = sorted(torch.randperm(n, generator=g)[: max(1, n // 2)].tolist())
            prefix = got.get_seq_length() - n
            keep_cache_positions(got, prefix, kept)
            keep_cache_positions(want, prefix, kept)
        elif step % 3 == 1:  # a chain step: drop a rejected tail
            drop = int(torch.randint(0, n, (1,), generator=g))
            if drop:
                got.crop(-drop)
                want.crop(-drop)
        assert_same(got, want)
    assert got.get_seq_length() > MIN_CAPACITY  # the buffers regrew along the way


def test_a_step_writes_in_place_and_a_crop_copies_nothing():
    cache = GrowingCache()
    cache.update(*entries(1, 10, 1), 0)
    buf = cache.layers[0]._key_buf
    for seed in range(2, 20):
        keys, _ = cache.update(*entries(1, 1, seed), 0)
        assert keys.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    cache.crop(-5)
    assert cache.get_seq_length() == 23
    assert cache.layers[0].keys.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert buf.shape[-2] == MIN_CAPACITY


def test_batch_repeat_and_select_are_adopted():
    got, want = GrowingCache(), DynamicCache()
    k, v = entries(1, 12, 3)
    got.update(k, v, 0)
    want.update(k.clone(), v.clone(), 0)
    for cache in (got, want):
        cache.batch_repeat_interleave(3)
    k, v = entries(3, 4, 4)
    got.update(k, v, 0)
    want.update(k.clone(), v.clone(), 0)
    assert_same(got, want)
    index = torch.tensor([2])
    for cache in (got, want):
        cache.batch_select_indices(index)
        cache.crop(-1)
    k, v = entries(1, 2, 5)
    got.update(k, v, 0)
    want.update(k.clone(), v.clone(), 0)
    assert_same(got, want)
    keep_cache_positions(got, 14, [0, 2])
    keep_cache_positions(want, 14, [0, 2])
    assert_same(got, want)
    # A cut straight after a replacement adopts the layer first, then moves in place.
    for cache in (got, want):
        cache.batch_repeat_interleave(2)
    keep_cache_positions(got, 10, [1, 3])
    keep_cache_positions(want, 10, [1, 3])
    assert_same(got, want)
    assert all(layer._owns_keys() for layer in got.layers)


class _Decoder:
    """A stand-in base model: writes n positions per layer into the cache it is handed."""

    def __init__(self, writes: bool = True):
        self.writes = writes

    def run(self, input_ids, cache):
        if self.writes and cache is not None:
            cache.update(*entries(1, input_ids.shape[1], 0), 0)
        return input_ids


class _OldDecoder(_Decoder):  # transformers < 5.2x: the cache is `past_key_values`
    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        return self.run(input_ids, past_key_values)

    __call__ = forward


class _NewDecoder(_Decoder):  # transformers 5.2x: the cache is `cache`
    def forward(self, input_ids, cache=None, use_cache=None, **kwargs):
        return self.run(input_ids, cache)

    __call__ = forward


def test_cached_forward_hands_the_cache_over_under_either_name():
    from dresd.decoding.kv_cache import cached_forward

    ids = torch.zeros(1, 5, dtype=torch.long)
    for decoder in (_OldDecoder(), _NewDecoder()):
        cache = GrowingCache()
        cached_forward(decoder, cache, input_ids=ids)
        assert cache.get_seq_length() == 5


def test_cached_forward_refuses_a_forward_that_left_the_cache_alone():
    import pytest

    from dresd.decoding.kv_cache import cached_forward

    # What transformers 5.17 did with `cache=`: swallowed it, attended to nothing before
    # the new positions, and every method decoded the same wrong text.
    with pytest.raises(RuntimeError, match="0 of 3 new positions"):
        cached_forward(_NewDecoder(writes=False), GrowingCache(), input_ids=torch.zeros(1, 3, dtype=torch.long))
