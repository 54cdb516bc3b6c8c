"""Tests for dresd.datastore.index: layout choice, training, search and the intrinsic checks."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
from faiss.contrib.datasets import SyntheticDataset

from dresd.config import IndexConfig
from dresd.datastore.index import (
    IndexParams,
    add_keys,
    choose_index_params,
    deserialize,
    merge_into,
    recall_at_k,
    search,
    self_retrieval_mrr,
    serialize,
    set_search_params,
    train_index,
)

N = 20_000
DIM = 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def single_omp_thread():
    """One OpenMP thread: with 2 cores and any other load, faiss' spinning OpenMP threads
    make k-means ~20x slower; results do not depend on the thread count."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def clustered():
    """Unit vectors around 200 cluster centres (like LLM hidden states): keys and queries."""
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(200, DIM)))
    keys = unit(centres[rng.integers(0, 200, N)] + 0.15 * rng.normal(size=(N, DIM)))
    queries = unit(centres[rng.integers(0, 200, 200)] + 0.15 * rng.normal(size=(200, DIM)))
    return keys, queries


@pytest.fixture(scope="module")
def ivf(clustered):
    keys, _ = clustered
    params = choose_index_params(len(keys), IndexConfig(dim=DIM, flat_below=1000))
    index = train_index(params, keys, seed=0)
    add_keys(index, keys, chunk=7000)  # several chunks
    return params, index


# ---------------------------------------------------------------- choose_index_params


def test_flat_below_threshold_and_ivfpq_above():
    cfg = IndexConfig(dim=64, flat_below=50_000)
    flat = choose_index_params(49_999, cfg)
    assert flat == IndexParams("flat", 64, 0, 0, 0, False, 1.0)
    assert flat.factory == "Flat"
    big = choose_index_params(50_000, cfg)
    assert big.kind == "ivfpq" and big.dim == 64 and big.pq_m == 32
    assert big.refine and big.refine_k_factor == 5.0


def test_nlist_is_about_5_sqrt_n():
    cfg = IndexConfig(dim=64, flat_below=0)
    for n in (100_000, 1_000_000):
        p = choose_index_params(n, cfg)
        assert p.nlist == int(5 * math.sqrt(n))
    # 4M keys would want 10k partitions; the 200k training sample allows 200000 // 39.
    assert choose_index_params(4_000_000, cfg).nlist == cfg.sample_size // 39


def test_nlist_capped_by_training_points():
    # 20k keys: 5*sqrt(20k) = 707 partitions, but only 20k training points -> 20000 // 39.
    p = choose_index_params(20_000, IndexConfig(dim=64, flat_below=0))
    assert p.nlist == 20_000 // 39 == 512
    # The training sample, not the store, bounds it: 10M keys, 50k sample.
    p = choose_index_params(10_000_000, IndexConfig(dim=64, flat_below=0, sample_size=50_000))
    assert p.nlist == 50_000 // 39
    # Even an explicit nlist is capped.
    p = choose_index_params(20_000, IndexConfig(dim=64, flat_below=0, nlist=5000))
    assert p.nlist == 512
    # Tiny stores still get one partition (16 keys: the fewest its PQ codebooks train on).
    assert choose_index_params(16, IndexConfig(dim=64, kind="ivfpq")).nlist == 1


def test_default_nprobe():
    cfg = IndexConfig(dim=64, flat_below=0)
    p = choose_index_params(1_000_000, cfg)  # nlist 5000 -> 1/16 = 312
    assert p.nlist == 5000 and p.nprobe == 5000 // 32
    p = choose_index_params(100_000, cfg)  # nlist 1581 -> 1/16 = 98
    assert p.nlist == 1581 and p.nprobe == 49
    p = choose_index_params(20_000, cfg)  # nlist 512 -> 1/16 = 32
    assert p.nprobe == 32
    p = choose_index_params(10_000, cfg)  # nlist 256 -> 1/16 < 32 -> 32
    assert p.nlist == 256 and p.nprobe == 32
    p = choose_index_params(1000, cfg)  # nlist 25 < 32 -> all partitions
    assert p.nlist == 25 and p.nprobe == 25


