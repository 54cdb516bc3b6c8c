"""Incremental datastore changes, each published as a new version whose manifest names its
parent: add new corpus shards (frozen compressor and quantizer, no retraining), delete
records by source id (tombstones), compact (drop tombstoned keys and records), and reindex
(the same keys in the index layout the config now chooses).

Adding streams the new corpus through the build's passes (count; read -> tokenize -> embed
-> compress -> write; code) with the parent's frozen codec: its compressor, and its index
emptied of keys for the code pass (no fit pass, no training), and appends the new keys to a
copy of the current index, so ids stay equal to key numbers. A drift report compares how well the frozen
compressor fits the new keys (their mean reconstruction error, summed by the embedding
actors) with how it fit its own sample.

Each change publishes with its parent as the expected CURRENT (dresd.datastore.publish.publish),
so two changes racing on one root never lose either. A delete, a compact or a reindex is a
pure function of its parent and cheap to make again, so one that loses the race is made again from the new
CURRENT; an add embedded its corpus against the old parent and fails with PublishConflict
instead (its written shards stay in the work folder, so running it again reuses them: only
their codes are made again, numbered from the new parent's key count, without embedding).

Every change first verifies its parent in full (`_parent`), so a damaged parent is never
copied into a child whose fresh checksums would then vouch for the damage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from dresd.config import BuildConfig, IndexConfig, to_dict
from dresd.datastore.integrity import verify_once
from dresd.datastore.store import Datastore, DatastoreError
from dresd.datastore.publish import DatastoreParts, PublishConflict, publish
from dresd.datastore.formatting import format_fingerprint
from dresd.datastore.index import (IndexParams, add_keys, empty_copy, intrinsic_check, plan_index, set_search_params,
                                  train_index)
from dresd.model.resolve import model_facts
from dresd.storage.faults import fault_point
from pipelines.build import check_default_ids
from pipelines.work import (assemble_stream, build_key, count_tally, encode_into, key_dtype, tally, tokenize_args,
                            usable_summary, work_folder)

log = logging.getLogger(__name__)

# Tries a delete or compact makes in all when other publishers keep moving CURRENT under it:
# each retry redoes the change on the new parent, so a few suffice unless the root is very busy.
PUBLISH_ATTEMPTS = 3

# New data whose PCA reconstruction error exceeds the fit sample's by this factor is
# reported as drifted: the frozen compressor loses noticeably more of it.
DRIFT_RATIO = 1.25


@dataclass
class UpdateReport:
    """What an update did."""

    version_dir: Path
    parent: str
    rows_read: int
    examples_added: int
    rejected: dict[str, int]
    keys_added: int
    drift: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    layout: str = ""  # the index layout kept, and the one the index settings choose for the new count when it differs

    def lines(self) -> list[str]:
        rej = sum(self.rejected.values())
        advice = "full rebuild advised" if self.drift.get("ratio", 0) > DRIFT_RATIO else "compressor still fits"
        return [
            f"datastore version: {self.version_dir} (parent {self.parent})",
            f"rows read {self.rows_read} = added {self.rows_read - rej} + rejected {rej} {self.rejected or ''}",
            f"keys added {self.keys_added}, examples added {self.examples_added}, {self.seconds:.1f}s",
            f"drift: reconstruction error {self.drift.get('new_error', 0):.4f} vs fit sample "
            f"{self.drift.get('base_error', 0):.4f} (ratio {self.drift.get('ratio', 0):.2f}): {advice}",
        ] + ([f"index layout: {self.layout}"] if self.layout else [])


def _parts_from(store: Datastore, **changes) -> DatastoreParts:
    """The current version's content as DatastoreParts, with some fields replaced."""
    base = dict(tokens=np.asarray(store.tokens), record_offsets=store.record_offsets,
                key_positions=np.asarray(store.key_positions), sources=store.sources,
                compressor=store.compressor, index=store.index, deleted=store.deleted)
    base.update(changes)
    return DatastoreParts(**base)


