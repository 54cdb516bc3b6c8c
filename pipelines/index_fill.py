"""Stages 4-5: train the index once, fill it shard by shard in parallel, merge in order.

Each fill task loads the frozen compressor and the trained empty index, compresses its
shard's hidden states, adds them and writes a shard index plus the compressed keys (used
by the intrinsic check). The driver merges shard indexes in shard order, so id i = key i.
Fill outputs are named by the compressor+index fingerprint: a rerun reuses them only when
the same compressor and training produced them.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil

import faiss
import numpy as np
import ray
from ray.exceptions import GetTimeoutError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dresd.datastore.compression import Compressor, compress, load_compressor, save_compressor
from dresd.datastore.index import IVFDATA, add_keys, deserialize, merge_into, merge_on_disk, serialize
from dresd.storage.faults import fault_point
from pipelines.scratch import Scratch
from pipelines.shards import shard_hidden

CHUNK = 65536
# The longest the driver waits for all shard fills: far above what a fill takes, so only a
# stuck task (a lost node, CPUs that never free up) reaches it, and the build then fails
# naming the unfinished shards instead of hanging. A rerun keeps the fills that finished.
FILL_TIMEOUT_S = 3600.0


def fill_names(sid: str, tag: str, first_id: int = 0) -> tuple[str, str]:
    """(shard index file, compressed keys file) of one shard fill, relative to the scratch."""
    return f"shards/{sid}/index-{tag}-{first_id}.faiss", f"shards/{sid}/keys-{tag}.npy"


@ray.remote(num_cpus=1)
def fill_shard(work: Scratch, sid: str, tag: str, first_id: int) -> str:
    """Compress + encode one shard into its own index file, its keys numbered from
    `first_id` (add_with_ids); returns the node that did it."""
    faiss.omp_set_num_threads(1)
    index_rel, keys_rel = fill_names(sid, tag, first_id)
    if not work.exists(index_rel):
        comp = load_compressor(work.pull(f"compressor-{tag}.npz"))
        index = faiss.read_index(str(work.pull(f"trained-{tag}.faiss")))
        hidden = shard_hidden(work, sid)
        keys = np.empty((len(hidden), comp.out_dim), dtype=np.float32)
        for s in range(0, len(hidden), CHUNK):
            keys[s : s + CHUNK] = compress(comp, np.asarray(hidden[s : s + CHUNK], dtype=np.float32))
        add_keys(index, keys, first_id)
        index_path, keys_path = work.path / index_rel, work.path / keys_rel
        np.save(keys_path.with_suffix(".tmp.npy"), keys)
        keys_path.with_suffix(".tmp.npy").rename(keys_path)
        work.push(keys_rel)
        fault_point("during_index_fill")
        # The index file is the completion marker, so it is written (and pushed) last.
        tmp = index_path.with_suffix(".tmp")
        faiss.write_index(index, str(tmp))
        tmp.rename(index_path)
        work.push(index_rel)
    return ray.get_runtime_context().get_node_id()


def node_round_robin(n: int) -> list:
    """Scheduling strategies for n independent tasks: round-robin over the cluster's alive
    nodes that have CPUs (soft node affinity), or Ray's default on one node.

    Ray's best-effort SPREAD only considers nodes with a CPU free at submission time: when
    another node is still releasing the previous stage's actors, every fill lands on one
    node. Soft affinity waits for the named node's CPU instead (fills are short), and
    falls back to any node if that node dies.
    """
    ids = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1)
    if len(ids) < 2:
        return ["DEFAULT"] * n
    return [NodeAffinitySchedulingStrategy(ids[i % len(ids)], soft=True) for i in range(n)]


def fill_and_merge(work: Scratch, shard_ids: list[str], tag: str, first_ids: list[int],
                   on_disk: bool = False, base: faiss.Index | None = None) -> tuple[faiss.Index, list[str]]:
    """Fill every shard in parallel Ray tasks (shard i's keys numbered from first_ids[i]),
    then merge them in shard order after the keys of `base` (a published index, or None).

    In RAM by default; with `on_disk` the lists are merged into `merged-<tag>-<first id>/index.ivfdata`
    in this node's scratch folder without loading them (the returned index reads that file).
    """
    places = node_round_robin(len(shard_ids))
    refs = [fill_shard.options(scheduling_strategy=place).remote(work, sid, tag, first)
            for sid, first, place in zip(shard_ids, first_ids, places)]
    try:
        nodes = ray.get(refs, timeout=FILL_TIMEOUT_S)
    except GetTimeoutError:
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        late = [sid for sid, ref in zip(shard_ids, refs) if ref not in done]
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        raise TimeoutError(f"index fill: {len(late)} shard(s) not filled within {FILL_TIMEOUT_S:g} s "
                           f"(pipelines.index_fill.FILL_TIMEOUT_S), e.g. {late[:3]}; a rerun keeps the "
                           f"finished ones") from None
    trained = faiss.read_index(str(work.pull(f"trained-{tag}.faiss")))
    shard_files = [str(work.pull(fill_names(sid, tag, first)[0])) for sid, first in zip(shard_ids, first_ids)]
    if on_disk:
        # MMAP: the shard lists are read from disk as they are merged, never loaded whole.
        shards = [faiss.read_index(f, faiss.IO_FLAG_MMAP) for f in shard_files]
        out = work.path / f"merged-{tag}-{first_ids[0] if first_ids else 0}"
        shutil.rmtree(out, ignore_errors=True)  # a crashed merge leaves a partial file
        out.mkdir(parents=True)
        fault_point("during_merge")
        merged = merge_on_disk(trained, ([base] if base is not None else []) + shards, str(out / IVFDATA))
        return merged, nodes
    merged = trained
    if base is not None:
        # merge_into empties its source: a published index is memory-mapped read-only
        # (dresd.datastore.index.read_index), so the merge takes an in-memory copy of it.
        merge_into(merged, deserialize(serialize(base)))
    for i, f in enumerate(shard_files):
        merge_into(merged, faiss.read_index(f))
        if i == 0:
            fault_point("during_merge")
    return merged, nodes


def save_trained(work: Scratch, comp: Compressor, trained: faiss.Index) -> str:
    """Write the frozen compressor and the trained empty index where fill tasks find them;
    returns their fingerprint tag."""
    tag = index_fingerprint(comp, trained)
    save_compressor(comp, work.path / f"compressor-{tag}.npz")
    faiss.write_index(trained, str(work.path / f"trained-{tag}.faiss"))
    work.push(f"compressor-{tag}.npz")
    work.push(f"trained-{tag}.faiss")
    return tag


def index_fingerprint(comp: Compressor, trained: faiss.Index) -> str:
    """A short tag naming this compressor + trained index pair (content, not file, hash)."""
    h = hashlib.sha256()
    for arr in (comp.mean, comp.std, comp.components):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(serialize(trained).tobytes())
    return h.hexdigest()[:12]
