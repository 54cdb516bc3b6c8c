"""Accepted tokens per call against the index: approximate vs exact search, and store size.

    .venv/bin/python benchmarks/retrieval_mat_bench.py --datastore runs/bench/stores/id [--prompts 8]
    .venv/bin/python benchmarks/retrieval_mat_bench.py --study size [--prompts 8 --max-new-tokens 96 --out F.md]

--study search (the default): does approximate search cost accepted tokens?

The datastore's own IVF-PQ + exact-refine index (the default), its PQ-only base index
(compact: no stored refine vectors) and an exact flat inner-product index over the same
compressed keys (read back from the refine stage) serve the same DReSD drafter with the
paper's fixed settings (no draft budget, so drafting does not adapt to what it sees) on the
same MT-Bench prompts. Mean accepted tokens per call (MAT, bonus included) of each index is
compared with exact search; outputs must stay identical to greedy.

--study size: how does MAT grow with the store? Exact search over the first 1/16, 1/8, ...,
all of the store's keys (a prefix of keys is a prefix of records, so the values stay
right), on MT-Bench and held-out ShareGPT prompts; two fits (MAT linear in log2(keys), and
MAT - 1 a power of keys) tell how large a store the MAT goal would need if the trend held.
Writes a table per set and a plot.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the dresd command line sets it (dresd/cli/main.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # spec_bench's evaluation sets

import argparse  # noqa: E402
import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dresd.config import ModelConfig, SpeculativeConfig  # noqa: E402
from dresd.datastore.corpus import mtbench_first_turns  # noqa: E402
from dresd.datastore.store import Datastore  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402
from dresd.decoding.engine import Engine  # noqa: E402
from dresd.evaluation.compare import MethodRun, markdown_table, summarize  # noqa: E402
from dresd.model.loading import load_model  # noqa: E402


def exact_keys(store: Datastore):
    """The store's compressed keys, read back from its exact refine stage."""
    params = store.manifest["index"]["params"]
    if params["kind"] != "ivfpq" or not params["refine"]:
        raise SystemExit(f"{store.path}: needs an IVF-PQ index with a refine stage, got {params['kind']}")
    refine = faiss.downcast_index(store.index)
    return refine, faiss.downcast_index(refine.refine_index).reconstruct_n(0, store.num_keys)


def with_index(store: Datastore, index, **changes) -> Datastore:
    """A shallow copy of the store that searches `index` (manifest params updated)."""
    out = copy.copy(store)
    out.index = index
    out.manifest = copy.deepcopy(store.manifest)
    out.manifest["index"]["params"].update(changes)
    return out


def flat_index(keys):
    """An exact inner-product index over `keys`."""
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys)
    return index


def variants(store: Datastore) -> dict[str, Datastore]:
    """The store with its default index, its PQ-only base, and an exact flat index."""
    refine, keys = exact_keys(store)
    return {"exact": with_index(store, flat_index(keys), kind="flat"), "refine": store,
            "compact": with_index(store, faiss.downcast_index(refine.base_index), refine=False)}


def size_variants(store: Datastore, fractions: list[float]) -> dict[str, Datastore]:
    """Exact search over the first `fraction` of the store's keys, for each fraction."""
    _, keys = exact_keys(store)
    out = {}
    for f in fractions:
        n = max(1, int(round(len(keys) * f)))
        out[f"{n}-keys"] = with_index(store, flat_index(keys[:n]), kind="flat")
    return out


def fits(sizes: list[int], mats: list[float], goal: float) -> list[str]:
    """Two least-squares trends of MAT against keys and the store each needs for `goal`:
    MAT linear in log2(keys), and MAT - 1 (accepted drafts per call) a power of keys."""
    x = np.log2(np.asarray(sizes, dtype=float))
    y = np.asarray(mats, dtype=float)
    lines = []
    b, a = np.polyfit(x, y, 1)
    need = 2 ** ((goal - a) / b) if b > 0 else float("inf")
    lines.append(f"- MAT = {a:.3f} + {b:.3f} * log2(keys): +{b:.3f} per doubling; MAT {goal} at ~{need:.3g} keys "
                 f"({need / sizes[-1]:.3g}x the full store)")
    if (y > 1).all():
        p, c = np.polyfit(x, np.log2(y - 1), 1)
        need = 2 ** ((np.log2(goal - 1) - c) / p) if p > 0 else float("inf")
        lines.append(f"- MAT - 1 = {2 ** c:.3g} * keys^{p:.3f}: x{2 ** p:.3f} per doubling; MAT {goal} at ~{need:.3g} "
                     f"keys ({need / sizes[-1]:.3g}x the full store)")
    return lines