def _child_manifest(store: Datastore, change: dict) -> dict:
    """The parent's manifest minus per-version fields, plus the parent link and the change."""
    keep = {k: v for k, v in store.manifest.items()
            if k not in ("files", "version", "created_at", "format_version", "counts")}
    keep["counts"] = {k: v for k, v in store.manifest["counts"].items() if k not in ("records", "tokens", "keys")}
    keep.update(parent=store.version, change=change)
    return keep


def update_datastore(cfg: BuildConfig) -> UpdateReport:
    """Embed `cfg.corpus` with the model and append it to the CURRENT version of `cfg.output`."""
    t0 = time.perf_counter()
    root = cfg.output
    store = _parent(root)
    check_default_ids(cfg.corpus, store)
    # Identity and tokenizer only: the workers resolve the model's name on their own nodes.
    facts = model_facts(cfg.model.path)
    fmt = store.manifest["prompt_format"]["name"]
    store.check_compatible(facts.identity, format_fingerprint(facts.tokenizer, fmt))
    cfg.corpus.prompt_format = fmt  # the store's format, whatever the config said
    identity = facts.identity
    work = work_folder(cfg, "update-" + build_key(cfg, identity))
    # The parent's frozen compressor + its index emptied (training kept) encode the new shards;
    # the published index is read, never written: the new version gets its own copy.
    params = IndexParams(**store.manifest["index"]["params"])
    index, metas, shard_ids = encode_into(cfg, work, tokenize_args(cfg, facts, fmt), identity, store.compressor,
                                          empty_copy(store.index), params, base=store.index, base_keys=store.num_keys)
    if index is None:
        # A version with nothing added would only bury its parent under a copy of itself.
        raise DatastoreError(f"update add: corpus {cfg.corpus.paths}: no usable records, so nothing is published "
                             f"over version {store.version}: " + usable_summary(*count_tally(metas)))
    rows_read, rejected, _ = tally(metas)

    base_err = float(store.manifest["compressor"].get("sample_reconstruction_error", 0.0))
    new_err = sum(m.get("recon_error_sum", 0.0) for m in metas.values()) / sum(m["keys"] for m in metas.values())
    drift = {"base_error": base_err, "new_error": new_err, "ratio": new_err / base_err if base_err else 0.0}

    tokens, ends, key_pos, sources = assemble_stream(work, shard_ids, token_base=len(store.tokens))
    deleted = store.deleted
    if deleted is not None:
        deleted = np.concatenate([deleted, np.zeros(len(key_pos), dtype=bool)])
    parts = _parts_from(
        store,
        tokens=np.concatenate([np.asarray(store.tokens), *tokens]).astype(np.int64),
        record_offsets=np.concatenate([store.record_offsets, np.asarray(ends, dtype=np.int64)]),
        key_positions=np.concatenate([np.asarray(store.key_positions, dtype=np.int64), key_pos]),
        sources=store.sources + sources,
        index=index,
        deleted=deleted,
    )
    change = {"kind": "add", "corpus": to_dict(cfg.corpus), "rows_read": rows_read, "rejected": dict(rejected),
              "keys_added": int(len(key_pos)), "drift": drift}
    fault_point("during_add")
    manifest = _child_manifest(store, change)
    added = key_dtype(metas)
    if added != store.key_dtype:  # allowed, as decoding in another dtype is; the record says both
        log.warning("update add: %s keys join %s keys of version %s", added, store.key_dtype, store.version)
        manifest["key_dtype"] = "+".join(sorted(set(store.key_dtype.split("+")) | set(added.split("+"))))
    try:
        version_dir = publish(root, parts, manifest, expect_current=store.version)
    except PublishConflict as err:
        err.add_note(f"the written shards stay in {work.path}: running the update again reuses them")
        raise
    if not cfg.keep_work:
        work.remove()
    return UpdateReport(version_dir, store.version, rows_read, len(sources), dict(rejected), int(len(key_pos)),
                        drift, time.perf_counter() - t0, _layout_advice(root, params, store.num_keys + len(key_pos), cfg.index))


