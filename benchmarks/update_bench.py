"""Incremental update vs full rebuild (issue: actor pool, ID corpus, incremental updates).

    .venv/bin/python benchmarks/update_bench.py [--base runs/bench/stores/id] [--add-fraction 0.1]

Inside ONE Ray instance, on a published base store of >= 200k tokens:
1. `update`: add ~10% more tokens (ShareGPT's own replies, new source ids) with the frozen
   compressor and quantizer, timed;
2. a full retrained rebuild of base + addition with the base's build config, timed (goal:
   update <= 20% of it);
3. a frozen rebuild: the rebuild's corpus streamed into the BASE's compressor and
   trained-empty index by the build's own passes (what an update does, numbered from 0); the
   updated version must return the same neighbours (top-50 key positions for a fixed query set);
4. mean accepted tokens (DReSD, paper settings, no budget) of the updated version vs the
   retrained rebuild on MT-Bench prompts (goal: within 2%); outputs must equal greedy.

Writes runs/bench/update/update_bench.md.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from dresd.config import BuildConfig, ModelConfig, SpeculativeConfig, from_dict  # noqa: E402
from dresd.datastore.corpus import mtbench_first_turns  # noqa: E402
from dresd.datastore.store import Datastore, resolve_version_dir  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402
from dresd.decoding.engine import Engine  # noqa: E402
from dresd.evaluation.compare import MethodRun, markdown_table, summarize  # noqa: E402
from dresd.datastore.index import IndexParams, empty_copy, search  # noqa: E402
from dresd.model.loading import load_model  # noqa: E402
from dresd.model.resolve import model_facts  # noqa: E402
from pipelines.build import build_datastore  # noqa: E402
from pipelines.runtime import ensure_ray  # noqa: E402
from pipelines.work import build_key, encode_into, tokenize_args, work_folder  # noqa: E402


def addition_corpus(source: Path, out: Path, target_tokens: int, tokenizer) -> int:
    """Write records of `source` (new ids) until ~`target_tokens` tokens; returns the estimate."""
    total, rows = 0, []
    for line in source.open():
        row = json.loads(line)
        row["id"] = f"add-{row['id']}"
        rows.append(row)
        total += min(512, len(tokenizer(row["prompt"] + row["response"])["input_ids"]) + 8)
        if total >= target_tokens:
            break
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return total


def copy_current(src: Path, dst: Path) -> None:
    """A private copy of the base store's current version (the update must not touch it)."""
    if dst.exists():
        shutil.rmtree(dst)
    version = resolve_version_dir(src).name
    shutil.copytree(src / "versions" / version, dst / "versions" / version)
    (dst / "CURRENT").write_text(version)


def frozen_rebuild(base: Datastore, cfg: BuildConfig) -> faiss.Index:
    """The rebuild's corpus streamed into the base's compressor + trained-empty index."""
    facts = model_facts(cfg.model.path)
    work = work_folder(cfg, "frozen-" + build_key(cfg, facts.identity))
    index, _, _ = encode_into(cfg, work, tokenize_args(cfg, facts, cfg.corpus.prompt_format), facts.identity,
                              base.compressor, empty_copy(base.index), IndexParams(**base.manifest["index"]["params"]))
    work.remove()
    return index


def neighbour_agreement(a: Datastore, index_b: faiss.Index, pos_b: np.ndarray, queries: np.ndarray, k: int = 50):
    """(share of queries with identical top-k key positions, mean top-k overlap)."""
    _, ia = search(a.index, queries, k)
    _, ib = search(index_b, queries, k)
    pa, pb = np.asarray(a.key_positions)[ia], pos_b[ib]
    same = float(np.mean([np.array_equal(x, y) for x, y in zip(pa, pb)]))
    overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(pa, pb)]))
    return same, overlap