def compare(lm, named: dict[str, Datastore], prompts: list[str], max_new_tokens: int,
            spec: SpeculativeConfig) -> list[dict]:
    """DReSD (`spec`) with each store variant, greedy interleaved per prompt."""
    engines = {name: Engine(lm, s) for name, s in named.items()}
    greedy = SpeculativeConfig(method="greedy")
    first = next(iter(engines.values()))
    runs = {"greedy": MethodRun("greedy", greedy, [])} | {n: MethodRun(n, spec, []) for n in engines}
    for prompt in tqdm(prompts, desc=f"decoding (greedy + {len(engines)} stores)", unit="prompt"):
        runs["greedy"].generations.append(first.generate(prompt, greedy, max_new_tokens))
        for name, engine in engines.items():
            runs[name].generations.append(engine.generate(prompt, spec, max_new_tokens))
    return summarize(runs)


def search_study(lm, store: Datastore, args) -> None:
    """Exact vs refine vs compact index on MT-Bench prompts."""
    prompts = mtbench_first_turns()[: args.prompts]
    rows = compare(lm, variants(store), prompts, args.max_new_tokens, SpeculativeConfig(method="dresd", budget="off"))
    lines = ["# Does approximate search cost accepted tokens?", "",
             f"{store.num_keys} keys; {len(prompts)} MT-Bench prompts x {args.max_new_tokens} tokens; "
             "DReSD, no budget", "", markdown_table(rows), ""]
    exact = next(r for r in rows if r["method"] == "exact")["mean_accepted_tokens"]
    for r in rows:
        if r["method"] in ("refine", "compact"):
            lines.append(f"- {r['method']}: MAT {r['mean_accepted_tokens']:.3f} vs exact {exact:.3f}: "
                         f"{(r['mean_accepted_tokens'] / exact - 1):+.1%} (goal: within 2%)")
    print("\n".join(lines))
    out = Path(args.out or "runs/bench/retrieval_mat.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {save_run('retrieval_mat_bench', chr(10).join(lines), out.parent)}")


def size_study(lm, store: Datastore, args) -> None:
    """MAT against store size on both evaluation sets; table, log fit and plot."""
    from spec_bench import eval_sets

    fractions = [float(f) for f in args.fractions.split(",")]
    named = size_variants(store, fractions)
    # The store alone: the request's own keys would add matches that do not grow with the store.
    spec = SpeculativeConfig(method="dresd", budget="off", context_keys=False)
    sizes = [named[n].index.ntotal for n in named]
    lines = [f"# MAT against store size ({store.path}, {store.num_keys} keys)", "",
             f"DReSD with the paper's settings (the store alone, no budget), exact search over a prefix of the store's keys; "
             f"{args.prompts} prompts per set x {args.max_new_tokens} new tokens.", ""]
    mats = {}
    for set_name, prompts in eval_sets().items():
        rows = compare(lm, named, prompts[: args.prompts], args.max_new_tokens, spec)
        mats[set_name] = [next(r for r in rows if r["method"] == n)["mean_accepted_tokens"] for n in named]
        lines += [f"## {set_name}", "", markdown_table(rows), "",
                  "Trends (least squares over the sizes above), if they held beyond them:",
                  *fits(sizes, mats[set_name], args.goal_mat), ""]
    out = Path(args.out or "runs/bench/store_size.md")
    lines += [f"![MAT against keys]({out.with_suffix('.png').name})", ""]
    report = "\n".join(lines)
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    plot_sizes(out.with_suffix(".png"), sizes, mats)
    print(f"wrote {out}, {out.with_suffix('.png')} and {save_run('store_size', report, out.parent)}")


def plot_sizes(path: Path, sizes: list[int], mats: dict[str, list[float]]) -> None:
    """MAT against keys (log scale), one line per evaluation set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for set_name, ys in mats.items():
        ax.plot(sizes, ys, marker="o", label=set_name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("datastore keys (exact search)")
    ax.set_ylabel("mean accepted tokens per call")
    ax.set_title("DReSD MAT against store size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=["search", "size"], default="search")
    p.add_argument("--datastore", default="runs/bench/stores/id")
    p.add_argument("--prompts", type=int, default=8, help="prompts (per evaluation set for --study size)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--fractions", default="0.0625,0.125,0.25,0.5,1", help="--study size: shares of the keys")
    p.add_argument("--goal-mat", type=float, default=4.0, help="--study size: the MAT the fit is solved for")
    p.add_argument("--out", help="the markdown report (default runs/bench/<study>.md; --study size writes a .png "
                                 "beside it); its json goes in the same folder")
    args = p.parse_args(argv)
    lm = load_model(ModelConfig())
    store = Datastore(args.datastore)
    (size_study if args.study == "size" else search_study)(lm, store, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
