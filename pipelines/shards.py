"""Build work shards: what the one streaming pass leaves of each shard, for the merge.

A shard is a run of consecutive corpus rows of one file. The streaming pass (encode.py)
writes each shard into `<work>/shards/<shard id>/` (a Scratch: local, or a URI mirrored per
node); the code pass adds its codes once the index is trained. Full hidden states are never
written: a shard holds its token stream, its compressed keys and their codes, a few hundred
bytes a key at most whatever the model's width. Files that depend on the codec carry its
fingerprint in their names (`ctag`: the compressor; `tag`: compressor + trained index), so
a pulled copy never goes stale, and `meta-<ctag>.json` is written LAST: a shard with it is
complete for that compressor, and a rerun skips it.

    tokens.npy                  int32, the shard's records concatenated
    offsets.npy                 int64, record starts within tokens (+ end)
    key_starts.npy              int32, first key position of each record
    sources.json                source id per record
    keys-<ctag>.npy             float16 (n_keys, dim), compressed keys: the exact vectors of a
                                flat or refine index, the index's training sample, and the
                                intrinsic check's ground truth
    meta-<ctag>.json            counts, rejects by reason, node, dtype, the compressor's summed
                                reconstruction error
    codes-<tag>-<first>.faiss   IVF layouts: the shard's inverted lists (PQ codes, ids from
                                key number <first>), without the coarse quantizer (merge.py)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dresd.storage.faults import fault_point
from pipelines.scratch import Scratch

log = logging.getLogger(__name__)


def shard_id(file_index: int, chunk: int) -> str:
    """Shard ids sort in corpus order."""
    return f"{file_index:05d}-{chunk:06d}"


def meta_name(ctag: str) -> str:
    """The completion marker of a shard whose keys compressor `ctag` made."""
    return f"meta-{ctag}.json"


def keys_name(ctag: str) -> str:
    return f"keys-{ctag}.npy"


def codes_name(tag: str, first_id: int) -> str:
    return f"codes-{tag}-{first_id}.faiss"


@dataclass
class ShardData:
    """One shard's encoded records."""

    tokens: np.ndarray
    offsets: np.ndarray
    key_starts: np.ndarray
    keys: np.ndarray  # (n_keys, dim) compressed keys, stored as float16
    sources: list[str]


def _put(folder: Path, name: str, write) -> None:
    """Write file `name` through a temporary name: a reader sees it whole or not at all."""
    tmp = folder / f".tmp-{name}"
    write(tmp)
    os.replace(tmp, folder / name)


def _npy(array: np.ndarray):
    def write(path: Path) -> None:
        with open(path, "wb") as f:  # np.save on a path would append ".npy" to the temporary name
            np.save(f, array)
    return write


def write_shard(folder: Path, data: ShardData, meta: dict, ctag: str) -> None:
    """Write a shard's files, the compressor's marker last: a shard is complete for `ctag`
    only once every file it names is whole."""
    folder.mkdir(parents=True, exist_ok=True)
    _put(folder, "tokens.npy", _npy(data.tokens.astype(np.int32)))
    _put(folder, "offsets.npy", _npy(data.offsets.astype(np.int64)))
    _put(folder, "key_starts.npy", _npy(data.key_starts.astype(np.int32)))
    _put(folder, "sources.json", lambda p: p.write_text(json.dumps(data.sources)))
    _put(folder, keys_name(ctag), _npy(data.keys.astype(np.float16)))
    fault_point("embed_before_shard_rename")
    _put(folder, meta_name(ctag), lambda p: p.write_text(json.dumps(meta)))


def write_codes(work: Scratch, sid: str, name: str, codes: np.ndarray) -> None:
    """Add a codes file to a finished shard (the code pass; the merge, for any it left out)."""
    _put(work.path / "shards" / sid, name, codes.tofile)
    work.push(f"shards/{sid}/{name}")


def first_key_ids(key_counts: dict[str, int], shard_ids: list[str], base: int = 0) -> dict[str, int]:
    """The number of each shard's first key: keys are numbered across shards in order,
    after `base` existing keys."""
    counts = [key_counts[s] for s in shard_ids]
    starts = base + np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts else []
    return {s: int(f) for s, f in zip(shard_ids, starts)}


class ShardError(RuntimeError):
    """A finished work shard whose files cannot be read (disk fault, manual edits)."""


def _problem(folder: Path, meta: dict, ctag: str) -> str | None:
    """Why a shard marked complete is unusable, or None. Reads array headers only."""
    try:
        keys = np.load(folder / keys_name(ctag), mmap_mode="r")
        if keys.shape[0] != meta["keys"]:
            return f"{keys_name(ctag)} holds {keys.shape[0]} keys, meta says {meta['keys']}"
        tokens = np.load(folder / "tokens.npy", mmap_mode="r")
        if len(tokens) != meta["tokens"]:
            return f"tokens.npy holds {len(tokens)} tokens, meta says {meta['tokens']}"
        for name in ("offsets.npy", "key_starts.npy"):
            np.load(folder / name, mmap_mode="r")
        json.loads((folder / "sources.json").read_text())
    except (OSError, ValueError, KeyError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def done_shards(work: Scratch, ctag: str, shard_ids=None) -> dict[str, dict]:
    """Metadata of every complete, readable shard in `work` whose keys compressor `ctag` made
    (among `shard_ids` when given), by shard id; pulled to this node when the scratch is remote.

    A damaged shard is left out (with a warning naming it), so the next pass embeds it again
    instead of failing later or publishing bad keys.
    """
    out = {}
    wanted = None if shard_ids is None else set(shard_ids)
    for name in work.children("shards"):
        if name.startswith(".") or (wanted is not None and name not in wanted):
            continue
        if not work.exists(f"shards/{name}/{meta_name(ctag)}"):
            continue
        p = work.pull(f"shards/{name}")
        try:
            meta = json.loads((p / meta_name(ctag)).read_text())
        except (OSError, ValueError) as err:
            meta, why = None, f"{meta_name(ctag)}: {err}"
        else:
            why = _problem(p, meta, ctag)
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


def shard_keys(work: Scratch, sid: str, ctag: str) -> np.ndarray:
    """The shard's compressed keys (float16), memory-mapped."""
    return _shard_file(work, sid, keys_name(ctag), mmap=True)


def shard_tokens(work: Scratch, sid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(tokens, offsets, key_starts, sources) of a shard."""
    d = work.path / "shards" / sid
    try:
        sources = json.loads(work.pull(f"shards/{sid}/sources.json").read_text())
    except (OSError, ValueError) as err:
        raise ShardError(f"work shard {sid}: cannot read {d / 'sources.json'} ({err})") from err
    return (_shard_file(work, sid, "tokens.npy"), _shard_file(work, sid, "offsets.npy"),
            _shard_file(work, sid, "key_starts.npy"), sources)
