"""Bytes on disk per datastore token of a REAL store, everything in the version folder counted.

    .venv/bin/python benchmarks/store_bytes_bench.py --datastore runs/bench/stores/id

The store's parts are re-published with `dresd.datastore.publish.publish` twice: with its own index
(IVF-PQ + exact refine vectors) and with the compact PQ-only base index (goal: <= 32
B/token for the compact variant on a >= 200k-token store).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from dresd.datastore.store import Datastore  # noqa: E402
from dresd.datastore.publish import DatastoreParts, publish  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402

GOAL = 32.0


def publish_bytes(store: Datastore, index: faiss.Index, root: Path) -> dict[str, int]:
    """Publish `store`'s content with `index`; {file: bytes} of the new version folder."""
    manifest = {k: v for k, v in store.manifest.items() if k not in ("files", "version", "created_at", "format_version")}
    parts = DatastoreParts(np.asarray(store.tokens), store.record_offsets, np.asarray(store.key_positions),
                           store.sources, store.compressor, index, store.deleted)
    vdir = publish(root, parts, manifest, version="bench")
    return {p.name: p.stat().st_size for p in sorted(vdir.iterdir())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore", default="runs/bench/stores/id")
    p.add_argument("--out", default="runs/bench", help="folder for store_bytes_bench.json")
    args = p.parse_args(argv)
    store = Datastore(args.datastore)
    if not isinstance(faiss.downcast_index(store.index), faiss.IndexRefine):
        raise SystemExit(f"{store.path}: expected an IVF-PQ index with a refine stage")
    compact = faiss.downcast_index(store.index).base_index
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"compact": publish_bytes(store, compact, Path(tmp) / "compact"),
                 "refine": publish_bytes(store, store.index, Path(tmp) / "refine")}
    n_tok, n_keys = len(store.tokens), store.num_keys
    out = [f"{store.path}: {n_tok:,} tokens, {n_keys:,} keys ({n_keys / n_tok:.3f} keys/token), "
           f"index {store.manifest['index']['factory']}", "",
           "| file | compact bytes | B/token | refine bytes | B/token |", "|---|---|---|---|---|"]
    for name in sorted(set(sizes["compact"]) | set(sizes["refine"])):
        c, r = sizes["compact"].get(name, 0), sizes["refine"].get(name, 0)
        out.append(f"| {name} | {c:,} | {c / n_tok:.2f} | {r:,} | {r / n_tok:.2f} |")
    tc, tr = (sum(sizes[v].values()) for v in ("compact", "refine"))
    out += [f"| **total** | {tc:,} | **{tc / n_tok:.2f}** | {tr:,} | **{tr / n_tok:.2f}** |", ""]
    verdict = "met" if tc / n_tok <= GOAL else f"missed by {tc / n_tok - GOAL:.2f}"
    out.append(f"compact: {tc / n_tok:.2f} B/token (goal <= {GOAL:g}: {verdict}); refine: {tr / n_tok:.2f} B/token")
    print("\n".join(out))
    print(f"wrote {save_run('store_bytes_bench', chr(10).join(out), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