def test_pq_m_must_divide_dim():
    with pytest.raises(ValueError, match="pq_m=24 must divide index.dim=64"):
        choose_index_params(100_000, IndexConfig(dim=64, flat_below=0, pq_m=24))
    assert choose_index_params(100_000, IndexConfig(dim=48, flat_below=0, pq_m=24)).pq_m == 24


def test_explicit_overrides_respected():
    cfg = IndexConfig(dim=32, kind="ivfpq", flat_below=10**9, nlist=100, nprobe=7, pq_m=16, refine=False,
                      refine_k_factor=3.0)
    p = choose_index_params(100_000, cfg)
    assert p == IndexParams("ivfpq", 32, 100, 7, 16, False, 3.0)
    assert p.factory == "IVF100,PQ16x4fs"
    # kind="flat" wins over a large store.
    assert choose_index_params(10**7, IndexConfig(kind="flat")).kind == "flat"


def test_factory_strings_build():
    p = IndexParams("ivfpq", 64, 256, 32, 32, True, 5.0)
    assert p.factory == "IVF256,PQ32x4fs,RFlat"
    assert p.to_dict()["nlist"] == 256
    assert IndexParams(**p.to_dict()) == p
    for params in (p, IndexParams("flat", 64, 0, 0, 0, False, 1.0)):
        index = faiss.index_factory(params.dim, params.factory, faiss.METRIC_INNER_PRODUCT)
        assert index.d == 64 and index.metric_type == faiss.METRIC_INNER_PRODUCT


# ---------------------------------------------------------------- training and search


def test_ivfpq_recall_with_refine(clustered, ivf):
    keys, queries = clustered
    params, index = ivf
    assert params.kind == "ivfpq" and params.refine
    assert index.ntotal == N
    ivf_part = faiss.extract_index_ivf(index)
    assert ivf_part.nlist == params.nlist and ivf_part.nprobe == params.nprobe
    assert faiss.downcast_index(index).k_factor == params.refine_k_factor
    assert recall_at_k(index, keys, queries, k=50) >= 0.9


def test_refine_stage_improves_recall(clustered):
    keys, queries = clustered
    no_refine = choose_index_params(len(keys), IndexConfig(dim=DIM, flat_below=1000, refine=False))
    index = train_index(no_refine, keys)
    add_keys(index, keys)
    plain = recall_at_k(index, keys, queries, k=50)
    refined_params = choose_index_params(len(keys), IndexConfig(dim=DIM, flat_below=1000))
    refined = train_index(refined_params, keys)
    add_keys(refined, keys)
    assert recall_at_k(refined, keys, queries, k=50) > plain + 0.1


