"""A build's (or an update's) work folder and the corpus-wide steps both run in it.

The work folder (`BuildConfig.work_dir`, default `<output>/.build`) is named by the build key:
the same model, corpus files and tokenisation find the same folder, so a rerun reuses what
an interrupted run finished: the count pass's plan (`counts.json`), the fit (fit.py) and
every written shard (shards.py) and its codes. Scratch holds no full hidden states:
`scratch_bytes` measures what it does hold, for the build's report.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import numpy as np

import faiss

from dresd.config import BuildConfig, to_dict
from dresd.datastore.compression import Compressor
from dresd.datastore.corpus import SHAREGPT, list_corpus_files, sharegpt_path
from dresd.datastore.formatting import shared_prefix_len
from dresd.datastore.index import IndexParams, set_search_params
from dresd.storage.files import file_stamp
from pipelines import passes
from pipelines.merge import merge_shards, save_compressor_codec, save_trained
from pipelines.runtime import check_shared_folder, ensure_ray
from pipelines.scratch import Scratch
from pipelines.shards import done_shards, first_key_ids, shard_tokens


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
    if not work.remote:  # the pass's tasks write shards here, on whichever node they run
        check_shared_folder(work.path, "the build's scratch (work_dir, default <output>/.build)")
    return work


def tokenize_args(cfg: BuildConfig, facts, prompt_format: str) -> dict:
    """The read stage's Tokenize arguments for `cfg`'s corpus and model (dresd.model.resolve.model_facts)."""
    max_tokens = min(cfg.corpus.max_tokens or facts.max_context, facts.max_context)
    return dict(model_dir=cfg.model.path, corpus=cfg.corpus, eos_id=facts.eos_token_id, max_tokens=max_tokens,
                prefix_len=shared_prefix_len(facts.tokenizer, prompt_format))


def count_shards(cfg: BuildConfig, work: Scratch, tokenize: dict) -> dict[str, dict]:
    """Per shard: every record's key and token counts, rows read and rejects (passes.count_pass),
    kept in the work folder so a rerun does not read the corpus an extra time."""
    if work.exists("counts.json"):
        saved = json.loads(work.pull("counts.json").read_text())
        return {s: {**c, "record_keys": np.asarray(c["record_keys"], np.int64),
                    "record_tokens": np.asarray(c["record_tokens"], np.int64)} for s, c in saved.items()}
    counts = passes.count_pass(cfg, tokenize)
    plain = {s: {**c, "record_keys": c["record_keys"].tolist(), "record_tokens": c["record_tokens"].tolist()}
             for s, c in counts.items()}
    tmp = work.path / ".counts.json.tmp"
    tmp.write_text(json.dumps(plain))
    os.replace(tmp, work.path / "counts.json")
    work.push("counts.json")
    return counts


def stream_corpus(cfg: BuildConfig, work: Scratch, tokenize: dict, identity: dict, ctag: str,
                  plan: dict[str, tuple[int, int]], held: dict | None = None) -> tuple[dict[str, dict], int]:
    """Embed, compress (compressor `ctag`) and write every shard of `plan` (shard id ->
    (first key id, keys)) that the work folder does not hold for that compressor yet; with
    `held` (every shard's states from the fit pass), compress those instead of embedding.

    Returns (metadata of every shard by id, shards reused from an earlier run).
    """
    done = done_shards(work, ctag, plan)
    passes.stream_pass(cfg, tokenize, identity, work.location, ctag, plan, frozenset(done), held)
    return done_shards(work, ctag, plan), len(done)


def code_and_merge(cfg: BuildConfig, work: Scratch, params: IndexParams, ctag: str, tag: str,
                   first_ids: dict[str, int], base: faiss.Index | None = None) -> faiss.Index:
    """The code pass (IVF layouts: every shard's keys encoded by the trained index `tag`),
    then the merge in shard order after `base`, search parameters set."""
    shard_ids = sorted(first_ids)
    if params.kind != "flat":
        passes.code_pass(cfg, work.location, ctag, tag, first_ids)
    index = merge_shards(work, shard_ids, ctag, tag, first_ids, on_disk=params.on_disk, base=base)
    set_search_params(index, params)
    return index


def encode_into(cfg: BuildConfig, work: Scratch, tokenize: dict, identity: dict, comp: Compressor,
                empty: faiss.Index, params: IndexParams, base: faiss.Index | None = None, base_keys: int = 0):
    """Count, stream, code and merge `cfg`'s corpus with a codec fixed beforehand (an update's
    parent's compressor and emptied index), its keys numbered after `base_keys` and merged
    after `base`.

    Returns (index, shard metadata by id, shard ids in order); when the corpus has no keys,
    (None, the count pass's counts, []): the caller refuses it, naming count_tally(counts).
    """
    counts = count_shards(cfg, work, tokenize)
    shard_ids = sorted(counts)
    key_counts = {s: int(counts[s]["record_keys"].sum()) for s in shard_ids}
    if sum(key_counts.values()) == 0:
        return None, counts, []
    ctag, tag = save_compressor_codec(work, comp), save_trained(work, comp, empty)
    first_ids = first_key_ids(key_counts, shard_ids, base=base_keys)
    metas, _ = stream_corpus(cfg, work, tokenize, identity, ctag, {s: (first_ids[s], key_counts[s]) for s in shard_ids})
    return code_and_merge(cfg, work, params, ctag, tag, first_ids, base), metas, shard_ids


def tally(metas: dict) -> tuple[int, Counter, list[str]]:
    """(rows read, rejects by reason, first reject messages) over shard metadata."""
    rejected: Counter[str] = Counter()
    messages: list[str] = []
    for m in metas.values():
        rejected.update(m["rejects"])
        messages += m["messages"][: max(0, 5 - len(messages))]
    return sum(m["rows_read"] for m in metas.values()), rejected, messages


def usable_summary(rows_read: int, rejected: Counter, messages: list[str]) -> str:
    """Rows read and rejected by reason, with the first reject: why a corpus gave no keys."""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
    out = f"{rows_read} rows read, {sum(rejected.values())} rejected" + (f" ({reasons})" if reasons else "")
    return out + (f"; first reject: {messages[0]}" if messages else "")


def count_tally(counts: dict[str, dict]) -> tuple[int, Counter, list[str]]:
    """tally() over the count pass's shards (whose rejects are lists of reasons)."""
    return tally({s: {**c, "rejects": Counter(c["rejects"])} for s, c in counts.items()})


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


def scratch_bytes(work: Scratch) -> int:
    """Bytes of every file in this node's copy of the work folder (all of it once merged)."""
    return sum(f.stat().st_size for f in work.path.rglob("*") if f.is_file())
