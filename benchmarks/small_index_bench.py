#!/usr/bin/env python
"""Small stores: one decode-step search, exact flat index against the IVF-PQ layout, by size.

A script, never imported by the library. A decoding step searches the datastore once, from
caches a forward has just flushed; an exact index streams every key per query, IVF-PQ reads
nprobe lists of 4-bit codes and re-scores a shortlist. This prints, for stores of growing
size cut from a real store's keys (the first N, read back from its flat index), the
per-query time of both (top_k 50, one faiss thread, a cache-sized sweep before each query)
and the IVF-PQ recall@50 against exact search, so `index.flat_below` can sit where IVF-PQ
starts to pay (docs/index-layout.md#small-stores).

    .venv/bin/python benchmarks/small_index_bench.py --datastore runs/s26/stores/id
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dresd.config import IndexConfig  # noqa: E402
from dresd.datastore.index import add_keys, choose_index_params, overlap_at_k, search, train_index  # noqa: E402
from dresd.datastore.store import Datastore  # noqa: E402

# Swept before each query: past the last-level cache, as a decode step's weights are.
EVICT_BYTES = 64 * 2**20


def per_query_ms(index, queries: np.ndarray, k: int, evict: np.ndarray | None) -> float:
    """Median milliseconds of one single-query search."""
    times = []
    for q in queries:
        if evict is not None:
            evict.sum()
        t = time.perf_counter()
        search(index, q[None], k)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore", required=True, help="a datastore with a flat index (its keys are read back)")
    p.add_argument("--sizes", default="2000,4000,8000,16000,34000", help="store sizes (keys), comma list")
    p.add_argument("--queries", type=int, default=300, help="queries: real keys plus noise")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--warm", action="store_true", help="no cache sweep before each query")
    args = p.parse_args(argv)

    flat = Datastore(args.datastore).index
    if not isinstance(flat, faiss.IndexFlat):
        raise SystemExit(f"{args.datastore}: its index is not flat ({type(flat).__name__}); its keys cannot be read back")
    keys = flat.reconstruct_n(0, flat.ntotal)
    rng = np.random.default_rng(0)
    evict = None if args.warm else np.ones(EVICT_BYTES // 8)
    print(f"{args.datastore}: {len(keys)} keys of dim {keys.shape[1]}; top-{args.top_k}, one faiss thread, "
          f"{'warm' if args.warm else 'cold'} caches\n")
    print("| keys | IVF-PQ layout | flat ms | IVF-PQ ms | IVF-PQ / flat | recall@50 |")
    print("|---|---|---|---|---|---|")
    for n in [int(s) for s in args.sizes.split(",")]:
        part = np.ascontiguousarray(keys[: min(n, len(keys))])
        q = part[rng.choice(len(part), args.queries)] + 0.05 * rng.standard_normal((args.queries, part.shape[1]))
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        exact = faiss.IndexFlatIP(part.shape[1])
        exact.add(part)
        params = choose_index_params(len(part), replace(IndexConfig(dim=part.shape[1]), kind="ivfpq"))
        ivf = train_index(params, part)
        add_keys(ivf, part)
        _, truth = exact.search(q, args.top_k)
        _, got = ivf.search(q, args.top_k)
        recall = overlap_at_k(got, truth)
        # Interleaved, twice each: the machine's drift falls on both.
        f1, i1, f2, i2 = (per_query_ms(ix, q, args.top_k, evict) for ix in (exact, ivf, exact, ivf))
        fm, im = (f1 + f2) / 2, (i1 + i2) / 2
        print(f"| {len(part)} | {params.factory} nprobe {params.nprobe} | {fm:.3f} | {im:.3f} | {im / fm:.2f}x | {recall:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
