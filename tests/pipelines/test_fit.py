"""Fit first (pipelines/fit.py), no Ray: the sample is chosen from the count pass's key
counts before anything is embedded, deterministically; "sample" draws whole records until
the size is reached, "all" draws keys from the whole corpus; a rerun reads the fit back; the
index is trained on stored keys drawn uniformly."""

from __future__ import annotations

import numpy as np
import pytest

import pipelines.fit as fit_mod
from dresd.config import BuildConfig, IndexConfig
from dresd.datastore.index import IndexParams
from pipelines.embed import Held
from pipelines.fit import fit_compressor_first, select_sample, shards_per_call
from pipelines.merge import load_compressor_codec
from pipelines.scratch import Scratch
from pipelines.shards import ShardData, write_shard

RNG = np.random.default_rng(0)
# 6 shards of 20 records, 5-40 keys each: 120 records.
RECORD_KEYS = {f"00000-{c:06d}": RNG.integers(5, 40, size=20) for c in range(6)}
N_KEYS = int(sum(k.sum() for k in RECORD_KEYS.values()))


def _records_hit(select: dict) -> int:
    hit = 0
    for sid, keep in select.items():
        hit += len(np.unique(np.searchsorted(np.cumsum(RECORD_KEYS[sid]), keep, side="right")))
    return hit


@pytest.mark.parametrize("mode", ["sample", "all"])
def test_the_selection_has_the_size_asked_for_and_is_the_same_every_time(mode):
    select = select_sample(RECORD_KEYS, 500, mode, seed=3)
    assert sum(len(k) for k in select.values()) == 500 and list(select) == sorted(select)
    for sid, keep in select.items():
        assert np.all(np.diff(keep) > 0) and 0 <= keep.min() and keep.max() < RECORD_KEYS[sid].sum()
    again = select_sample(RECORD_KEYS, 500, mode, seed=3)
    assert select.keys() == again.keys() and all(np.array_equal(select[s], again[s]) for s in select)
    other = select_sample(RECORD_KEYS, 500, mode, seed=4)
    assert any(not np.array_equal(select.get(s, []), other.get(s, [])) for s in RECORD_KEYS)


def test_sample_mode_embeds_few_records_and_all_mode_touches_nearly_every_one():
    few, spread = select_sample(RECORD_KEYS, 500, "sample", 0), select_sample(RECORD_KEYS, 500, "all", 0)
    # Whole records until 500 keys: about 500 / 22 records; keys drawn from all 2,700 touch most records.
    assert _records_hit(few) <= 500 // 5 + 1 < _records_hit(spread)
    assert _records_hit(spread) > 100


def test_a_corpus_smaller_than_the_sample_gives_every_key():
    for mode in ("sample", "all"):
        select = select_sample(RECORD_KEYS, 10**6, mode, 0)
        assert sum(len(k) for k in select.values()) == N_KEYS


def _fake_embed(asked: list):
    def embed(select, per_call):
        assert 1 <= per_call <= len(select)
        asked.append(select)
        rng = np.random.default_rng(len(asked))
        return {s: Held(rng.normal(size=(len(k), 32)).astype(np.float32), "node", "float32")
                for s, k in sorted(select.items())}
    return embed


def test_the_fit_is_saved_and_a_rerun_reads_it_back_without_embedding(tmp_path):
    work = Scratch(str(tmp_path))
    cfg = BuildConfig(index=IndexConfig(dim=8, sample_size=300, seed=1))
    tokens = {s: k + 12 for s, k in RECORD_KEYS.items()}
    asked = []
    embed = _fake_embed(asked)
    first, held = fit_compressor_first(cfg, work, RECORD_KEYS, tokens, embed)
    assert len(asked) == 1 and first.sample_keys == 300 and first.mode == "sample"
    assert held is None  # a sample of the corpus: the stream pass embeds it all
    assert first.sample_records == _records_hit(asked[0])
    assert load_compressor_codec(work, first.ctag).out_dim == 8
    again, held = fit_compressor_first(cfg, work, RECORD_KEYS, tokens, embed)
    assert again == first and held is None and len(asked) == 1  # read back: nothing embedded a second time
    cfg.fit = "all"  # another fit is another record
    assert fit_compressor_first(cfg, work, RECORD_KEYS, tokens, embed)[0].mode == "all" and len(asked) == 2


def test_a_sample_of_every_key_is_handed_on_to_the_stream_pass(tmp_path):
    cfg = BuildConfig(index=IndexConfig(dim=8, sample_size=N_KEYS, seed=1))
    tokens = {s: k + 12 for s, k in RECORD_KEYS.items()}
    asked = []
    record, held = fit_compressor_first(cfg, Scratch(str(tmp_path)), RECORD_KEYS, tokens, _fake_embed(asked))
    assert record.sample_keys == N_KEYS and list(held) == sorted(RECORD_KEYS)
    assert all(len(held[s].states) == RECORD_KEYS[s].sum() for s in RECORD_KEYS)


def test_the_index_trains_on_stored_keys_drawn_uniformly(tmp_path, monkeypatch):
    work = Scratch(str(tmp_path))
    counts = {"00000-000000": 50, "00000-000001": 0, "00001-000000": 70}
    rng = np.random.default_rng(0)
    for sid, n in counts.items():  # key i of the corpus is the vector [i, i, ...]
        start = sum(v for s, v in counts.items() if s < sid)
        keys = np.repeat(np.arange(start, start + n, dtype=np.float32)[:, None], 4, axis=1)
        write_shard(work.path / "shards" / sid, ShardData(np.zeros(n + 1, np.int32), np.array([0, n + 1]),
                                                          np.zeros(1, np.int32), keys, ["s"]), {"keys": n}, "c")
    seen = []
    monkeypatch.setattr(fit_mod, "train_index", lambda params, sample, seed: seen.append(sample) or rng)
    monkeypatch.setattr(fit_mod, "save_trained", lambda work, comp, trained: "tag")
    cfg = BuildConfig(index=IndexConfig(dim=4, sample_size=40, seed=3))
    params = IndexParams("ivfpq", 4, 2, 1, 2, True, 1.0)
    assert fit_mod.train_on_keys(cfg, work, params, None, "c", counts) == "tag"
    ids = seen[0][:, 0].astype(int)
    assert len(ids) == len(set(ids)) == 40 and ids.min() >= 0 and ids.max() < 120  # distinct keys of every shard
    assert (ids < 50).any() and (ids >= 50).any()
    fit_mod.train_on_keys(cfg, work, params, None, "c", counts)
    np.testing.assert_array_equal(seen[1], seen[0])  # the same draw every time


def test_a_fit_call_takes_enough_shards_to_hold_about_a_shard_of_sampled_records():
    keys = {f"s{i}": np.ones(100, np.int64) for i in range(40)}
    assert shards_per_call(keys, 4000) == 1  # every record sampled: one shard a call, as the stream
    assert shards_per_call(keys, 800) == 5
    assert shards_per_call(keys, 1) == 40  # never more than there are shards
