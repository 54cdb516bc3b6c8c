"""Does approximate search cost accepted tokens? Exact vs refine vs compact index, same store.

    .venv/bin/python benchmarks/retrieval_mat_bench.py --datastore runs/bench/stores/id [--prompts 8]

The datastore's own IVF-PQ + exact-refine index (the default), its PQ-only base index
(compact: no stored refine vectors) and an exact flat inner-product index over the same
compressed keys (read back from the refine stage) serve the same DReSD drafter with the
paper's fixed settings (no draft budget, so drafting does not adapt to what it sees) on the
same MT-Bench prompts. Mean accepted tokens per call (MAT, bonus included) of each index is
compared with exact search; outputs must stay identical to greedy.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import copy  # noqa: E402

import faiss  # noqa: E402

from dresd.config import ModelConfig, SpeculativeConfig  # noqa: E402
from dresd.corpus import mtbench_first_turns  # noqa: E402
from dresd.datastore import Datastore  # noqa: E402
from dresd.engine import Engine  # noqa: E402
from dresd.evaluate import MethodRun, markdown_table, summarize  # noqa: E402
from dresd.models import load_model  # noqa: E402


def variants(store: Datastore) -> dict[str, Datastore]:
    """The store with its default index, its PQ-only base, and an exact flat index."""
    params = store.manifest["index"]["params"]
    if params["kind"] != "ivfpq" or not params["refine"]:
        raise SystemExit(f"{store.path}: needs an IVF-PQ index with a refine stage, got {params['kind']}")
    refine = faiss.downcast_index(store.index)
    keys = faiss.downcast_index(refine.refine_index).reconstruct_n(0, store.num_keys)
    exact = faiss.IndexFlatIP(keys.shape[1])
    exact.add(keys)

    def with_index(index, **changes):
        out = copy.copy(store)
        out.index = index
        out.manifest = copy.deepcopy(store.manifest)
        out.manifest["index"]["params"].update(changes)
        return out

    return {"exact": with_index(exact, kind="flat"), "refine": store,
            "compact": with_index(faiss.downcast_index(refine.base_index), refine=False)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore", default="runs/bench/stores/id")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    lm = load_model(ModelConfig())
    store = Datastore(args.datastore)
    engines = {name: Engine(lm, s) for name, s in variants(store).items()}
    prompts = mtbench_first_turns()[: args.prompts]
    spec = SpeculativeConfig(method="dresd", budget="off")
    greedy = SpeculativeConfig(method="greedy")
    runs = {"greedy": MethodRun("greedy", greedy, [])} | {n: MethodRun(n, spec, []) for n in engines}
    for prompt in prompts:
        runs["greedy"].generations.append(engines["exact"].generate(prompt, greedy, args.max_new_tokens))
        for name, engine in engines.items():
            runs[name].generations.append(engine.generate(prompt, spec, args.max_new_tokens))
    rows = summarize(runs)
    print(f"{store.num_keys} keys; {len(prompts)} MT-Bench prompts x {args.max_new_tokens} tokens; DReSD, no budget\n")
    print(markdown_table(rows))
    exact = next(r for r in rows if r["method"] == "exact")["mean_accepted_tokens"]
    for r in rows:
        if r["method"] in ("refine", "compact"):
            print(f"{r['method']}: MAT {r['mean_accepted_tokens']:.3f} vs exact {exact:.3f}: "
                  f"{(r['mean_accepted_tokens'] / exact - 1):+.1%} (goal: within 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
