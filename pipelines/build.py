"""The datastore build graph: fit first, then one streaming pass. Stage by stage:

    [count pass]  read.py -> tokenize.py -> key counts of every record    (tasks, nothing embedded)
    [driver]      plan_index by the key count; pick the fit sample (fit.py, index.sample_size keys)
    [fit pass]    read -> tokenize -> embed.py the sampled records -> their keys' states
    [driver]      fit z-score + PCA + L2: the compressor
    [stream pass] read -> tokenize -> embed -> compress (embed.py, actor pool) -> write (encode.py,
                  tasks) -> each shard's tokens and float16 compressed keys (shards.py); when the
                  fit sample was every key, its states are compressed instead (nothing embedded twice)
    [driver]      train the index on stored keys drawn uniformly (fit.py): the codec (merge.py)
    [code pass]   each shard's keys -> IVF codes with global ids (encode.py, tasks)
    [driver]      merge the shards in shard order -> intrinsic check -> atomic publish

Rows cross stages as Arrow columns (rows.py); passes.py holds the Ray Data graphs. Memory
stays bounded: full hidden states live only inside the embedding actors; the driver holds
the fit sample, the token stream and the merged index. Scratch holds a few hundred bytes a
key at most whatever the model's width (the report measures it). Work goes to
`<output>/.build/<build key>/` (work.py): a rerun of the same build reuses the counts, the
fit and every finished shard, and produces the same datastore as an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from dresd.config import BuildConfig, CorpusConfig, to_dict
from dresd.datastore.corpus import SHAREGPT, list_corpus_files, sharegpt_path
from dresd.datastore.formatting import format_fingerprint
from dresd.datastore.index import forced_ivfpq_keys, intrinsic_check, plan_index
from dresd.datastore.publish import DatastoreParts, PublishConflict, publish
from dresd.datastore.store import Datastore, DatastoreError, read_current
from dresd.model.resolve import model_facts
from pipelines import passes
from pipelines.fit import fit_compressor_first, train_on_keys
from pipelines.merge import load_compressor_codec
from pipelines.read import count_keys
from pipelines.scratch import Scratch
from pipelines.shards import first_key_ids, shard_keys
from pipelines.work import (assemble_stream, build_key, code_and_merge, count_shards, count_tally, key_dtype,
                            scratch_bytes, stream_corpus, tally, tokenize_args, usable_summary, work_folder)


@dataclass
class BuildReport:
    """What a build did, for printing and for tests."""

    version_dir: Path
    rows_read: int  # raw rows seen (an unreadable file counts as one)
    examples_embedded: int  # token sequences that became keys
    rejected: dict[str, int]  # rows rejected, by reason
    keys: int
    tokens: int
    shards: int = 0
    shards_reused: int = 0  # shards finished by an earlier run of the same build
    nodes: dict[str, list[str]] = field(default_factory=dict)  # stage -> node ids that ran it
    timings: dict[str, float] = field(default_factory=dict)
    check: dict[str, float] = field(default_factory=dict)
    reject_examples: list[str] = field(default_factory=list)  # first few reject messages
    index_layout: str = ""  # the index layout chosen, and why (dresd.datastore.index.plan_index)
    fit: dict = field(default_factory=dict)  # the fit's mode, sample and cost (pipelines.fit.FitRecord)
    scratch_bytes: int = 0  # the work folder's size once every shard is encoded (this node's copy)

    @property
    def scratch_bytes_per_key(self) -> float:
        return self.scratch_bytes / max(self.keys, 1)

    def lines(self) -> list[str]:
        """Human-readable summary."""
        rej = sum(self.rejected.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items()))
        fit = self.fit
        out = [
            f"datastore version: {self.version_dir}",
            f"rows read {self.rows_read} = embedded {self.rows_read - rej} + rejected {rej}"
            + (f" ({reasons})" if rej else "") + f"; examples embedded {self.examples_embedded}",
            f"keys {self.keys}, tokens {self.tokens}, shards {self.shards} ({self.shards_reused} reused)",
            f"fit ({fit.get('mode')}): {fit.get('sample_keys')} keys of {fit.get('sample_records')} records, "
            f"{fit.get('sample_tokens')} tokens embedded for it; explained variance {fit.get('explained_variance', 0):.3f}"
            + ("; the sample was every key, so the stream pass compressed its states (nothing embedded twice)"
               if fit.get("embedded_once") else ""),
            f"scratch: {self.scratch_bytes} B, {self.scratch_bytes_per_key:.1f} B per key (no full hidden states)",
            "intrinsic check: " + ", ".join(f"{k} {v:.3f}" for k, v in self.check.items()),
            f"index: {self.index_layout}",
            "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()),
        ]
        return out + [f"  rejected: {m}" for m in self.reject_examples]


def _check(index: faiss.Index, work: Scratch, shard_ids: list[str], starts: dict[str, int], n_keys: int, ctag: str,
           sample: int, seed: int) -> dict[str, float]:
    """intrinsic_check over the shards' stored keys."""

    def chunks():
        for sid in shard_ids:
            yield starts[sid], np.asarray(shard_keys(work, sid, ctag), dtype=np.float32)

    return intrinsic_check(index, chunks, n_keys, sample, seed)


