"""Fit first: the compressor from a sample embedded before the stream; the index after it.

The count pass gives every record's key count, so the fit sample is chosen before anything
is embedded, deterministically (index.seed), and holds min(index.sample_size, keys) keys:
the size the reservoir took before.

- fit "sample" (the default): the keys of whole records in a seeded random order, so only
  about sample_size tokens are embedded for the fit;
- fit "all": keys drawn uniformly from the whole corpus (what the streaming reservoir over
  every embedded key drew), which embeds every record once more; for measuring against.

The fit pass (passes.py) returns just those keys' states; the driver fits z-score + PCA + L2
on them and saves the compressor, which the streaming pass applies in the embedding actors. A
record of the fit (`fit-<key>.json`) lets a rerun of the same build skip the fit pass. When
the sample is every key (a corpus of at most sample_size keys), its states go on to the
streaming pass, which compresses them instead of embedding the corpus a second time.

The index is trained after the stream, on min(index.sample_size, keys) of the stored
compressed keys drawn uniformly (`train_on_keys`): no embedding is needed for it, and its
partitions follow the whole corpus. Trained on the compressed keys of whole records instead,
they follow those few records, and recall@50 against exact search falls by about 0.02, where
the compressor fitted on them loses nothing measurable (docs/index-layout.md#fit-first).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from dresd.config import BuildConfig
from dresd.datastore.compression import Compressor, fit_compressor, reconstruction_error
from dresd.datastore.index import IndexParams, train_index
from pipelines.merge import save_compressor_codec, save_trained
from pipelines.scratch import Scratch
from pipelines.shards import shard_keys


@dataclass
class FitRecord:
    """What the fit made and from what: the manifest and the build report quote it."""

    ctag: str  # the compressor's fingerprint (merge.py)
    mode: str  # BuildConfig.fit
    sample_keys: int
    sample_records: int  # records the fit pass embedded (some or all of their keys sampled)
    sample_tokens: int  # tokens those records hold: the fit's embedding cost
    explained_variance: float
    sample_reconstruction_error: float  # the baseline that update drift is judged by


def select_sample(record_keys: dict[str, np.ndarray], size: int, mode: str, seed: int) -> dict[str, np.ndarray]:
    """The sampled keys, as shard id -> sorted key numbers within the shard (shards in order)."""
    shard_ids = sorted(record_keys)
    counts = [record_keys[s] for s in shard_ids]
    per_record = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    n_keys = int(per_record.sum())
    size = min(size, n_keys)
    rng = np.random.default_rng(seed)
    if mode == "all":
        picked = np.sort(rng.choice(n_keys, size=size, replace=False))
    else:
        order = rng.permutation(len(per_record))
        enough = int(np.searchsorted(np.cumsum(per_record[order]), size)) + 1
        records = np.sort(order[:enough])
        record_start = np.concatenate([[0], np.cumsum(per_record)[:-1]])
        pool = np.concatenate([np.arange(record_start[r], record_start[r] + per_record[r]) for r in records]
                              or [np.zeros(0, np.int64)])
        picked = np.sort(rng.choice(pool, size=size, replace=False))
    return _by_shard(picked, [int(c.sum()) for c in counts], shard_ids)


def shards_per_call(record_keys: dict[str, np.ndarray], sampled_records: int) -> int:
    """Shards an actor call of the fit pass takes, so that a call embeds about a shard's worth of
    records, as a streaming call does: sorted by length over a shard's few sampled records
    alone, the mini-batches pad several times more tokens (docs/index-layout.md#fit-first)."""
    total = sum(len(c) for c in record_keys.values())
    return max(1, min(len(record_keys), round(total / max(1, sampled_records))))


def _by_shard(picked: np.ndarray, key_counts: list[int], shard_ids: list[str]) -> dict[str, np.ndarray]:
    """Sorted global key numbers as shard id -> key numbers within the shard."""
    shard_start = np.concatenate([[0], np.cumsum(key_counts)])
    out = {}
    for i, sid in enumerate(shard_ids):
        lo, hi = np.searchsorted(picked, [shard_start[i], shard_start[i + 1]])
        if hi > lo:
            out[sid] = (picked[lo:hi] - shard_start[i]).astype(np.int64)
    return out


def _embedded(record_keys: dict[str, np.ndarray], tokens_per_record: dict[str, np.ndarray],
              select: dict[str, np.ndarray]) -> tuple[int, int]:
    """(records, tokens) the fit pass embeds for `select`: every record holding a picked key."""
    records = tokens = 0
    for sid, keep in select.items():
        hit = np.unique(np.searchsorted(np.cumsum(record_keys[sid]), keep, side="right"))
        records += len(hit)
        tokens += int(tokens_per_record[sid][hit].sum())
    return records, tokens


def fit_key(cfg: BuildConfig) -> str:
    """Names a fit: the same corpus (the work folder), compression settings and mode give the same compressor."""
    ix = cfg.index
    blob = json.dumps([ix.dim, ix.sample_size, ix.seed, cfg.fit], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit_compressor_first(cfg: BuildConfig, work: Scratch, record_keys: dict[str, np.ndarray],
                         tokens_per_record: dict[str, np.ndarray], embed_sample) -> tuple[FitRecord, dict | None]:
    """The compressor of this build: read back from an earlier run's record, or fitted now on
    the states `embed_sample(select, shards per call)` returns for the selected keys (passes.fit_pass, by shard).
    Also returns those states by shard when they are every key of the corpus (the stream pass
    then compresses them instead of embedding the corpus again), else None."""
    name = f"fit-{fit_key(cfg)}.json"
    if work.exists(name):
        record = FitRecord(**json.loads(work.pull(name).read_text()))
        if work.exists(f"compressor-{record.ctag}.npz"):
            return record, None
    select = select_sample(record_keys, cfg.index.sample_size, cfg.fit, cfg.index.seed)
    records, tokens = _embedded(record_keys, tokens_per_record, select)
    held = embed_sample(select, shards_per_call(record_keys, records))
    sample = [h.states for h in held.values()]  # by shard: fitted a chunk at a time, never concatenated
    n_sample = sum(len(s) for s in sample)
    if n_sample < sum(int(c.sum()) for c in record_keys.values()):
        held = None  # a sample of the corpus: the stream pass embeds every shard
    comp = fit_compressor(sample, cfg.index.dim)
    record = FitRecord(ctag=save_compressor_codec(work, comp), mode=cfg.fit, sample_keys=n_sample,
                       sample_records=records, sample_tokens=tokens,
                       explained_variance=float(comp.explained_variance_ratio.sum()),
                       sample_reconstruction_error=reconstruction_error(comp, sample))
    (work.path / name).write_text(json.dumps(asdict(record)))
    work.push(name)
    return record, held


def train_on_keys(cfg: BuildConfig, work: Scratch, params: IndexParams, comp: Compressor, ctag: str,
                  key_counts: dict[str, int]) -> str:
    """The index trained on min(index.sample_size, keys) stored keys drawn uniformly (seeded),
    saved in the work folder; returns the codec's tag. Deterministic: a rerun finds the same tag."""
    if params.kind == "flat":  # nothing to train
        return save_trained(work, comp, train_index(params, np.zeros((0, params.dim), np.float32)))
    shard_ids = sorted(key_counts)
    counts = [key_counts[s] for s in shard_ids]
    n_keys = sum(counts)
    picked = np.sort(np.random.default_rng(cfg.index.seed).choice(n_keys, min(cfg.index.sample_size, n_keys),
                                                                   replace=False))
    parts = [np.asarray(shard_keys(work, sid, ctag)[rows], np.float32) for sid, rows in
             _by_shard(picked, counts, shard_ids).items()]
    trained = train_index(params, np.concatenate(parts), seed=cfg.index.seed)
    return save_trained(work, comp, trained)
