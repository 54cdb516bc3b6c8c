"""Build work shards: the on-disk hand-off between the embed stage and the index stages.

A shard is a run of consecutive corpus rows of one file. The embed stage writes each shard
into `<work>/shards/<shard id>/` and writes `meta.json` LAST, so a shard with meta.json is
complete: a rerun of the same build skips it (resumability), and the index stages read it.

    tokens.npy      int32, the shard's records concatenated
    offsets.npy     int64, record starts within tokens (+ end)
    key_starts.npy  int32, first key position of each record (after the shared template head)
    hidden.npy      float16 (n_keys, D), final-norm hidden states at every key position
    sources.json    source id per record
    meta.json       counts, rejects by reason, the node that embedded it
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

META = "meta.json"


def shard_id(file_index: int, chunk: int) -> str:
    """Shard ids sort in corpus order."""
    return f"{file_index:05d}-{chunk:06d}"


@dataclass
class ShardData:
    """One shard's embedded records."""

    tokens: np.ndarray
    offsets: np.ndarray
    key_starts: np.ndarray
    hidden: np.ndarray
    sources: list[str]


def write_shard(folder: Path, data: ShardData, meta: dict) -> None:
    """Write a shard into a temp folder, then rename: a shard is either whole or absent."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    np.save(tmp / "tokens.npy", data.tokens.astype(np.int32))
    np.save(tmp / "offsets.npy", data.offsets.astype(np.int64))
    np.save(tmp / "key_starts.npy", data.key_starts.astype(np.int32))
    np.save(tmp / "hidden.npy", data.hidden.astype(np.float16))
    (tmp / "sources.json").write_text(json.dumps(data.sources))
    (tmp / META).write_text(json.dumps(meta))
    if folder.exists():  # a crashed earlier attempt left an incomplete copy
        shutil.rmtree(folder)
    os.rename(tmp, folder)


def done_shards(work: Path) -> dict[str, dict]:
    """Metadata of every complete shard under `work`, by shard id."""
    root = work / "shards"
    if not root.is_dir():
        return {}
    return {p.name: json.loads((p / META).read_text()) for p in sorted(root.iterdir())
            if not p.name.startswith(".") and (p / META).is_file()}


def shard_hidden(work: Path, sid: str) -> np.ndarray:
    """The shard's hidden states, memory-mapped (never fully loaded)."""
    return np.load(work / "shards" / sid / "hidden.npy", mmap_mode="r")


def shard_tokens(work: Path, sid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(tokens, offsets, key_starts, sources) of a shard."""
    d = work / "shards" / sid
    return (np.load(d / "tokens.npy"), np.load(d / "offsets.npy"), np.load(d / "key_starts.npy"),
            json.loads((d / "sources.json").read_text()))