def _layout_advice(root: str | Path, kept: IndexParams, n_keys: int, cfg: IndexConfig) -> str:
    """An add keeps the parent's layout (its index is filled, not retrained); past a size
    threshold the settings choose another, which only a reindex or a rebuild gives."""
    chosen, _ = _planned_layout(kept, n_keys, cfg)
    if chosen == kept:
        return f"{kept.factory}, what the index settings choose for {n_keys} keys"
    how = "a rebuild gives it" if chosen.on_disk else f"`dresd update reindex --datastore {root}` lays the keys out so"
    return f"{kept.factory} kept; for {n_keys} keys the index settings choose {chosen.factory}: {how}"


def _parent(root: str | Path) -> Datastore:
    """CURRENT of `root`, every file's sha256 checked (once per node: the marker of
    dresd.datastore.integrity.verify_once, shared with the decoders)."""
    store = Datastore(root)
    verify_once(store)
    return store


def _publish_change(root: str | Path, make, what: str) -> Path:
    """Publish `make(current store)` -> (parts, manifest) from CURRENT; when another publisher
    moves CURRENT first, make it again from the new one (PUBLISH_ATTEMPTS in all)."""
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        store = _parent(root)
        parts, manifest = make(store)
        fault_point(f"during_{what}")
        try:
            return publish(root, parts, manifest, expect_current=store.version)
        except PublishConflict as err:
            if attempt == PUBLISH_ATTEMPTS or err.after_write:
                raise
            log.warning("%s: CURRENT moved from %s to %s during this %s; making it again from %s",
                        root, err.expected, err.found, what, err.found)
    raise AssertionError("unreachable")


def delete_sources(root: str | Path, source_ids: list[str]) -> Path:
    """Tombstone every key of the records whose source id is listed; publish a new version.

    Unknown ids raise (a typo must not silently delete nothing).
    """
    return _publish_change(root, lambda store: _delete_change(store, source_ids), "delete")


def _delete_change(store: Datastore, source_ids: list[str]) -> tuple[DatastoreParts, dict]:
    wanted = set(source_ids)
    records = [i for i, s in enumerate(store.sources) if s in wanted]
    missing = wanted - {store.sources[i] for i in records}
    if missing:
        raise DatastoreError(f"{store.path}: unknown source id(s) {sorted(missing)[:5]}")
    deleted = store.deleted.copy() if store.deleted is not None else np.zeros(store.num_keys, dtype=bool)
    pos = np.asarray(store.key_positions, dtype=np.int64)
    for r in records:
        lo, hi = store.record_offsets[r], store.record_offsets[r + 1]
        deleted[(pos >= lo) & (pos < hi)] = True
    change = {"kind": "delete", "sources": sorted(wanted), "records": len(records),
              "keys_deleted": int(deleted.sum() - (store.deleted.sum() if store.deleted is not None else 0))}
    return _parts_from(store, deleted=deleted), _child_manifest(store, change)


def compact(root: str | Path) -> Path:
    """Physically drop tombstoned keys and the records they came from; publish a new version.

    Needs the exact compressed vectors (flat or refine indexes); a compact PQ-only index
    cannot give them back and must be rebuilt instead.
    """
    return _publish_change(root, _compact_change, "compact")


def _compact_change(store: Datastore) -> tuple[DatastoreParts, dict]:
    if store.deleted is None or not store.deleted.any():
        raise DatastoreError(f"{store.path}: nothing to compact (no deleted keys)")
    if store.deleted.all():
        # A version with no records is no datastore: a build refuses an empty corpus too.
        raise DatastoreError(f"{store.path}: every one of its {len(store.sources)} records is deleted, and compacting "
                             "would publish an empty datastore, which is refused; nothing is published. To drop "
                             "the text, remove the datastore root (or `update add` records, then compact)")
    params = IndexParams(**store.manifest["index"]["params"])
    vectors = _exact_keys(store, "compacting")
    pos = np.asarray(store.key_positions, dtype=np.int64)
    rec_of_key = np.searchsorted(store.record_offsets, pos, side="right") - 1
    dead_records = set(np.unique(rec_of_key[store.deleted]).tolist())
    keep_rec = [r for r in range(len(store.sources)) if r not in dead_records]
    keep_key = ~np.isin(rec_of_key, list(dead_records))
    tokens, offsets, new_pos, shift = [], [0], [], {}
    for r in keep_rec:
        lo, hi = store.record_offsets[r], store.record_offsets[r + 1]
        shift[r] = offsets[-1] - lo
        tokens.append(np.asarray(store.tokens[lo:hi]))
        offsets.append(offsets[-1] + (hi - lo))
    new_pos = pos[keep_key] + np.array([shift[r] for r in rec_of_key[keep_key]], dtype=np.int64)
    index = empty_copy(store.index)
    add_keys(index, vectors[keep_key])
    set_search_params(index, params)
    change = {"kind": "compact", "records_dropped": len(dead_records), "keys_dropped": int((~keep_key).sum())}
    parts = _parts_from(store, tokens=np.concatenate(tokens), record_offsets=np.asarray(offsets, dtype=np.int64),
                        key_positions=new_pos, sources=[store.sources[r] for r in keep_rec], index=index, deleted=None)
    return parts, _child_manifest(store, change)


