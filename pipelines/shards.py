"""Build work shards: the on-disk hand-off between the embed stage and the index stages.

A shard is a run of consecutive corpus rows of one file. The embed stage writes each shard
into `<work>/shards/<shard id>/` (a Scratch: local, or a URI mirrored per node) and writes
`meta.json` LAST, so a shard with meta.json is
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
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dresd.storage.faults import fault_point
from pipelines.scratch import Scratch

META = "meta.json"
log = logging.getLogger(__name__)


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
    fault_point("embed_before_shard_rename")
    (tmp / "sources.json").write_text(json.dumps(data.sources))
    (tmp / META).write_text(json.dumps(meta))
    if folder.exists():  # a crashed earlier attempt left an incomplete copy
        shutil.rmtree(folder)
    os.rename(tmp, folder)


def first_key_ids(metas: dict[str, dict], shard_ids: list[str], base: int = 0) -> list[int]:
    """The number of each shard's first key: keys are numbered across shards in order,
    after `base` existing keys."""
    counts = [metas[s]["keys"] for s in shard_ids]
    return (base + np.concatenate([[0], np.cumsum(counts)[:-1]])).astype(np.int64).tolist() if counts else []


class ShardError(RuntimeError):
    """A finished work shard whose files cannot be read (disk fault, manual edits)."""


def _problem(folder: Path, meta: dict) -> str | None:
    """Why a shard marked complete is unusable, or None. Reads array headers only."""
    try:
        hidden = np.load(folder / "hidden.npy", mmap_mode="r")
        if hidden.shape[0] != meta["keys"]:
            return f"hidden.npy holds {hidden.shape[0]} keys, meta.json says {meta['keys']}"
        tokens = np.load(folder / "tokens.npy", mmap_mode="r")
        if len(tokens) != meta["tokens"]:
            return f"tokens.npy holds {len(tokens)} tokens, meta.json says {meta['tokens']}"
        for name in ("offsets.npy", "key_starts.npy"):
            np.load(folder / name, mmap_mode="r")
        json.loads((folder / "sources.json").read_text())
    except (OSError, ValueError, KeyError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def done_shards(work: Scratch) -> dict[str, dict]:
    """Metadata of every complete, readable shard in `work`, by shard id (pulled to this
    node when the scratch is remote).

    A shard whose files are damaged is left out (with a warning naming it), so the next run
    embeds it again instead of failing later or publishing bad keys.
    """
    out = {}
    for name in work.children("shards"):
        if name.startswith(".") or not work.exists(f"shards/{name}/{META}"):
            continue
        p = work.pull(f"shards/{name}")
        try:
            meta = json.loads((p / META).read_text())
        except (OSError, ValueError) as err:
            meta, why = None, f"meta.json: {err}"
        else:
            why = _problem(p, meta)
        if why is None:
            out[name] = meta
        else:
            log.warning("work shard %s is damaged (%s); it will be embedded again", p, why)
    return out


def _shard_file(work: Scratch, sid: str, name: str, mmap: bool = False):
    path = work.path / "shards" / sid / name
    try:
        work.pull(f"shards/{sid}/{name}")
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as err:
        raise ShardError(f"work shard {sid}: cannot read {path} ({err}); delete {path.parent} "
                         "and rerun the build to embed that shard again") from err


def shard_hidden(work: Scratch, sid: str) -> np.ndarray:
    """The shard's hidden states, memory-mapped (never fully loaded)."""
    return _shard_file(work, sid, "hidden.npy", mmap=True)


def shard_tokens(work: Scratch, sid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(tokens, offsets, key_starts, sources) of a shard."""
    d = work.path / "shards" / sid
    try:
        sources = json.loads(work.pull(f"shards/{sid}/sources.json").read_text())
    except (OSError, ValueError) as err:
        raise ShardError(f"work shard {sid}: cannot read {d / 'sources.json'} ({err})") from err
    return (_shard_file(work, sid, "tokens.npy"), _shard_file(work, sid, "offsets.npy"),
            _shard_file(work, sid, "key_starts.npy"), sources)
