"""The datastore build graph, stage by stage:

    read.py       corpus files -> shards of consecutive rows (task per file), each
    tokenize.py     tokenized where it is read; rejects counted by reason
    embed.py      sequences -> hidden states -> shard files        (actor pool, model once per actor)
    [driver]      streaming reservoir over shard files -> fit z-score + PCA + L2 -> train index
    index_fill.py compress + encode each shard in parallel tasks -> merge in shard order
    [driver]      intrinsic check (streamed exact search) -> atomic publish (datastore.py)

Memory stays bounded: full-size hidden states live only in shard files on disk; the driver
holds the reservoir sample, the token stream and the merged index. Work goes to
`<output>/.build/<build key>/`: a rerun of the same build skips finished shards and fills,
and produces the same datastore as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import ray
from tqdm import tqdm

from dresd.datastore.compression import compress, fit_compressor, reconstruction_error
from dresd.config import BuildConfig, CorpusConfig, to_dict
from dresd.datastore.corpus import list_corpus_files, sharegpt_path, SHAREGPT
from dresd.datastore.store import Datastore, DatastoreError, read_current
from dresd.datastore.publish import DatastoreParts, PublishConflict, publish
from dresd.datastore.formatting import format_fingerprint, shared_prefix_len
from dresd.datastore.index import (exact_topk, forced_ivfpq_keys, overlap_at_k, plan_index, search, self_retrieval_mrr,
                                   set_search_params, train_index)
from dresd.model.resolve import model_facts
from dresd.datastore.reservoir import Reservoir
from dresd.storage.files import file_stamp
from pipelines.embed import Embed
from pipelines.index_fill import fill_and_merge, fill_names, save_trained
from pipelines.read import count_keys, read_shards
from pipelines.runtime import check_shared_folder, ensure_ray
from pipelines.scratch import Scratch
from pipelines.shards import done_shards, first_key_ids, shard_hidden, shard_tokens


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

    def lines(self) -> list[str]:
        """Human-readable summary."""
        rej = sum(self.rejected.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items()))
        out = [
            f"datastore version: {self.version_dir}",
            f"rows read {self.rows_read} = embedded {self.rows_read - rej} + rejected {rej}"
            + (f" ({reasons})" if rej else "") + f"; examples embedded {self.examples_embedded}",
            f"keys {self.keys}, tokens {self.tokens}, shards {self.shards} ({self.shards_reused} reused)",
            "intrinsic check: " + ", ".join(f"{k} {v:.3f}" for k, v in self.check.items()),
            f"index: {self.index_layout}",
            "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()),
        ]
        return out + [f"  rejected: {m}" for m in self.reject_examples]


def build_key(cfg: BuildConfig, identity: dict) -> str:
    """Names the work folder: same model, corpus files and tokenisation -> same shards."""
    files = []
    for f in list_corpus_files(cfg.corpus.paths):
        files.append([f, *file_stamp(sharegpt_path() if f == SHAREGPT else f)[1:]])
    key = [identity["fingerprint"], to_dict(cfg.corpus), files, cfg.shard_rows]
    if cfg.model.dtype != "auto":  # shards embedded in another precision are other keys ("auto" keeps older names)
        key.append(cfg.model.dtype)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def work_folder(cfg: BuildConfig, name: str) -> Scratch:
    """Work folder `name` of a build or update for `cfg.output` (see BuildConfig.work_dir),
    created on this node. Joins Ray first: a URI scratch's local mirror is per Ray node."""
    ensure_ray(cfg.ray_address)
    root = cfg.work_dir or cfg.output.rstrip("/") + "/.build"
    work = Scratch(root.rstrip("/") + "/" + name)
    work.path.mkdir(parents=True, exist_ok=True)
    if not work.remote:  # the embedding actors write shards here, on whichever node they run
        check_shared_folder(work.path, "the build's scratch (work_dir, default <output>/.build)")
    return work