def _file_name(path: str) -> str:
    """The file name a default source id ('<file name>:<row>') starts with."""
    return os.path.basename((sharegpt_path() if path == SHAREGPT else path).rstrip("/"))


def check_default_ids(corpus: CorpusConfig, store=None) -> None:
    """Without `corpus.id_field`, source ids are '<file name>:<row>': refuse corpus files that
    share a file name with each other (or, for an update, with ids `store` already holds),
    before anything is embedded: a delete of one such id would remove records of both."""
    if corpus.id_field:
        return
    names: dict[str, str] = {}
    for path in list_corpus_files(corpus.paths):
        name = _file_name(path)
        if name in names:
            raise DatastoreError(f"corpus files {names[name]} and {path} share the file name {name!r}, so their "
                                 f"default source ids ('{name}:<row>') would clash and a delete of one would remove "
                                 "both; rename one, or give every record an id (corpus.id_field, --id-field)")
        names[name] = path
    if store is not None:
        prefixes = {name: (f"{name}:", f"{name}[") for name in names}
        for name, path in names.items():
            taken = next((s for s in store.sources if s.startswith(prefixes[name])), None)
            if taken is not None:
                raise DatastoreError(f"{store.path}: already holds source ids of a file named {name!r} (e.g. "
                                     f"{taken!r}); adding {path} would reuse its default ids '{name}:<row>', so a "
                                     "delete would remove records of both; rename the file, or give its records "
                                     "ids (corpus.id_field, --id-field)")


def check_forced_ivfpq(cfg: BuildConfig, tokenize: dict) -> None:
    """A config that forces IVF-PQ on a corpus too small to train it fails here, before
    anything is embedded: the keys are counted after tokenizing (the first point they are
    known), and counting stops at the minimum, so a large corpus costs a few batches."""
    need = forced_ivfpq_keys(cfg.index)
    if not need:
        return
    what = f"index.kind {cfg.index.kind}" + (" with index.on_disk" if cfg.index.on_disk else "")
    if cfg.index.sample_size < need:
        raise DatastoreError(f"{what} trains IVF-PQ on index.sample_size = {cfg.index.sample_size} keys, "
                             f"fewer than the {need} it needs")
    found = count_keys(cfg.corpus, tokenize, need)
    if found < need:
        raise DatastoreError(f"corpus {cfg.corpus.paths}: {what} needs at least {need} keys to train its IVF-PQ "
                             f"index, but the corpus gives {found} (counted after tokenizing, before embedding); "
                             "use index.kind flat or auto for a corpus this small")


