"""The compact index layout (index.refine false) against the refined one, on one store's keys.

    .venv/bin/python benchmarks/compact_index_bench.py --datastore runs/demo/datastore \
        --prompts-file runs/demo/eval_prompts.jsonl [--prompts 5 --max-new-tokens 48]

The store's compressed keys (read back from its flat or refine stage) are indexed three
ways with the layout a build would choose for their count (dresd.datastore.index): exact
flat search, IVF-PQ fast-scan codes with the exact refine stage (the default), and the same
codes alone (compact). Each serves DReSD with the paper's fixed settings (no budget) on the
same prompts; reported: mean accepted tokens per call (MAT, bonus included) against the
refined index's, and each layout's index bytes per key and per token as written.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the dresd command line sets it (dresd/cli/main.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # retrieval_mat_bench

import argparse  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402

from dresd.config import IndexConfig, ModelConfig, SpeculativeConfig  # noqa: E402
from dresd.datastore.index import add_keys, choose_index_params, train_index  # noqa: E402
from dresd.datastore.store import Datastore  # noqa: E402
from dresd.evaluation.compare import markdown_table  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402
from dresd.model.loading import load_model  # noqa: E402
from precision_bench import read_prompts  # noqa: E402
from retrieval_mat_bench import compare, with_index  # noqa: E402


def stored_keys(store: Datastore):
    """The store's compressed keys, from its flat index or its exact refine stage."""
    index = faiss.downcast_index(store.index)
    exact = faiss.downcast_index(index.refine_index) if isinstance(index, faiss.IndexRefine) else index
    if not isinstance(exact, faiss.IndexFlat):
        raise SystemExit(f"{store.path}: needs exact keys (a flat index or a refine stage)")
    return exact.reconstruct_n(0, store.num_keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore", default="runs/demo/datastore")
    p.add_argument("--prompts-file", default=None, help="jsonl with a 'prompt' field (default: MT-Bench first turns)")
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", default="runs/bench/compact_index.md")
    args = p.parse_args(argv)

    store = Datastore(args.datastore)
    keys = stored_keys(store)
    cfg = IndexConfig(dim=keys.shape[1], flat_below=0)  # IVF-PQ whatever the count: the layouts compared
    params = choose_index_params(len(keys), cfg)
    refined = train_index(params, keys)
    add_keys(refined, keys)
    flat = faiss.IndexFlatIP(keys.shape[1])
    flat.add(keys)
    compact = faiss.downcast_index(refined).base_index
    named = {"exact": with_index(store, flat, kind="flat", refine=False),
             "refine": with_index(store, refined, **params.to_dict()),
             "compact": with_index(store, compact, **replace(params, refine=False).to_dict())}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, s in named.items():
            faiss.write_index(s.index, f"{tmp}/{name}.faiss")
            sizes[name] = os.path.getsize(f"{tmp}/{name}.faiss")
    prompts = read_prompts(args.prompts_file, args.prompts)
    lm = load_model(ModelConfig())
    rows = compare(lm, named, prompts, args.max_new_tokens, SpeculativeConfig(method="dresd", budget="off"))
    n_tok = len(store.tokens)
    mat = {r["method"]: r["mean_accepted_tokens"] for r in rows}
    lines = ["# The compact index layout against the refined one", "",
             f"{len(keys)} keys, {n_tok} tokens ({args.datastore}), index {params.factory} (compact: without RFlat); "
             f"{len(prompts)} prompts x {args.max_new_tokens} new tokens; DReSD with no budget. Ran on a contended "
             "2-core CPU: tokens/s are not comparable across runs.", "", markdown_table(rows), "",
             "| index | bytes | B/key | B/token (index only) | MAT | vs refine |", "|---|---|---|---|---|---|"]
    for name in named:
        lines.append(f"| {name} | {sizes[name]:,} | {sizes[name] / len(keys):.1f} | {sizes[name] / n_tok:.1f} | "
                     f"{mat[name]:.3f} | {mat[name] / mat['refine'] - 1:+.1%} |")
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print(f"wrote {out} and {save_run('compact_index_bench', report, out.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
