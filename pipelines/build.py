"""The datastore build graph.

    read (task per file) -> tokenize (actor) -> embed (actor pool, model once per actor)
      -> driver: token stream + key positions, hidden states spilled to disk (fp16)
      -> sample -> fit z-score + PCA + L2 -> train index -> compress + add in chunks
      -> intrinsic check (recall@50 vs exact, self-retrieval MRR) -> atomic publish

Full-size hidden states never sit in memory all at once: they stream from the embedding
actors to a spill file, and the compress/add pass reads it back in chunks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from dresd.compression import compress, fit_compressor
from dresd.config import BuildConfig, ModelConfig, to_dict
from dresd.datastore import Datastore, DatastoreError, DatastoreParts, publish
from dresd.formatting import format_fingerprint, shared_prefix_len
from dresd.index import add_keys, choose_index_params, recall_at_k, self_retrieval_mrr, train_index
from dresd.models import load_model
from pipelines.embed import Embed
from pipelines.read import read_corpus
from pipelines.runtime import ensure_ray
from pipelines.tokenize import Tokenize


@dataclass
class BuildReport:
    """What a build did, for printing and for tests."""

    version_dir: Path
    rows_read: int  # raw rows seen (an unreadable file counts as one)
    examples_embedded: int  # token sequences that became keys
    rejected: dict[str, int]  # rows rejected, by reason
    keys: int
    tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    check: dict[str, float] = field(default_factory=dict)
    reject_examples: list[str] = field(default_factory=list)  # first few reject messages

    def lines(self) -> list[str]:
        """Human-readable summary."""
        rej = sum(self.rejected.values())
        out = [
            f"datastore version: {self.version_dir}",
            f"rows read {self.rows_read}: embedded {self.examples_embedded} examples, rejected {rej} "
            + (f"({', '.join(f'{k}: {v}' for k, v in sorted(self.rejected.items()))})" if rej else ""),
            f"keys {self.keys}, tokens {self.tokens}",
            "intrinsic check: " + ", ".join(f"{k} {v:.3f}" for k, v in self.check.items()),
            "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()),
        ]
        out += [f"  rejected: {m}" for m in self.reject_examples]
        return out


class HiddenSpill:
    """Append-only fp16 spill file of hidden states, read back by row ranges or ids."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim, self.rows = path, dim, 0
        self._fh = open(path, "wb")

    def append(self, hidden: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(hidden, dtype=np.float16).tobytes())
        self.rows += len(hidden)

    def close(self) -> np.memmap:
        self._fh.close()
        return np.memmap(self.path, dtype=np.float16, mode="r", shape=(self.rows, self.dim))


def _check_output_root(root: Path, identity: dict) -> None:
    """Refuse to add a version to a root that holds another model's datastore."""
    if not (root / "CURRENT").is_file():
        return
    current = Datastore(root)
    current.check_compatible(identity)


