"""The codec every shard is encoded with, and the merge of encoded shards into one index.

The codec comes in two parts, each saved once in the work folder under its fingerprint: the
compressor (`ctag`), fitted before the streaming pass (fit.py; an update takes its parent's),
which the embedding actors apply; and the trained, empty index (`tag`, naming compressor and
training together), trained after the pass on a uniform sample of the stored keys (an update
takes its parent's index emptied). The code pass (encode.py) turns each shard's stored keys
into IVF codes with global ids (`encode_codes`); the driver merges the shards in shard order,
so id i = key i. A codes file carries the shard's inverted lists only: the coarse quantizer
is the trained index's, the same in every shard, so the merge appends lists and never reads it.
"""

from __future__ import annotations

import hashlib
import shutil
from functools import lru_cache

import faiss
import numpy as np

from dresd.datastore.compression import Compressor, load_compressor, save_compressor
from dresd.datastore.index import IVFDATA, append_ivf, deserialize, merge_into, merge_on_disk, serialize
from dresd.storage.faults import fault_point
from pipelines.scratch import Scratch
from pipelines.shards import codes_name, shard_keys, write_codes


def compressor_fingerprint(comp: Compressor) -> str:
    """A short tag naming a compressor by content (keys-<ctag>.npy hold what it made)."""
    h = hashlib.sha256()
    for arr in (comp.mean, comp.std, comp.components):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:12]


def index_fingerprint(comp: Compressor, trained: faiss.Index) -> str:
    """A short tag naming this compressor + trained index pair (content, not file, hash)."""
    h = hashlib.sha256(compressor_fingerprint(comp).encode())
    h.update(serialize(trained).tobytes())
    return h.hexdigest()[:12]


def save_compressor_codec(work: Scratch, comp: Compressor) -> str:
    """Write the frozen compressor where the embedding actors find it; returns its ctag."""
    ctag = compressor_fingerprint(comp)
    save_compressor(comp, work.path / f"compressor-{ctag}.npz")
    work.push(f"compressor-{ctag}.npz")
    return ctag


def save_trained(work: Scratch, comp: Compressor, trained: faiss.Index) -> str:
    """Write the trained empty index where the code pass finds it; returns the codec's tag."""
    tag = index_fingerprint(comp, trained)
    faiss.write_index(trained, str(work.path / f"trained-{tag}.faiss"))
    work.push(f"trained-{tag}.faiss")
    return tag


@lru_cache(maxsize=4)
def _compressor(location: str, ctag: str) -> Compressor:
    return load_compressor(Scratch(location).pull(f"compressor-{ctag}.npz"))


@lru_cache(maxsize=2)
def _trained(location: str, tag: str) -> np.ndarray:
    return serialize(faiss.read_index(str(Scratch(location).pull(f"trained-{tag}.faiss"))))


def load_compressor_codec(work: Scratch, ctag: str) -> Compressor:
    """The compressor `ctag` of this work folder; read once per process."""
    return _compressor(work.location, ctag)


def load_trained(work: Scratch, tag: str) -> faiss.Index:
    """A fresh copy of the trained empty index `tag`; the file is read once per process."""
    return deserialize(_trained(work.location, tag))


def ivf_part(index: faiss.Index) -> faiss.Index | None:
    """The IVF index inside `index` (the base of a refine stage), or None for a flat index."""
    r = faiss.downcast_index(index)
    part = r.base_index if isinstance(r, faiss.IndexRefine) else index
    return part if faiss.try_extract_index_ivf(part) is not None else None


def encode_codes(trained: faiss.Index, keys: np.ndarray, first_id: int) -> np.ndarray | None:
    """The IVF codes of `keys`, ids first_id, first_id+1, ..., as a serialized IVF index
    whose coarse quantizer is left empty (None for a flat layout: the keys are its vectors)."""
    part = ivf_part(trained)
    if part is None:
        return None
    shard = deserialize(serialize(part))
    ids = np.arange(first_id, first_id + len(keys), dtype=np.int64)
    if len(keys):
        shard.add_with_ids(np.ascontiguousarray(keys, dtype=np.float32), ids)
    ivf = faiss.extract_index_ivf(shard)
    real, empty, owned = ivf.quantizer, faiss.IndexFlat(ivf.d, ivf.metric_type), ivf.own_fields
    # Swapped for the write only (ownership off so neither quantizer is freed twice): the
    # centroids are nlist x dim floats, as large as a shard's codes for a small shard.
    ivf.own_fields, ivf.quantizer = False, empty
    try:
        return serialize(shard)
    finally:
        ivf.quantizer, ivf.own_fields = real, owned