def test_recall_on_faiss_synthetic_dataset_and_nprobe():
    ds = SyntheticDataset(DIM, 0, N, 200, metric="IP", seed=0)
    keys, queries = unit(ds.get_database()), unit(ds.get_queries())
    params = choose_index_params(len(keys), IndexConfig(dim=DIM, flat_below=1000))
    index = train_index(params, keys)
    add_keys(index, keys)
    low = recall_at_k(index, keys, queries, k=50)
    set_search_params(index, params, nprobe=params.nlist // 4)
    assert faiss.extract_index_ivf(index).nprobe == params.nlist // 4
    high = recall_at_k(index, keys, queries, k=50)
    assert high >= 0.9
    assert high > low


def test_flat_index_is_exact(clustered):
    keys, queries = clustered
    params = choose_index_params(len(keys), IndexConfig(dim=DIM, kind="flat"))
    assert params.kind == "flat"
    index = train_index(params, keys)
    add_keys(index, keys)
    assert recall_at_k(index, keys, queries, k=50) == 1.0


def test_self_retrieval_mrr_distinct_random_vectors():
    rng = np.random.default_rng(1)
    keys = unit(rng.normal(size=(N, DIM)))
    params = choose_index_params(len(keys), IndexConfig(dim=DIM, flat_below=1000))
    index = train_index(params, keys)
    add_keys(index, keys)
    ids = rng.choice(len(keys), 300, replace=False)
    assert self_retrieval_mrr(index, keys[ids], ids) > 0.98
    # An index over other vectors never finds the key: MRR 0.
    other = train_index(IndexParams("flat", DIM, 0, 0, 0, False, 1.0), keys)
    add_keys(other, keys[::-1].copy())
    mrr = self_retrieval_mrr(other, keys[:10], np.arange(10))
    assert mrr == pytest.approx(0.0)


def test_search_returns_sorted_scores_and_ids(ivf, clustered):
    keys, queries = clustered
    _, index = ivf
    scores, ids = search(index, queries[:5], 10)
    assert scores.shape == ids.shape == (5, 10)
    assert (ids >= 0).all() and (ids < N).all()
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # A single 1-D query works too: on one faiss thread, with the thread count restored.
    threads = faiss.omp_get_max_threads()
    s1, i1 = search(index, queries[0], 10)
    assert i1.shape == (1, 10)
    np.testing.assert_array_equal(i1[0], ids[0])
    assert faiss.omp_get_max_threads() == threads


def test_serialize_round_trip_same_results(ivf, clustered):
    keys, queries = clustered
    params, index = ivf
    blob = serialize(index)
    assert isinstance(blob, np.ndarray) and blob.dtype == np.uint8
    back = deserialize(blob)
    assert back.ntotal == index.ntotal
    assert faiss.extract_index_ivf(back).nprobe == params.nprobe
    s0, i0 = search(index, queries, 50)
    s1, i1 = search(back, queries, 50)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(s0, s1, atol=1e-6)


def test_search_with_k_above_ntotal():
    rng = np.random.default_rng(2)
    keys = unit(rng.normal(size=(5, DIM)))
    index = train_index(IndexParams("flat", DIM, 0, 0, 0, False, 1.0), keys)
    add_keys(index, keys)
    scores, ids = search(index, keys[:2], 50)
    assert ids.shape == (2, 5)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]
    assert ids[0, 0] == 0 and ids[1, 0] == 1
    # An empty index answers with no hits (id -1), not an error.
    empty = train_index(IndexParams("flat", DIM, 0, 0, 0, False, 1.0), keys)
    _, ids = search(empty, keys[:2], 50)
    assert (ids == -1).all()
    # recall_at_k clamps k to the number of keys.
    assert recall_at_k(index, keys, keys, k=50) == 1.0


def test_exact_topk_streamed_equals_one_chunk_and_merge_into():
    from dresd.datastore.index import exact_topk, merge_into, overlap_at_k, serialize, deserialize

    rng = np.random.default_rng(3)
    keys = unit(rng.normal(size=(3000, DIM)))
    q = unit(rng.normal(size=(20, DIM)))
    whole = exact_topk([(0, keys)], q, 50)
    chunks = [(s, keys[s : s + 700]) for s in range(0, 3000, 700)]
    # Same neighbour sets (order may differ only between fp32-equal scores).
    assert overlap_at_k(exact_topk(chunks, q, 50), whole) == 1.0
    # Shards filled separately from one trained index and merged in order == one fill.
    params = choose_index_params(3000, IndexConfig(dim=DIM, pq_m=16, flat_below=1000))
    blob = serialize(train_index(params, keys))
    full = deserialize(blob)
    add_keys(full, keys)
    merged = deserialize(blob)
    for s, part in chunks:
        shard = deserialize(blob)
        add_keys(shard, part, first_id=s)  # ids are global: key s.. of the store
        merge_into(merged, shard)
    set_search_params(full, params)
    set_search_params(merged, params)
    assert merged.ntotal == 3000
    assert np.array_equal(search(full, q, 50)[1], search(merged, q, 50)[1])


@pytest.mark.parametrize("refine", [False, True])
def test_shards_merged_out_of_order_keep_their_ids(refine):
    from dresd.datastore.index import deserialize, merge_into, serialize

    rng = np.random.default_rng(5)
    keys = unit(rng.normal(size=(3000, DIM)))
    params = choose_index_params(3000, IndexConfig(dim=DIM, pq_m=16, flat_below=1000, refine=refine))
    blob = serialize(train_index(params, keys))
    merged = deserialize(blob)
    if not refine:  # IVF ids are global, so even a reversed merge order finds key i as id i
        for s in (2000, 1000, 0):
            shard = deserialize(blob)
            add_keys(shard, keys[s : s + 1000], first_id=s)
            merge_into(merged, shard)
    else:  # the exact stage's rows have no ids: shards go in order
        for s in (0, 1000, 2000):
            shard = deserialize(blob)
            add_keys(shard, keys[s : s + 1000], first_id=s)
            merge_into(merged, shard)
    set_search_params(merged, params)
    _, ids = search(merged, keys[::100], 1)
    assert (ids[:, 0] == np.arange(0, 3000, 100)).mean() > 0.9


