"""faiss index construction, search and the intrinsic quality checks.

Pure functions over numpy arrays of compressed (unit-norm) keys. Inner product = cosine.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, replace

import faiss
import numpy as np

from dresd.config import IndexConfig

log = logging.getLogger(__name__)

# The on-disk inverted lists' file name; it sits next to index.faiss in a version folder.
IVFDATA = "index.ivfdata"
# k-means wants at least this many training points per centroid (faiss warns below it).
_MIN_POINTS_PER_CENTROID = 39


@dataclass(frozen=True)
class IndexParams:
    """The resolved index layout for one store (recorded in the manifest)."""

    kind: str  # "flat" or "ivfpq"
    dim: int  # vector dimension
    nlist: int  # IVF partitions (0 for flat)
    nprobe: int  # partitions searched by default (0 for flat)
    pq_m: int  # PQ sub-quantizers (0 for flat)
    refine: bool  # exact re-scoring stage present
    refine_k_factor: float  # shortlist size = k * this
    on_disk: bool = False  # inverted lists in index.ivfdata (8-bit PQ, memory-mapped)

    @property
    def factory(self) -> str:
        """The faiss index_factory string for this layout."""
        if self.kind == "flat":
            return "Flat"
        if self.on_disk:  # faiss's on-disk lists hold plain codes, not fast-scan blocks
            return f"IVF{self.nlist},PQ{self.pq_m}"
        return f"IVF{self.nlist},PQ{self.pq_m}x4fs" + (",RFlat" if self.refine else "")

    def to_dict(self) -> dict:
        return asdict(self)


def pq_train_keys(on_disk: bool) -> int:
    """Fewest keys that train an IVF-PQ index: faiss's k-means needs one point per centroid
    of each PQ codebook (16 for the 4-bit fast-scan codes, 256 for on-disk 8-bit codes)."""
    return 2 ** (8 if on_disk else 4)


def forced_ivfpq_keys(cfg: IndexConfig) -> int:
    """The keys a corpus must give when the config forces IVF-PQ (kind ivfpq, or on_disk);
    0 when the layout follows the store's size (auto then falls back to flat)."""
    return pq_train_keys(cfg.on_disk) if cfg.kind == "ivfpq" or cfg.on_disk else 0