def code_shard(work: Scratch, sid: str, ctag: str, tag: str, first_id: int, trained: faiss.Index) -> str:
    """The shard's codes file for codec `tag`, numbered from `first_id`: encoded from its stored
    keys unless a finished one is there already (a rerun, or an update whose parent moved)."""
    name = codes_name(tag, first_id)
    if not work.exists(f"shards/{sid}/{name}"):
        codes = encode_codes(trained, np.asarray(shard_keys(work, sid, ctag), np.float32), first_id)
        write_codes(work, sid, name, codes)
    return str(work.pull(f"shards/{sid}/{name}"))


def append_lists(dst: faiss.Index, src: faiss.Index) -> None:
    """Move every inverted-list entry of IVF `src` (ids kept) to the end of IVF `dst`'s lists,
    without comparing their quantizers (a codes file carries an empty one)."""
    d, s = faiss.extract_index_ivf(dst), faiss.extract_index_ivf(src)
    if (d.nlist, d.code_size) != (s.nlist, s.code_size):
        raise ValueError(f"shard codes of {s.nlist} lists x {s.code_size} B do not fit an index of "
                         f"{d.nlist} lists x {d.code_size} B")
    append_ivf(dst, src)


def clear_block_padding(index: faiss.Index) -> None:
    """Zero the unused slots of every list's last block of a fast-scan (4-bit) IVF index. faiss
    leaves them as whatever memory the block got, which differs between runs (and between a
    resumed build and an uninterrupted one) though no search reads it: zeroed, the same keys
    give the same index file."""
    part = ivf_part(index)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(part).invlists) if part is not None else None
    if not isinstance(lists, faiss.BlockInvertedLists):
        return
    zero = np.zeros(lists.packer.code_size, np.uint8)
    for i in range(lists.nlist):
        n = lists.list_size(i)
        full = -(-n // lists.n_per_block) * lists.n_per_block
        if full > n:
            codes = faiss.rev_swig_ptr(lists.get_codes(i), full // lists.n_per_block * lists.block_size)
            for slot in range(n, full):
                lists.packer.pack_1_c(faiss.swig_ptr(zero), slot, faiss.swig_ptr(codes))


def merge_shards(work: Scratch, shard_ids: list[str], ctag: str, tag: str, first_ids: dict[str, int],
                 on_disk: bool = False, base: faiss.Index | None = None) -> faiss.Index:
    """The trained index `tag` filled with every shard's keys (made by compressor `ctag`), in
    shard order, after the keys of `base` (a published index, or None). Codes the code pass
    left out are encoded here.

    In RAM by default; with `on_disk` the lists are merged into `merged-<tag>-<first id>/index.ivfdata`
    in this node's scratch folder without loading them (the returned index reads that file).
    """
    merged = load_trained(work, tag)
    part = ivf_part(merged)
    refine = faiss.downcast_index(merged) if part is not None and part is not merged else None
    codes = {} if part is None else {s: code_shard(work, s, ctag, tag, first_ids[s], merged) for s in shard_ids}
    if on_disk:
        # MMAP: the shard lists are read from disk as they are merged, never loaded whole.
        shards = [faiss.read_index(codes[s], faiss.IO_FLAG_MMAP) for s in shard_ids]
        out = work.path / f"merged-{tag}-{first_ids[shard_ids[0]] if shard_ids else 0}"
        shutil.rmtree(out, ignore_errors=True)  # a crashed merge leaves a partial file
        out.mkdir(parents=True)
        fault_point("during_merge")
        return merge_on_disk(merged, ([base] if base is not None else []) + shards, str(out / IVFDATA))
    if base is not None:
        # merge_into empties its source: a published index is memory-mapped read-only
        # (dresd.datastore.index.read_index), so the merge takes an in-memory copy of it.
        merge_into(merged, deserialize(serialize(base)))
    for i, sid in enumerate(shard_ids):
        if part is not None:
            append_lists(part, faiss.read_index(codes[sid]))
        if part is None or refine is not None:  # the exact vectors, in key order
            exact = merged if refine is None else refine.refine_index
            exact.add(np.asarray(shard_keys(work, sid, ctag), dtype=np.float32))
        if refine is not None:
            refine.ntotal = part.ntotal
        if i == 0:
            fault_point("during_merge")
    clear_block_padding(merged)
    return merged
