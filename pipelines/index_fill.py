"""Stages 4-5: train the index once, fill it shard by shard in parallel, merge in order.

Each fill task loads the frozen compressor and the trained empty index, compresses its
shard's hidden states, adds them and writes a shard index plus the compressed keys (used
by the intrinsic check). The driver merges shard indexes in shard order, so id i = key i.
Fill outputs are named by the compressor+index fingerprint: a rerun reuses them only when
the same compressor and training produced them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np
import ray

from dresd.compression import Compressor, compress, load_compressor
from dresd.index import merge_into, serialize
from pipelines.shards import shard_hidden

CHUNK = 65536


def fill_paths(work: Path, sid: str, tag: str) -> tuple[Path, Path]:
    d = work / "shards" / sid
    return d / f"index-{tag}.faiss", d / f"keys-{tag}.npy"


# SPREAD: shard fills are independent; spreading them uses every node of a cluster.
@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def fill_shard(work: str, sid: str, tag: str) -> str:
    """Compress + encode one shard into its own index file; returns the node that did it."""
    faiss.omp_set_num_threads(1)
    work_p = Path(work)
    index_path, keys_path = fill_paths(work_p, sid, tag)
    if not index_path.is_file():
        comp = load_compressor(work_p / f"compressor-{tag}.npz")
        index = faiss.read_index(str(work_p / f"trained-{tag}.faiss"))
        hidden = shard_hidden(work_p, sid)
        keys = np.empty((len(hidden), comp.out_dim), dtype=np.float32)
        for s in range(0, len(hidden), CHUNK):
            keys[s : s + CHUNK] = compress(comp, np.asarray(hidden[s : s + CHUNK], dtype=np.float32))
        index.add(keys)
        np.save(keys_path.with_suffix(".tmp.npy"), keys)
        keys_path.with_suffix(".tmp.npy").rename(keys_path)
        # The index file is the completion marker, so it is written last.
        tmp = index_path.with_suffix(".tmp")
        faiss.write_index(index, str(tmp))
        tmp.rename(index_path)
    return ray.get_runtime_context().get_node_id()


def fill_and_merge(work: Path, shard_ids: list[str], tag: str) -> tuple[faiss.Index, list[str]]:
    """Fill every shard in parallel Ray tasks, then merge them in shard order."""
    nodes = ray.get([fill_shard.remote(str(work), sid, tag) for sid in shard_ids])
    merged = faiss.read_index(str(work / f"trained-{tag}.faiss"))
    for sid in shard_ids:
        merge_into(merged, faiss.read_index(str(fill_paths(work, sid, tag)[0])))
    return merged, nodes


def index_fingerprint(comp: Compressor, trained: faiss.Index) -> str:
    """A short tag naming this compressor + trained index pair (content, not file, hash)."""
    h = hashlib.sha256()
    for arr in (comp.mean, comp.std, comp.components):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(serialize(trained).tobytes())
    return h.hexdigest()[:12]