def mat_rows(lm, stores: dict[str, Datastore], prompts: list[str], max_new: int) -> list[dict]:
    """DReSD (paper settings, no budget) on each store vs greedy, same prompts."""
    spec, greedy = SpeculativeConfig(method="dresd", budget="off"), SpeculativeConfig(method="greedy")
    engines = {name: Engine(lm, s) for name, s in stores.items()}
    first = next(iter(engines.values()))
    runs = {"greedy": MethodRun("greedy", greedy, [])} | {n: MethodRun(n, spec, []) for n in engines}
    for prompt in prompts:
        runs["greedy"].generations.append(first.generate(prompt, greedy, max_new))
        for name, engine in engines.items():
            runs[name].generations.append(engine.generate(prompt, spec, max_new))
    return summarize(runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/bench/stores/id", help="published base store (>= 200k tokens)")
    p.add_argument("--addition", default="runs/bench/corpora/ood.jsonl", help="corpus the new records come from")
    p.add_argument("--add-fraction", type=float, default=0.10)
    p.add_argument("--out", default="runs/bench/update")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--queries", type=int, default=2000)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = Datastore(args.base)
    n_base = len(base.tokens)
    lm = load_model(ModelConfig())
    add_path = out / "addition.jsonl"
    est = addition_corpus(Path(args.addition), add_path, int(args.add_fraction * n_base), lm.tokenizer)
    print(f"base {args.base}: {n_base} tokens, {base.num_keys} keys; addition ~{est} tokens -> {add_path}", flush=True)

    base_cfg = from_dict(BuildConfig, base.manifest["build_config"], "base build_config")
    ensure_ray(base_cfg.ray_address)  # one Ray instance times both jobs

    updated_root = out / "updated"
    copy_current(Path(args.base), updated_root)
    upd_cfg = from_dict(BuildConfig, base.manifest["build_config"], "base build_config")
    upd_cfg.corpus.paths, upd_cfg.output, upd_cfg.keep_work = [str(add_path)], str(updated_root), False
    t = time.perf_counter()
    from pipelines.update import update_datastore
    report = update_datastore(upd_cfg)
    t_update = time.perf_counter() - t
    print("\n".join(report.lines()), flush=True)
    updated = Datastore(updated_root)

    rebuild_root = out / "rebuild"
    shutil.rmtree(rebuild_root, ignore_errors=True)
    full_cfg = from_dict(BuildConfig, base.manifest["build_config"], "base build_config")
    full_cfg.corpus.paths = list(base_cfg.corpus.paths) + [str(add_path)]
    full_cfg.output, full_cfg.keep_work = str(rebuild_root), False
    t = time.perf_counter()
    full = build_datastore(full_cfg)
    t_full = time.perf_counter() - t
    print("\n".join(full.lines()), flush=True)
    rebuilt = Datastore(rebuild_root)

    # Scratch holds no hidden states to refill: the frozen rebuild embeds the corpus again (untimed).
    frozen_index = frozen_rebuild(base, full_cfg)
    same_stream = (np.array_equal(np.asarray(rebuilt.tokens), np.asarray(updated.tokens))
                   and np.array_equal(np.asarray(rebuilt.key_positions), np.asarray(updated.key_positions)))
    rng = np.random.default_rng(0)
    pick = rng.choice(frozen_index.ntotal, size=min(args.queries, frozen_index.ntotal), replace=False)
    keys = faiss.downcast_index(faiss.downcast_index(frozen_index).refine_index).reconstruct_batch(pick)
    queries = (keys + rng.normal(0, 0.1 * keys.std(), keys.shape)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    same, overlap = neighbour_agreement(updated, frozen_index, np.asarray(rebuilt.key_positions), queries)

    prompts = mtbench_first_turns()[: args.prompts]
    rows = mat_rows(lm, {"base": base, "updated": updated, "rebuild": rebuilt}, prompts, args.max_new_tokens)
    mat = {r["method"]: r["mean_accepted_tokens"] for r in rows}
    identical = all(r["identical_to_greedy"] == r["prompts"] for r in rows)

    added_tokens = len(updated.tokens) - n_base
    lines = [
        f"Update benchmark, {datetime.now():%Y-%m-%d %H:%M}, 2-core CPU, SmolLM2-135M, one Ray instance",
        "",
        f"base {n_base} tokens / {base.num_keys} keys; added {added_tokens} tokens "
        f"({added_tokens / n_base:.1%}), {report.keys_added} keys; drift ratio {report.drift.get('ratio', 0):.2f}",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
        f"| update (add) wall | {t_update:.1f} s | |",
        f"| full retrained rebuild wall (base + addition) | {t_full:.1f} s | |",
        f"| update / full rebuild | {t_update / t_full:.3f} | <= 0.20 |",
        f"| token stream + key positions equal to the rebuild's | {same_stream} | True |",
        f"| queries with identical top-50 (updated vs frozen rebuild, {len(queries)} queries) | {same:.4f} | 1.0 up to fp ties |",
        f"| mean top-50 overlap (updated vs frozen rebuild) | {overlap:.4f} | |",
        f"| MAT updated / MAT retrained rebuild | {mat['updated'] / mat['rebuild']:.4f} "
        f"({mat['updated']:.3f} vs {mat['rebuild']:.3f}) | within 2% |",
        f"| outputs identical to greedy | {identical} | True |",
        "",
        f"MAT on {len(prompts)} MT-Bench prompts x {args.max_new_tokens} tokens, DReSD with the paper's settings (no budget):",
        "",
        markdown_table(rows),
    ]
    text = "\n".join(lines)
    print("\n" + text)
    (out / "update_bench.md").write_text(text + "\n")
    print(f"wrote {save_run('update_bench', text, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
