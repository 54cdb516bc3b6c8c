"""Written and coded work shards without a model or Ray, for tests/pipelines/test_encode.py
and test_merge.py: random states, a codec fitted on them, and every shard run through the
write stage and the code pass (pipelines/encode.py) as a build would run them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dresd.config import IndexConfig
from dresd.datastore.compression import compress, fit_compressor
from dresd.datastore.index import choose_index_params, train_index
from pipelines.encode import code_shards, write_shards
from pipelines.merge import save_compressor_codec, save_trained
from pipelines.rows import add_columns, blob, shard_table
from pipelines.scratch import Scratch
from pipelines.shards import first_key_ids

HIDDEN = 64
# 350 keys: enough to train the on-disk layout's 8-bit PQ (256 centroids).
SIZES = {"00000-000000": 200, "00000-000001": 0, "00001-000000": 150}  # an all-rejected shard holds no keys


def random_states() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {sid: (rng.normal(size=(n, HIDDEN)) * np.linspace(0.2, 3, HIDDEN)).astype(np.float32) for sid, n in SIZES.items()}


def make_codec(work: Scratch, hidden: dict, cfg: IndexConfig):
    """(compressor, index params, ctag, tag): both parts fitted on every state and saved."""
    sample = np.concatenate(list(hidden.values()))
    comp = fit_compressor(sample, cfg.dim)
    params = choose_index_params(len(sample), cfg)
    ctag = save_compressor_codec(work, comp)
    return comp, params, ctag, save_trained(work, comp, train_index(params, compress(comp, sample)))


def encoded_row(sid: str, keys: np.ndarray) -> pa.Table:
    """The embed stage's output row for one shard: one record holding every key."""
    n = len(keys)
    table = shard_table(sid, "a.jsonl", [np.arange(n + 1, dtype=np.int32)] if n else [], [0] if n else [],
                        ["s"] if n else [], 1, [] if n else ["empty_text"], [])
    return add_columns(table, {"keys": pa.array([blob(keys, np.float16)], type=pa.large_binary()),
                               "n_keys": pa.array([n], pa.int64()), "key_dim": pa.array([keys.shape[1]], pa.int32()),
                               "node": ["node-a"], "dtype": ["float32"], "recon_error_sum": [0.5]})


def write_all(work: Scratch, hidden: dict, comp, ctag: str, base: int = 0) -> dict[str, int]:
    """Every shard through the write stage; returns the first key ids."""
    firsts = first_key_ids(SIZES, sorted(SIZES), base)
    plan = {s: (firsts[s], SIZES[s]) for s in SIZES}
    for sid in sorted(SIZES):
        out = write_shards(encoded_row(sid, compress(comp, hidden[sid])), work.location, ctag, plan)
        assert out.to_pylist() == [{"shard": sid, "keys": SIZES[sid]}]
    return firsts


def code_all(work: Scratch, ctag: str, tag: str, firsts: dict[str, int]) -> None:
    """Every shard through the code pass, one call each as its tasks run."""
    for sid in sorted(firsts):
        out = code_shards(pa.table({"shard": [sid], "first": [firsts[sid]]}), work.location, ctag, tag)
        assert out.column("shard").to_pylist() == [sid]