def choose_index_params(n_keys: int, cfg: IndexConfig) -> IndexParams:
    """Derive the index layout from the store size unless the config fixes it.

    Flat below `cfg.flat_below` keys (or below what IVF-PQ trains on); otherwise IVF with
    about 5*sqrt(N) partitions (the reference's rule), capped so k-means gets >= 39
    training points per partition. A forced IVF-PQ with too few keys is a ValueError.
    """
    kind = cfg.kind
    if kind == "auto":
        small = n_keys < max(cfg.flat_below, pq_train_keys(cfg.on_disk))
        kind = "flat" if small and not cfg.on_disk else "ivfpq"
    if cfg.on_disk and kind != "ivfpq":
        raise ValueError("index.on_disk needs index.kind ivfpq (or auto)")
    if kind == "flat":
        return IndexParams("flat", cfg.dim, 0, 0, 0, False, 1.0)
    if cfg.dim % cfg.pq_m != 0:
        raise ValueError(f"index.pq_m={cfg.pq_m} must divide index.dim={cfg.dim}")
    train_n = min(n_keys, cfg.sample_size)
    need = pq_train_keys(cfg.on_disk)
    if train_n < need:
        short = f"index.sample_size is {cfg.sample_size}" if n_keys >= need else f"the corpus gives {n_keys} keys"
        raise ValueError(f"an IVF-PQ index{' on disk' if cfg.on_disk else ''} needs at least {need} keys to train "
                         f"its PQ codebooks, but {short}; use index.kind flat (or auto) for a store this small")
    nlist = cfg.nlist or int(5 * math.sqrt(max(n_keys, 1)))
    nlist = max(1, min(nlist, train_n // _MIN_POINTS_PER_CENTROID))
    # ~1/32 of partitions, at least 32; trades search time against recall; docs/speed-study.md#index-defaults-and-size
    nprobe = cfg.nprobe or min(nlist, max(32, nlist // 32))
    refine = cfg.refine and not cfg.on_disk  # exact vectors in RAM would defeat on-disk lists
    return IndexParams("ivfpq", cfg.dim, nlist, nprobe, cfg.pq_m, refine, cfg.refine_k_factor, cfg.on_disk)


def node_memory() -> int:
    """This machine's physical memory in bytes."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def ram_bytes_per_key(params: IndexParams) -> int:
    """Bytes one key takes in RAM in this layout, once merged or opened for search: exact
    vectors (flat, refine: 4 per dimension), 4-bit fast-scan codes and 8-byte ids (IVF-PQ in
    RAM); on-disk lists keep nothing per key in RAM."""
    if params.kind == "flat":
        return 4 * params.dim
    if params.on_disk:
        return 0
    return params.pq_m // 2 + 8 + (4 * params.dim if params.refine else 0)


def plan_index(n_keys: int, cfg: IndexConfig) -> tuple[IndexParams, str]:
    """choose_index_params, plus on-disk lists when the in-RAM index would pass
    cfg.ram_share of the memory (cfg.ram_bytes, or this machine's), and the reason for the
    layout, in words (logged here; builds record it in the manifest)."""
    params = choose_index_params(n_keys, cfg)
    gib = 2**30
    if params.kind == "flat":
        reason = f"flat: {n_keys} keys, fewer than index.flat_below = {cfg.flat_below}: exact search in RAM"
    elif params.on_disk:
        reason = "on-disk inverted lists: index.on_disk is set"
    else:
        ram = cfg.ram_bytes or node_memory()
        need = n_keys * ram_bytes_per_key(params)
        share = f"{need / gib:.2f} GiB in RAM for {n_keys} keys, against {cfg.ram_share:.0%} of {ram / gib:.1f} GiB"
        over = cfg.ram_share > 0 and need > cfg.ram_share * ram
        if over and min(n_keys, cfg.sample_size) >= pq_train_keys(True):
            params = choose_index_params(n_keys, replace(cfg, on_disk=True))
            reason = f"on-disk inverted lists: the in-RAM layout would take {share} (index.ram_share)"
        elif over:  # too few keys to train the on-disk lists' 8-bit codes
            reason = f"in RAM although it would take {share}: on-disk lists train on >= {pq_train_keys(True)} keys"
        else:
            reason = f"in RAM: {share} (index.ram_share)"
    log.info("index layout %s: %s", params.factory, reason)
    return params, reason


def new_index(params: IndexParams) -> faiss.Index:
    """An empty (untrained) inner-product index of the given layout."""
    return faiss.index_factory(params.dim, params.factory, faiss.METRIC_INNER_PRODUCT)


def train_index(params: IndexParams, sample: np.ndarray, seed: int = 0) -> faiss.Index:
    """An empty index trained on `sample` (a no-op for flat indexes)."""
    index = new_index(params)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        ivf.cp.max_points_per_centroid = 256
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    set_search_params(index, params)
    return index


def set_search_params(index: faiss.Index, params: IndexParams, nprobe: int = 0) -> None:
    """Apply nprobe / refine k-factor (defaults from `params`, nprobe overridable)."""
    if params.kind == "flat":
        return
    faiss.extract_index_ivf(index).nprobe = nprobe or params.nprobe
    if params.refine:
        faiss.downcast_index(index).k_factor = params.refine_k_factor


def add_keys(index: faiss.Index, keys: np.ndarray, first_id: int = 0, chunk: int = 65536) -> None:
    """Append keys in chunks with ids first_id, first_id+1, ... (key i of the store has id i).

    A shard filled on its own passes its first key number, so merging keeps ids global.
    Flat indexes hold no ids (id = row): their shards must be merged in order.
    """
    base = faiss.downcast_index(index)
    refine = base if isinstance(base, faiss.IndexRefine) else None
    ivf = faiss.try_extract_index_ivf(refine.base_index if refine else index)
    for start in range(0, len(keys), chunk):
        part = np.ascontiguousarray(keys[start : start + chunk], dtype=np.float32)
        if ivf is None:
            index.add(part)
            continue
        ids = np.arange(first_id + start, first_id + start + len(part), dtype=np.int64)
        if refine is None:
            index.add_with_ids(part, ids)
        else:  # IndexRefine has no add_with_ids: ids on the IVF base, rows on the exact stage
            refine.base_index.add_with_ids(part, ids)
            refine.refine_index.add(part)
            refine.ntotal = refine.base_index.ntotal


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) for (n, d) queries; ids of -1 mean fewer than k results."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if len(q) > 1:
        return index.search(q, min(k, max(index.ntotal, 1)))
    # One query (a decode step) runs on one thread anyway; faiss's thread pool (its own
    # OpenMP runtime, beside torch's) would only be woken, or spin against torch's threads.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(q, min(k, max(index.ntotal, 1)))
    finally:
        faiss.omp_set_num_threads(threads)


def exact_topk(chunks, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by inner product over keys streamed as (first id, keys) chunks.

    Lets the intrinsic check compare against exact search without holding every key.
    """
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for first, keys in chunks:
        if len(keys) == 0:  # a shard whose rows were all rejected
            continue
        flat = faiss.IndexFlatIP(q.shape[1])
        flat.add(np.ascontiguousarray(keys, dtype=np.float32))
        s, i = flat.search(q, min(k, flat.ntotal))
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, i + first], axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
    return best_i


def overlap_at_k(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of `truth` found in the same row of `got`."""
    k = truth.shape[1]
    hits = [len(set(t.tolist()) & set(g.tolist())) / k for t, g in zip(truth, got)]
    return float(np.mean(hits)) if hits else 0.0


def recall_at_k(index: faiss.Index, keys: np.ndarray, queries: np.ndarray, k: int = 50) -> float:
    """Mean overlap of the index's top-k with exact top-k over `keys` (1.0 = exact)."""
    k = min(k, len(keys))
    truth = exact_topk([(0, keys)], queries, k)
    return overlap_at_k(search(index, queries, k)[1], truth)


def self_retrieval_mrr(index: faiss.Index, queries: np.ndarray, own_ids: np.ndarray, k: int = 50) -> float:
    """MRR of stored keys (`queries`, whose ids are `own_ids`) finding themselves in the top-k
    (the reference's self-check)."""
    _, got = search(index, queries, k)
    rr = []
    for own, row in zip(own_ids, got):
        where = np.nonzero(row == own)[0]
        rr.append(1.0 / (where[0] + 1) if len(where) else 0.0)
    return float(np.mean(rr)) if rr else 0.0


def intrinsic_check(index: faiss.Index, chunks, n_keys: int, sample: int, seed: int) -> dict[str, float]:
    """recall@50 of the index vs exact search over the stored keys, and self-retrieval MRR,
    on sampled keys. `chunks()` yields the keys as (first id, keys) chunks, each call anew."""
    ids = np.sort(np.random.default_rng(seed + 1).choice(n_keys, size=min(sample, n_keys), replace=False))
    queries = np.concatenate([keys[ids[(ids >= first) & (ids < first + len(keys))] - first]
                              for first, keys in chunks()])
    k = min(50, n_keys)
    truth = exact_topk(chunks(), queries, k)
    return {
        "recall@50": overlap_at_k(search(index, queries, k)[1], truth),
        "self_mrr@50": self_retrieval_mrr(index, queries, ids, k),
    }


def serialize(index: faiss.Index) -> np.ndarray:
    """Index as a uint8 array (fits the Ray object store)."""
    return faiss.serialize_index(index)


def deserialize(blob: np.ndarray) -> faiss.Index:
    """Inverse of `serialize`."""
    return faiss.deserialize_index(blob)


def append_invlists(dst: faiss.InvertedLists, src: faiss.InvertedLists) -> None:
    """Append every entry of `src` to the end of the same list of `dst` (ids kept), as
    InvertedLists.merge_from does, except where that corrupts memory: faiss's
    BlockInvertedLists.add_entries (fast-scan layouts) copies whole blocks, past the end of
    its buffer, when a list already holds a non-zero multiple of `block_size` entries (it
    compares an entry count with a byte size). Those lists are extended here, entry by entry,
    through the layout's code packer; every other list takes faiss's own path."""
    d, s = faiss.downcast_InvertedLists(dst), faiss.downcast_InvertedLists(src)
    if not isinstance(d, faiss.BlockInvertedLists):
        d.merge_from(s, 0)
        return
    packer, flat = d.packer, np.empty(d.packer.code_size, np.uint8)
    for j in range(d.nlist):
        n, old = s.list_size(j), d.list_size(j)
        if n == 0:
            continue
        if old == 0 or old % d.block_size:
            d.add_entries(j, n, s.get_ids(j), s.get_codes(j))
            continue
        d.resize(j, old + n)  # room for the new entries, in whole blocks
        codes, src_codes = d.get_codes(j), s.get_codes(j)
        for i in range(n):
            packer.unpack_1_c(src_codes, i, faiss.swig_ptr(flat))
            packer.pack_1_c(faiss.swig_ptr(flat), old + i, codes)
        faiss.rev_swig_ptr(d.get_ids(j), old + n)[old:] = faiss.rev_swig_ptr(s.get_ids(j), n)


def append_ivf(dst: faiss.Index, src: faiss.Index) -> None:
    """Append IVF `src`'s list entries (ids kept) to IVF `dst`'s and count them in both the
    IVF and its wrapper; the caller has checked that their lists fit."""
    d, s = faiss.extract_index_ivf(dst), faiss.extract_index_ivf(src)
    append_invlists(d.invlists, s.invlists)
    d.ntotal += s.ntotal
    dst.ntotal = d.ntotal


def merge_into(dst: faiss.Index, src: faiss.Index) -> None:
    """Append every vector of `src` to `dst` (same layout, same training), keeping src's
    ids (global: see add_keys); shards are merged in order for the flat/refine rows."""
    dst_r, src_r = faiss.downcast_index(dst), faiss.downcast_index(src)
    if isinstance(dst_r, faiss.IndexRefine):
        merge_into(dst_r.base_index, src_r.base_index)
        faiss.downcast_index(dst_r.refine_index).merge_from(faiss.downcast_index(src_r.refine_index), 0)
        dst_r.ntotal = dst_r.base_index.ntotal
        return
    if isinstance(dst_r, faiss.IndexFlat):
        dst_r.merge_from(src_r, 0)
        return
    faiss.extract_index_ivf(dst).check_compatible_for_merge(faiss.extract_index_ivf(src))
    append_ivf(dst, src)


def merge_on_disk(empty: faiss.Index, sources: list[faiss.Index], ivfdata: str) -> faiss.Index:
    """Merge the inverted lists of `sources` (ids kept) into file `ivfdata` and attach it to
    the trained, empty IVF index `empty`, which is returned. Codes stream from the sources
    (memory-mapped when read with faiss.IO_FLAG_MMAP) to disk, so the merged lists never
    sit in RAM. Name the file "index.ivfdata": `read_index` finds it next to index.faiss.
    """
    ivf = faiss.extract_index_ivf(empty)
    if ivf.ntotal:
        raise ValueError("merge_on_disk needs an empty trained index")
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
    ptrs = faiss.InvertedListsPtrVector()
    for src in sources:
        ptrs.push_back(faiss.extract_index_ivf(src).invlists)
    # shift_ids=False: ids are already global (and faiss's shift counts per source wrongly
    # when sources differ in size).
    ntotal = lists.merge_from_multiple(ptrs.data(), ptrs.size(), False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    empty.ntotal = ivf.ntotal = ntotal
    return empty


def is_on_disk(index: faiss.Index) -> bool:
    """True when the index's inverted lists live in an .ivfdata file."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def on_disk_file(index: faiss.Index) -> str:
    """The .ivfdata file an on-disk index reads its lists from."""
    return faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename


def empty_copy(index: faiss.Index) -> faiss.Index:
    """A trained, empty copy of `index` with in-memory lists. An on-disk index's data file
    is never opened for writing (resetting a plain copy would truncate a published file)."""
    if not is_on_disk(index):
        out = deserialize(serialize(index))
        out.reset()
        return out
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(serialize(index), reader.data)
    out = faiss.read_index(reader, faiss.IO_FLAG_SKIP_IVF_DATA)
    ivf = faiss.extract_index_ivf(out)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    out.ntotal = ivf.ntotal = 0
    return out


def read_index(path: str) -> faiss.Index:
    """Read a published index, mapping what is large instead of loading it: on-disk lists are
    found next to it (index.ivfdata) and memory-mapped, and so are the exact vectors of a flat
    index or a refine stage (IO_FLAG_MMAP_IFC), so replicas on one node share those pages in
    the page cache. Read-only: nothing that holds the index can write into a published file."""
    # faiss finds on-disk lists only through its plain file reader, which maps nothing else.
    on_disk = os.path.isfile(os.path.join(os.path.dirname(str(path)), IVFDATA))
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if on_disk else faiss.IO_FLAG_MMAP_IFC
    return faiss.read_index(str(path), flags | faiss.IO_FLAG_READ_ONLY)