def build_datastore(cfg: BuildConfig) -> BuildReport:
    """Run the whole build and publish a new datastore version under `cfg.output`."""
    t_start = time.perf_counter()
    lm = load_model(ModelConfig(path=cfg.model.path, device="cpu"))
    model_dir = str(lm.model.name_or_path)
    tok, eos = lm.tokenizer, lm.eos_token_id
    root = Path(cfg.output)
    _check_output_root(root, lm.identity)
    fmt = cfg.corpus.prompt_format
    prefix = shared_prefix_len(tok, fmt)
    max_tokens = min(cfg.corpus.max_tokens or lm.max_context, lm.max_context)
    hidden_size = lm.identity["hidden_size"]
    manifest_model = lm.identity
    del lm  # the driver needs the tokenizer facts only; actors load their own model

    ensure_ray(cfg.ray_address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = read_corpus(cfg.corpus)
    ds = ds.map_batches(
        Tokenize,
        fn_constructor_kwargs=dict(model_dir=model_dir, corpus=cfg.corpus, eos_id=eos, max_tokens=max_tokens, prefix_len=prefix),
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.25,
    )
    ds = ds.map_batches(
        Embed,
        fn_constructor_kwargs=dict(model_dir=model_dir, device=cfg.model.device, threads=cfg.embed_threads),
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.embed_actors),
        num_cpus=cfg.embed_cpus,
        num_gpus=cfg.embed_gpus,
    )

    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root.parent if root.parent.exists() else None))
    try:
        spill = HiddenSpill(work / "hidden.f16", hidden_size)
        tokens, offsets, key_pos, sources = [], [0], [], []
        rows_seen: set[tuple[str, int]] = set()
        rejected: Counter[str] = Counter()
        reject_examples: list[str] = []
        n_tokens = 0
        for row in ds.iter_rows():
            rows_seen.add((row["file"], int(row["row"])))
            if row["reject"]:
                rejected[row["reject"]] += 1
                if len(reject_examples) < 5:
                    reject_examples.append(row["detail"])
                continue
            ids = np.asarray(row["ids"], dtype=np.int32)
            start = int(row["key_start"])
            tokens.append(ids)
            key_pos.append(np.arange(n_tokens + start, n_tokens + len(ids) - 1, dtype=np.int64))
            n_tokens += len(ids)
            offsets.append(n_tokens)
            sources.append(str(row["source_id"]))
            spill.append(row["hidden"])
        t_embed = time.perf_counter()
        hidden = spill.close()
        if hidden.shape[0] == 0:
            raise DatastoreError(f"no usable records in {cfg.corpus.paths}: rejected {dict(rejected)}")
        key_positions = np.concatenate(key_pos)
        assert len(key_positions) == hidden.shape[0], "every key has exactly one hidden state"

        rng = np.random.default_rng(cfg.index.seed)
        n_keys = hidden.shape[0]
        sample_ids = np.sort(rng.choice(n_keys, size=min(cfg.index.sample_size, n_keys), replace=False))
        sample = np.asarray(hidden[sample_ids], dtype=np.float32)
        comp = fit_compressor(sample, cfg.index.dim)
        params = choose_index_params(n_keys, cfg.index)
        index = train_index(params, compress(comp, sample), seed=cfg.index.seed)
        t_train = time.perf_counter()
        keys = np.empty((n_keys, cfg.index.dim), dtype=np.float32)
        chunk = 65536
        for s in tqdm(range(0, n_keys, chunk), desc="compress + add", unit="chunk"):
            keys[s : s + chunk] = compress(comp, np.asarray(hidden[s : s + chunk], dtype=np.float32))
            add_keys(index, keys[s : s + chunk])
        t_fill = time.perf_counter()
        check_ids = np.sort(rng.choice(n_keys, size=min(cfg.check_sample, n_keys), replace=False))
        check = {
            "recall@50": recall_at_k(index, keys, keys[check_ids], 50),
            "self_mrr@50": self_retrieval_mrr(index, keys, check_ids, 50),
        }
        parts = DatastoreParts(
            tokens=np.concatenate(tokens),
            record_offsets=np.asarray(offsets, dtype=np.int64),
            key_positions=key_positions,
            sources=sources,
            compressor=comp,
            index=index,
        )
        counts = {"rows_read": len(rows_seen), "examples": len(sources), "rejected": dict(rejected)}
        manifest = {
            "model": manifest_model,
            "prompt_format": {"name": fmt, "fingerprint": format_fingerprint(tok, fmt), "shared_prefix_len": prefix},
            "eos_id": eos,
            "value_len": cfg.value_len,
            "index": {"params": params.to_dict(), "factory": params.factory, "sample_size": int(len(sample_ids))},
            "compressor": {"dim": comp.out_dim, "explained_variance": float(comp.explained_variance_ratio.sum())},
            "counts": counts,
            "check": check,
            "build_config": to_dict(cfg),
        }
        version_dir = publish(root, parts, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t_end = time.perf_counter()
    return BuildReport(
        version_dir=version_dir,
        rows_read=len(rows_seen),
        examples_embedded=len(sources),
        rejected=dict(rejected),
        keys=n_keys,
        tokens=int(n_tokens),
        timings={
            "read+tokenize+embed": t_embed - t_start,
            "fit+train": t_train - t_embed,
            "compress+add": t_fill - t_train,
            "check+publish": t_end - t_fill,
            "total": t_end - t_start,
        },
        check=check,
        reject_examples=reject_examples,
    )