def test_on_disk_merge_equals_in_memory_and_copies_never_touch_the_file(tmp_path):
    import faiss

    from dresd.datastore.index import IVFDATA, deserialize, empty_copy, is_on_disk, merge_into, merge_on_disk, read_index, serialize

    rng = np.random.default_rng(6)
    keys = unit(rng.normal(size=(4000, DIM)))
    params = choose_index_params(4000, IndexConfig(dim=DIM, pq_m=16, flat_below=100_000, on_disk=True))
    assert params.kind == "ivfpq" and not params.refine and params.factory == f"IVF{params.nlist},PQ16"
    blob = serialize(train_index(params, keys))
    memory = deserialize(blob)
    files = []
    for s in (0, 1500, 2500):  # unequal shards
        shard = deserialize(blob)
        n = {0: 1500, 1500: 1000, 2500: 1000}[s]
        add_keys(shard, keys[s : s + n], first_id=s)
        faiss.write_index(shard, str(tmp_path / f"s{s}.faiss"))
        merge_into(memory, shard)  # (merge_from moves the entries out of `shard`)
        files.append(str(tmp_path / f"s{s}.faiss"))
    (tmp_path / "v").mkdir()
    shards = [faiss.read_index(f, faiss.IO_FLAG_MMAP) for f in files]
    disk = merge_on_disk(deserialize(blob), shards, str(tmp_path / "v" / IVFDATA))
    faiss.write_index(disk, str(tmp_path / "v" / "index.faiss"))
    (tmp_path / "moved").mkdir()  # a published version folder is renamed: the data file follows
    for name in ("index.faiss", IVFDATA):
        (tmp_path / "v" / name).rename(tmp_path / "moved" / name)
    opened = read_index(tmp_path / "moved" / "index.faiss")
    assert is_on_disk(opened) and opened.ntotal == 3500 and not is_on_disk(memory)
    # A published version's lists are mapped read-only: nothing holding the index can write them.
    assert faiss.downcast_InvertedLists(faiss.extract_index_ivf(opened).invlists).read_only
    for idx in (memory, opened):
        set_search_params(idx, params)
    q = keys[::50]
    assert np.array_equal(search(memory, q, 20)[1], search(opened, q, 20)[1])

    before = (tmp_path / "moved" / IVFDATA).read_bytes()
    empty = empty_copy(opened)
    assert empty.ntotal == 0 and not is_on_disk(empty)
    # An update: the published lists plus a new shard, into a new file.
    new = deserialize(blob)
    add_keys(new, keys[3500:], first_id=3500)
    (tmp_path / "v2").mkdir()
    updated = merge_on_disk(empty, [opened, new], str(tmp_path / "v2" / IVFDATA))
    merge_into(memory, new)
    set_search_params(updated, params)
    assert updated.ntotal == 4000
    assert np.array_equal(search(memory, q, 20)[1], search(updated, q, 20)[1])
    assert (tmp_path / "moved" / IVFDATA).read_bytes() == before  # the old version is untouched
    with pytest.raises(ValueError, match="needs index.kind ivfpq"):
        choose_index_params(100, IndexConfig(dim=DIM, kind="flat", on_disk=True))


# ---------------------------------------------------------------- plan_index: layout by store size

def test_plan_index_keeps_small_stores_in_ram_and_says_why():
    from dresd.datastore.index import plan_index

    params, why = plan_index(1000, IndexConfig(dim=64))
    assert params.kind == "flat" and why.startswith("flat: 1000 keys, fewer than index.flat_below")
    params, why = plan_index(100_000, IndexConfig(dim=64, ram_bytes=2**30))
    # 100k keys x (16 B codes + 8 B ids + 256 B refine vectors) = 0.03 GiB, under 25% of 1 GiB
    assert params.refine and not params.on_disk and why == "in RAM: 0.03 GiB in RAM for 100000 keys, against 25% of 1.0 GiB (index.ram_share)"
    assert plan_index(100_000, IndexConfig(dim=64, on_disk=True))[1] == "on-disk inverted lists: index.on_disk is set"