def _embed_shards(cfg: BuildConfig, work: Scratch, identity: dict, eos: int, max_tokens: int, prefix: int) -> int:
    """Run read -> tokenize -> embed for every unfinished shard; returns shards reused."""
    done = done_shards(work)
    gpus = cfg.embed_gpus if cfg.embed_gpus >= 0 else (1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0)
    # Workers get the model's name, resolved on each node (dresd.model.resolve), and the
    # identity the driver saw, which each embedding actor checks its own copy against.
    model_dir = cfg.model.path
    tokenize = dict(model_dir=model_dir, corpus=cfg.corpus, eos_id=eos, max_tokens=max_tokens, prefix_len=prefix)
    ds = read_shards(cfg.corpus, tokenize, cfg.shard_rows, skip=frozenset(done))
    ds = ds.map_batches(
        Embed,
        fn_constructor_kwargs=dict(model_dir=model_dir, device=cfg.model.device, threads=cfg.embed_threads,
                                   work=work.location, batch_size=cfg.batch_size, dtype=cfg.model.dtype,
                                   identity=identity),
        batch_size=1,
        # One shard in flight per actor: shards are large, so this balances them over actors.
        compute=ray.data.ActorPoolStrategy(size=cfg.embed_actors, max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.embed_cpus,
        num_gpus=gpus,
    )
    for _ in ds.iter_rows():  # shards are written by the actors; rows are receipts
        pass
    return len(done)


def embed_corpus(cfg: BuildConfig, work: Scratch, identity: dict, eos: int, max_tokens: int, prefix: int) -> tuple[dict, int]:
    """Embed every shard of the corpus into `work` (skipping finished ones) with the model
    `cfg.model.path` names, which must have `identity` on every node.

    Returns (metadata of every shard by id, shards reused from an earlier run).
    """
    ensure_ray(cfg.ray_address)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.target_max_block_size
    ctx.execution_options.preserve_order = True
    # Every shard closes its own block (shards are KB-MB, far below the default target):
    # blocks are what actors receive, so shards spread over all embedding actors.
    ctx.target_max_block_size = 1
    try:
        reused = _embed_shards(cfg, work, identity, eos, max_tokens, prefix)
    finally:
        ctx.execution_options.preserve_order, ctx.target_max_block_size = saved
    return done_shards(work), reused


def tally(metas: dict) -> tuple[int, Counter, list[str]]:
    """(rows read, rejects by reason, first reject messages) over shard metadata."""
    rejected: Counter[str] = Counter()
    messages: list[str] = []
    for m in metas.values():
        rejected.update(m["rejects"])
        messages += m["messages"][: max(0, 5 - len(messages))]
    return sum(m["rows_read"] for m in metas.values()), rejected, messages


def key_dtype(metas: dict) -> str:
    """The dtype the shards' keys were made in ("a+b" when nodes differed: "auto" on a mixed
    cluster); shards from before the record were float32."""
    return "+".join(sorted({m.get("dtype", "float32") for m in metas.values()})) or "float32"


def assemble_stream(work: Scratch, shard_ids: list[str], token_base: int = 0):
    """Token stream pieces of the shards in order, positions shifted by `token_base`.

    Returns (token arrays, record end offsets, key positions, source ids).
    """
    tokens, ends, key_pos, sources = [], [], [], []
    n = token_base
    for sid in shard_ids:
        toks, offs, kstarts, srcs = shard_tokens(work, sid)
        for r in range(len(srcs)):
            key_pos.append(np.arange(n + offs[r] + kstarts[r], n + offs[r + 1] - 1, dtype=np.int64))
        ends.extend((n + offs[1:]).tolist())
        n += len(toks)
        tokens.append(toks)
        sources += srcs
    return tokens, ends, (np.concatenate(key_pos) if key_pos else np.zeros(0, np.int64)), sources


def reservoir_sample(work: Scratch, shard_ids: list[str], size: int, dim: int, seed: int) -> np.ndarray:
    """Uniform sample of hidden states, streamed over the shards in order."""
    res = Reservoir(size, dim, seed)
    for sid in tqdm(shard_ids, desc="sample", unit="shard"):
        hidden = shard_hidden(work, sid)
        for s in range(0, len(hidden), 65536):
            chunk = np.asarray(hidden[s : s + 65536], dtype=np.float32)
            # Every key passes here before any fit or fill: a shard written before the embed
            # stage checked its states (pipelines/embed.py) is caught too.
            bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
            if len(bad):
                raise DatastoreError(f"work shard {sid} ({work.path / 'shards' / sid}): hidden states at key rows "
                                     f"{(bad[:5] + s).tolist()} ({len(bad)} in all) are NaN or infinite; delete the "
                                     "shard folder and rerun to embed it again, or fix the model")
            res.add(chunk)
    return res.sample.copy()


def _check(index: faiss.Index, work: Scratch, shard_ids: list[str], starts: list[int], n_keys: int, tag: str,
           sample: int, seed: int) -> dict[str, float]:
    """recall@50 of the index vs exact search, and self-retrieval MRR, on sampled keys."""
    ids = np.sort(np.random.default_rng(seed + 1).choice(n_keys, size=min(sample, n_keys), replace=False))

    def chunks():
        for sid, first in zip(shard_ids, starts):
            yield first, np.load(work.pull(fill_names(sid, tag)[1]), mmap_mode="r")

    queries = np.concatenate([np.asarray(keys[ids[(ids >= first) & (ids < first + len(keys))] - first])
                              for first, keys in chunks()])
    k = min(50, n_keys)
    truth = exact_topk(chunks(), queries, k)
    return {
        "recall@50": overlap_at_k(search(index, queries, k)[1], truth),
        "self_mrr@50": self_retrieval_mrr(index, queries, ids, k),
    }


def usable_summary(rows_read: int, rejected: Counter, messages: list[str]) -> str:
    """Rows read and rejected by reason, with the first reject: why a corpus gave no keys."""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
    out = f"{rows_read} rows read, {sum(rejected.values())} rejected" + (f" ({reasons})" if reasons else "")
    return out + (f"; first reject: {messages[0]}" if messages else "")


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
    model, tok, eos, identity = cfg.model.path, facts.tokenizer, facts.eos_token_id, facts.identity
    max_tokens = min(cfg.corpus.max_tokens or facts.max_context, facts.max_context)
    root = cfg.output
    # The version this build replaces: publishing checks CURRENT still names it, so an update
    # that lands while the build runs is not silently replaced (PublishConflict instead).
    parent = read_current(root)
    if parent is not None:
        # Refuse to add a version to a root that holds another model's datastore.
        Datastore(root).check_compatible(identity)
    fmt = cfg.corpus.prompt_format
    prefix = shared_prefix_len(tok, fmt)
    tokenize = dict(model_dir=model, corpus=cfg.corpus, eos_id=eos, max_tokens=max_tokens, prefix_len=prefix)
    check_forced_ivfpq(cfg, tokenize)
    work = work_folder(cfg, build_key(cfg, identity))

    metas, reused = embed_corpus(cfg, work, identity, eos, max_tokens, prefix)
    shard_ids = sorted(metas)
    t_embed = time.perf_counter()
    rows_read, rejected, messages = tally(metas)
    key_counts = [metas[s]["keys"] for s in shard_ids]
    n_keys = int(sum(key_counts))
    if n_keys == 0:
        raise DatastoreError(f"corpus {cfg.corpus.paths}: no usable records, so nothing is published: "
                             + usable_summary(rows_read, rejected, messages))
    starts = first_key_ids(metas, shard_ids)

    sample = reservoir_sample(work, shard_ids, cfg.index.sample_size, identity["hidden_size"], cfg.index.seed)
    comp = fit_compressor(sample, cfg.index.dim)
    params, layout = plan_index(n_keys, cfg.index)
    trained = train_index(params, compress(comp, sample), seed=cfg.index.seed)
    tag = save_trained(work, comp, trained)
    t_train = time.perf_counter()
    index, fill_nodes = fill_and_merge(work, shard_ids, tag, starts, on_disk=params.on_disk)
    set_search_params(index, params)
    t_fill = time.perf_counter()
    check = _check(index, work, shard_ids, starts, n_keys, tag, cfg.check_sample, cfg.index.seed)

    tokens, ends, key_positions, sources = assemble_stream(work, shard_ids)
    offsets = [0] + ends
    n_tokens = offsets[-1]
    assert len(key_positions) == n_keys == index.ntotal, "every key has one hidden state and one index entry"
    counts = {"rows_read": rows_read, "examples": len(sources), "rejected": dict(rejected)}
    manifest = {
        "model": identity,
        "key_dtype": key_dtype(metas),
        "prompt_format": {"name": fmt, "fingerprint": format_fingerprint(tok, fmt), "shared_prefix_len": prefix},
        "eos_id": eos,
        "value_len": cfg.value_len,
        "index": {"params": params.to_dict(), "factory": params.factory, "sample_size": int(len(sample)),
                  "layout": layout},
        # reconstruction_error of the fit sample: the baseline that update drift is judged by.
        "compressor": {"dim": comp.out_dim, "explained_variance": float(comp.explained_variance_ratio.sum()),
                       "sample_reconstruction_error": reconstruction_error(comp, sample)},
        "counts": counts,
        "check": check,
        "build_config": to_dict(cfg),
    }
    parts = DatastoreParts(np.concatenate(tokens), np.asarray(offsets, dtype=np.int64), key_positions, sources, comp, index)
    try:
        version_dir = publish(root, parts, manifest, expect_current=parent)
    except PublishConflict as err:
        err.add_note(f"the embedded shards stay in {work.path}: running the build again reuses them")
        raise
    if not cfg.keep_work:
        work.remove()
    t_end = time.perf_counter()
    return BuildReport(
        version_dir=version_dir, rows_read=rows_read, examples_embedded=len(sources), rejected=dict(rejected),
        keys=n_keys, tokens=int(n_tokens), shards=len(shard_ids), shards_reused=reused,
        nodes={"embed": sorted({metas[s]["node"] for s in shard_ids}), "fill": sorted(set(fill_nodes))},
        timings={"read+tokenize+embed": t_embed - t0, "sample+fit+train": t_train - t_embed,
                 "fill+merge": t_fill - t_train, "check+publish": t_end - t_fill, "total": t_end - t0},
        check=check, reject_examples=messages, index_layout=f"{params.factory}: {layout}",
    )