def _exact_keys(store: Datastore, doing: str) -> np.ndarray:
    """Every key's compressed vector, read back from the flat index or the refine stage."""
    params = IndexParams(**store.manifest["index"]["params"])
    if params.kind != "flat" and not params.refine:
        raise DatastoreError(f"{store.path}: a PQ-only index keeps no exact vectors; rebuild instead of {doing}")
    exact = store.index if params.kind == "flat" else faiss.downcast_index(store.index).refine_index
    return exact.reconstruct_n(0, store.num_keys)


def reindex(root: str | Path, cfg: IndexConfig, check_sample: int = 500) -> Path:
    """Publish CURRENT's keys again in the index layout `cfg` chooses for their count (a store
    built under older defaults, or with other index settings); tokens, keys and tombstones
    are unchanged, and ids stay key numbers. Needs the exact vectors (flat or refine indexes).
    The manifest's intrinsic check is made again on `check_sample` keys, as a build makes it."""
    return _publish_change(root, lambda store: _reindex_change(store, cfg, check_sample), "reindex")


def same_layout(root: str | Path, cfg: IndexConfig) -> str | None:
    """The factory string of CURRENT's layout when `cfg` would choose it again (a reindex
    would be refused), else None."""
    old, params, _ = _relayout(Datastore(root), cfg)
    return old.factory if params == old else None


def _relayout(store: Datastore, cfg: IndexConfig) -> tuple[IndexParams, IndexParams, str]:
    """The store's layout, and the layout `cfg` chooses for its keys with the reason."""
    old = IndexParams(**store.manifest["index"]["params"])
    return old, *_planned_layout(old, store.num_keys, cfg)


def _planned_layout(current: IndexParams, n_keys: int, cfg: IndexConfig) -> tuple[IndexParams, str]:
    """The layout `cfg` chooses for `n_keys` keys of a store laid out as `current`, with the reason."""
    # The keys' dimension was fixed by the build's compressor: `cfg.dim` cannot change it.
    return plan_index(n_keys, replace(cfg, dim=current.dim))


def _reindex_change(store: Datastore, cfg: IndexConfig, check_sample: int) -> tuple[DatastoreParts, dict]:
    old, params, layout = _relayout(store, cfg)
    if params.on_disk:
        raise DatastoreError(f"{store.path}: the layout chosen is on-disk lists ({layout}), which only a build "
                             "merges; rebuild instead of reindexing")
    if params == old:
        raise DatastoreError(f"{store.path}: version {store.version} is already in the layout {params.factory} "
                             "that these index settings choose; nothing to publish")
    vectors = _exact_keys(store, "reindexing")
    rng = np.random.default_rng(cfg.seed)
    sample = vectors[np.sort(rng.choice(len(vectors), min(cfg.sample_size, len(vectors)), replace=False))]
    index = train_index(params, sample, seed=cfg.seed)
    add_keys(index, vectors)
    manifest = _child_manifest(store, {"kind": "reindex", "from": old.factory, "to": params.factory})
    manifest["index"] = {**store.manifest["index"], "params": params.to_dict(), "factory": params.factory,
                         "layout": layout, "sample_size": len(sample)}
    manifest["check"] = intrinsic_check(index, lambda: [(0, vectors)], len(vectors), check_sample, cfg.seed)
    return _parts_from(store, index=index), manifest