def test_plan_index_puts_lists_on_disk_when_the_ram_layout_outgrows_its_share():
    from dresd.datastore.index import plan_index, ram_bytes_per_key

    cfg = IndexConfig(dim=64, ram_bytes=2**30, ram_share=0.25)  # 256 MiB for the index
    fits = (2**28) // (16 + 8 + 256)
    assert not plan_index(fits, cfg)[0].on_disk
    params, why = plan_index(fits + 1, cfg)
    assert params.on_disk and not params.refine and params.factory == f"IVF{params.nlist},PQ32"
    assert why.startswith("on-disk inverted lists: the in-RAM layout would take 0.25 GiB in RAM for")
    assert ram_bytes_per_key(params) == 0
    # Compact (no refine): 24 B a key, so ten times as many keys stay in RAM.
    assert not plan_index(10 * fits, IndexConfig(dim=64, ram_bytes=2**30, refine=False))[0].on_disk
    assert not plan_index(fits + 1, IndexConfig(dim=64, ram_bytes=2**30, ram_share=0))[0].on_disk  # 0 = never
    # Too few keys to train on-disk codes: stays in RAM, and says so.
    params, why = plan_index(200, IndexConfig(dim=64, flat_below=0, ram_bytes=1000))
    assert not params.on_disk and "on-disk lists train on >= 256 keys" in why


@pytest.mark.parametrize("layout", ["flat", "refine"])
def test_read_index_maps_the_exact_vectors_instead_of_loading_them(tmp_path, layout):
    """A replica opens the published file mapped (shared page cache, no private copy of
    the vectors), and searches it as the index it was written from."""
    from dresd.datastore.index import read_index

    keys = unit(np.random.default_rng(3).normal(size=(3000, DIM)))
    cfg = IndexConfig(dim=DIM, pq_m=16, flat_below=10_000 if layout == "flat" else 0)
    params = choose_index_params(len(keys), cfg)
    index = train_index(params, keys)
    add_keys(index, keys)
    path = tmp_path / "index.faiss"
    faiss.write_index(index, str(path))
    opened = read_index(path)
    set_search_params(opened, params)
    maps = open("/proc/self/maps").read()
    assert str(path) in maps  # mapped, not read into private memory
    q = keys[::40]
    assert np.array_equal(search(index, q, 10)[1], search(opened, q, 10)[1])
    del opened


def _list_entries(index: faiss.Index) -> list[tuple[list[int], list[bytes]]]:
    """Every inverted list's ids and codes (unpacked from fast-scan blocks), list by list."""
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    out = []
    for j in range(lists.nlist):
        n = lists.list_size(j)
        ids = faiss.rev_swig_ptr(lists.get_ids(j), n).tolist() if n else []
        codes = []
        for i in range(n):
            flat = np.empty(lists.packer.code_size, np.uint8)
            lists.packer.unpack_1_c(lists.get_codes(j), i, faiss.swig_ptr(flat))
            codes.append(flat.tobytes())
        out.append((ids, codes))
    return out


@pytest.mark.parametrize("merge", ["merge_into", "append_lists"])
def test_fast_scan_lists_merge_across_whole_blocks(merge):
    """faiss's BlockInvertedLists.add_entries writes past its buffer when a list already holds
    a multiple of block_size entries (a 1M-token build aborted in its merge): shards whose
    sizes land the one list on 0, 1, 2 and 3 block_size entries merge into exactly the index
    filled in one go."""
    from pipelines.merge import append_lists

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    trained = faiss.index_factory(16, "IVF1,PQ8x4fs")  # one list: every shard lands in it
    trained.train(x)
    block = faiss.downcast_InvertedLists(faiss.extract_index_ivf(trained).invlists).block_size
    bounds = [0, block, 2 * block, 3 * block, 3 * block + 40]

    def filled(lo, hi):
        index = deserialize(serialize(trained))
        index.add_with_ids(x[lo:hi], np.arange(lo, hi))
        return index

    merged = filled(0, 0)
    for lo, hi in zip(bounds, bounds[1:]):
        if merge == "merge_into":
            merge_into(merged, filled(lo, hi))
        else:
            append_lists(merged, filled(lo, hi))
    whole = filled(0, bounds[-1])
    assert merged.ntotal == whole.ntotal == bounds[-1]
    assert _list_entries(merged) == _list_entries(whole)
    np.testing.assert_array_equal(merged.search(x[:50], 10)[1], whole.search(x[:50], 10)[1])