def build_datastore(cfg: BuildConfig) -> BuildReport:
    """Run the whole build and publish a new datastore version under `cfg.output`."""
    t0 = time.perf_counter()
    check_default_ids(cfg.corpus)
    # The driver reads the model's identity and tokenizer only; the job's workers get the model's
    # name (cfg.model.path), never this node's folder, and each node resolves it itself.
    facts = model_facts(cfg.model.path)
    tok, eos, identity = facts.tokenizer, facts.eos_token_id, facts.identity
    root = cfg.output
    # The version this build replaces: publishing checks CURRENT still names it, so an update
    # that lands while the build runs is not silently replaced (PublishConflict instead).
    parent = read_current(root)
    if parent is not None:
        # Refuse to add a version to a root that holds another model's datastore.
        Datastore(root).check_compatible(identity)
    fmt = cfg.corpus.prompt_format
    tokenize = tokenize_args(cfg, facts, fmt)
    prefix = tokenize["prefix_len"]
    check_forced_ivfpq(cfg, tokenize)
    work = work_folder(cfg, build_key(cfg, identity))

    counts = count_shards(cfg, work, tokenize)
    shard_ids = sorted(counts)
    key_counts = {s: int(counts[s]["record_keys"].sum()) for s in shard_ids}
    n_keys = sum(key_counts.values())
    if n_keys == 0:
        raise DatastoreError(f"corpus {cfg.corpus.paths}: no usable records, so nothing is published: "
                             + usable_summary(*count_tally(counts)))
    t_count = time.perf_counter()
    params, layout = plan_index(n_keys, cfg.index)
    fit, held = fit_compressor_first(cfg, work, {s: c["record_keys"] for s, c in counts.items()},
                                     {s: c["record_tokens"] for s, c in counts.items()},
                                     lambda select, per_call: passes.fit_pass(cfg, tokenize, identity, select, per_call))
    comp = load_compressor_codec(work, fit.ctag)
    t_fit = time.perf_counter()
    starts = first_key_ids(key_counts, shard_ids)
    metas, reused = stream_corpus(cfg, work, tokenize, identity, fit.ctag,
                                  {s: (starts[s], key_counts[s]) for s in shard_ids}, held)
    embedded_once = held is not None
    del held
    t_stream = time.perf_counter()
    tag = train_on_keys(cfg, work, params, comp, fit.ctag, key_counts)
    index = code_and_merge(cfg, work, params, fit.ctag, tag, starts)
    scratch = scratch_bytes(work)
    t_index = time.perf_counter()
    check = _check(index, work, shard_ids, starts, n_keys, fit.ctag, cfg.check_sample, cfg.index.seed)

    rows_read, rejected, messages = tally(metas)
    tokens, ends, key_positions, sources = assemble_stream(work, shard_ids)
    offsets = [0] + ends
    n_tokens = offsets[-1]
    assert len(key_positions) == n_keys == index.ntotal, "every key has one encoded vector and one index entry"
    counted = {"rows_read": rows_read, "examples": len(sources), "rejected": dict(rejected)}
    manifest = {
        "model": identity,
        "key_dtype": key_dtype(metas),
        "prompt_format": {"name": fmt, "fingerprint": format_fingerprint(tok, fmt), "shared_prefix_len": prefix},
        "eos_id": eos,
        "value_len": cfg.value_len,
        "index": {"params": params.to_dict(), "factory": params.factory, "sample_size": fit.sample_keys,
                  "layout": layout, "fit": fit.mode},
        # reconstruction_error of the fit sample: the baseline that update drift is judged by.
        "compressor": {"dim": comp.out_dim, "explained_variance": fit.explained_variance,
                       "sample_reconstruction_error": fit.sample_reconstruction_error},
        "counts": counted,
        "check": check,
        "build_config": to_dict(cfg),
    }
    parts = DatastoreParts(np.concatenate(tokens), np.asarray(offsets, dtype=np.int64), key_positions, sources, comp, index)
    try:
        version_dir = publish(root, parts, manifest, expect_current=parent)
    except PublishConflict as err:
        err.add_note(f"the written shards stay in {work.path}: running the build again reuses them")
        raise
    if not cfg.keep_work:
        work.remove()
    t_end = time.perf_counter()
    return BuildReport(
        version_dir=version_dir, rows_read=rows_read, examples_embedded=len(sources), rejected=dict(rejected),
        keys=n_keys, tokens=int(n_tokens), shards=len(shard_ids), shards_reused=reused,
        nodes={"embed": sorted({metas[s]["node"] for s in shard_ids})},
        timings={"count": t_count - t0, "fit": t_fit - t_count, "read+tokenize+embed+write": t_stream - t_fit,
                 "train+code+merge": t_index - t_stream, "check+publish": t_end - t_index, "total": t_end - t0},
        check=check, reject_examples=messages, index_layout=f"{params.factory}: {layout}",
        fit={"mode": fit.mode, "sample_keys": fit.sample_keys, "sample_records": fit.sample_records,
             "sample_tokens": fit.sample_tokens, "explained_variance": fit.explained_variance,
             "embedded_once": embedded_once},
        scratch_bytes=scratch,
    )
