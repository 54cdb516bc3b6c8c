"""Every drafting method on the same prompts, in one run: the side-by-side report.

    .venv/bin/python benchmarks/spec_bench.py            # full: 20 prompts per set, 128 tokens
    .venv/bin/python benchmarks/spec_bench.py --quick    # smoke run: cached stores, 3 prompts per set

Scenarios (datastores built once and cached under --workdir):
- ID: the packaged model's own greedy answers to >= 1,000 deduplicated, length-capped
  ShareGPT first turns (jobs/decode.py with jobs/configs/generate_id_corpus.yaml; resumable);
- OOD: the ShareGPT replies to the same first turns, cut to the ID store's token count.
Evaluation sets: MT-Bench first turns and held-out ShareGPT first turns (the first
HELD_OUT deduplicated turns; the corpora use the turns after them and drop any record whose
prompt equals an evaluation prompt).

Methods share our decoding loop and tree verifier (greedy acceptance, lossless) except the
external HF `generate()` references (on the stock HF model, as users load it; hf-greedy-dual
runs HF's loop on our dual-layout model, see dresd.model.fastpath.cpu_linear); REST, SuffixDecoding and DReSD draft from the same
corpus token streams. Methods are interleaved per prompt so machine noise hits all alike;
results go to results.jsonl (one line per prompt x method: rerun to resume) and the report
(report.md, summary.json, PNG plots) is rewritten from all results at the end.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Before torch loads OpenMP: spinning threads slow a shared machine; docs/speed-study.md#openmp-and-openblas-threads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the dresd command line sets it (dresd/cli/main.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from tqdm import tqdm  # noqa: E402

from dresd.decoding.calibration import cached_cost_model  # noqa: E402
from dresd.config import BuildConfig, CorpusConfig, ModelConfig  # noqa: E402
from dresd.datastore.corpus import Example, RecordError, mtbench_first_turns, sharegpt_first_turns  # noqa: E402
from dresd.datastore.store import Datastore, reusable_store  # noqa: E402
from dresd.decoding.loop import Generation  # noqa: E402
from dresd.decoding.engine import Engine  # noqa: E402
from dresd.evaluation.methods import Method, chosen_methods  # noqa: E402
from dresd.datastore.formatting import record_ids  # noqa: E402
from dresd.model.loading import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = 40  # first deduplicated ShareGPT turns, kept out of every corpus
ID_ROWS = 1100  # ShareGPT turns answered by the model (some are rejected as too long)
MIN_ID_RECORDS = 1000
RECORD_MAX_TOKENS = 512


# ----------------------------------------------------------------------------- data


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def eval_sets() -> dict[str, list[str]]:
    """The evaluation prompts: MT-Bench first turns and held-out ShareGPT first turns."""
    return {"mtbench": mtbench_first_turns(), "sharegpt": [p for _, p, _ in sharegpt_first_turns()[:HELD_OUT]]}


def id_corpus(workdir: Path, banned: set[str]) -> Path:
    """The model's own answers (decode job, resumable), minus any evaluation prompt."""
    raw = workdir / "sharegpt_id.jsonl"
    if not raw.exists():
        cmd = [sys.executable, str(ROOT / "jobs" / "decode.py"), "--config", str(ROOT / "jobs/configs/generate_id_corpus.yaml"),
               "--set", f"skip={HELD_OUT}", "--set", f"limit={ID_ROWS}", "--set", "max_new_tokens=128",
               "--set", "batch_size=16", "--set", "chunk_rows=64", "--set", f"output={workdir / 'id_decode'}",
               "--set", f"corpus_file={raw}"]
        print("generating the ID corpus:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    out = workdir / "corpora" / "id.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = dropped = 0
    with open(raw) as src, open(out, "w") as dst:
        for line in src:
            rec = json.loads(line)
            if norm(rec["prompt"]) in banned or not rec["response"].strip():
                dropped += 1
                continue
            dst.write(line)
            kept += 1
    print(f"ID corpus: {kept} records ({dropped} dropped: evaluation prompt or empty answer)")
    if kept < MIN_ID_RECORDS:
        raise SystemExit(f"ID corpus has {kept} records, fewer than {MIN_ID_RECORDS}: raise ID_ROWS")
    return out


def corpus_tokens(path: Path, tokenizer, eos_id: int) -> int:
    """Tokens a build of this prompt/response corpus stores (the build's own record layout)."""
    total = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        try:
            total += len(record_ids(tokenizer, Example(rec["id"], rec["prompt"], rec["response"]), "chat",
                                    RECORD_MAX_TOKENS, eos_id))
        except RecordError:
            pass  # rejected by the build as well
    return total


def ood_corpus(workdir: Path, banned: set[str], tokenizer, eos_id: int, target_tokens: int) -> Path:
    """ShareGPT's own replies to the ID corpus's turns, as many as make `target_tokens` tokens."""
    out = workdir / "corpora" / "ood.jsonl"
    total = n = 0
    with open(out, "w") as dst:
        for sid, prompt, reply in sharegpt_first_turns()[HELD_OUT:]:
            if norm(prompt) in banned:
                continue
            try:
                ids = record_ids(tokenizer, Example(sid, prompt, reply), "chat", RECORD_MAX_TOKENS, eos_id)
            except RecordError:
                continue  # the build would reject it too (prompt too long)
            if total + len(ids) > target_tokens:
                break  # the stores then differ by less than one record (<= RECORD_MAX_TOKENS tokens)
            dst.write(json.dumps({"id": sid, "prompt": prompt, "response": reply}) + "\n")
            total, n = total + len(ids), n + 1
    print(f"OOD corpus: {n} ShareGPT records, {total} tokens (ID store: {target_tokens})")
    return out


def store(workdir: Path, name: str, corpus: Path) -> Path:
    """Build (or reuse) the datastore of one corpus."""
    cfg = BuildConfig(corpus=CorpusConfig(paths=[str(corpus)], id_field="id", max_tokens=RECORD_MAX_TOKENS),
                      output=str(workdir / "stores" / name))
    root = Path(cfg.output)
    if reusable_store(root, cfg):
        print(f"reusing the {name} datastore {Datastore(root).path}")
    else:
        from pipelines.build import build_datastore

        print(f"building the {name} datastore from {corpus}", flush=True)
        print("\n".join(build_datastore(cfg).lines()), flush=True)
    return root


# ----------------------------------------------------------------------------- runs


def load_results(path: Path) -> dict[tuple[str, str, int], dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[(r["set"], r["method"], r["prompt"])] = r
    return done


def run(args) -> Path | None:
    workdir = Path(args.workdir)
    out_dir = workdir / ("quick" if args.quick else "full")
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = eval_sets()
    banned = {norm(p) for prompts in sets.values() for p in prompts}
    lm = load_model(ModelConfig())
    # The external references run on the model as users load it from HF (no dual layout).
    stock = load_model(ModelConfig(dual_layout=False)).model
    id_path = id_corpus(workdir, banned)
    id_tokens = corpus_tokens(id_path, lm.tokenizer, lm.eos_token_id)
    ood_path = ood_corpus(workdir, banned, lm.tokenizer, lm.eos_token_id, id_tokens)
    corpora = {"id": id_path, "ood": ood_path}
    if args.only_store:
        store(workdir, args.only_store, corpora[args.only_store])
        return None
    roots = {name: store(workdir, name, path) for name, path in corpora.items()}
    # Calibrated afresh: the forward cost per verified position depends on this machine's state now.
    cost = cached_cost_model(lm.model, refresh=True)
    engines = {None: Engine(lm, cost=cost), **{k: Engine(lm, Datastore(r), cost=cost) for k, r in roots.items()}}
    chosen = chosen_methods(args.methods)
    results_path = out_dir / "results.jsonl"
    done = load_results(results_path)

    def generate(m: Method, prompt: str, n: int) -> Generation:
        engine = engines[m.store]
        if m.spec is None:
            from dresd.evaluation.hf_reference import hf_generate

            model = stock if m.hf_stock else lm.model
            return hf_generate(model, engine.prompt_ids(prompt), n, lm.eos_token_id, m.hf_lookup)
        return engine.generate(prompt, m.spec, n)

    # Untimed warm-up: builds drafters (REST index, suffix tree warm-up), calibrates the cost model.
    t0 = time.perf_counter()
    for m in chosen:
        generate(m, "Hello!", 4)
    print(f"warm-up (drafters, cost calibration) {time.perf_counter() - t0:.1f} s")
    with open(results_path, "a") as fh:
        for set_name, prompts in sets.items():
            for i, prompt in enumerate(tqdm(prompts[: args.prompts], desc=f"{set_name}: {len(chosen)} methods", unit="prompt")):
                for m in chosen:
                    if (set_name, m.name, i) in done:
                        continue
                    gen = generate(m, prompt, args.max_new_tokens)
                    rec = {"set": set_name, "method": m.name, "prompt": i, "token_ids": gen.token_ids,
                           "metrics": gen.metrics.summary()}
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    done[(set_name, m.name, i)] = rec
    from dresd.evaluation.report import write_report

    return write_report(out_dir, done, [m.name for m in chosen], args, cost,
                        {k: Datastore(r).manifest for k, r in roots.items()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 prompts per set (labelled as such)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per evaluation set (default 20; 3 with --quick)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--methods", default="",
                   help="comma list of method names (greedy is always run); any registered method may be named")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--only-store", choices=["id", "ood"],
                   help="write the corpora, build (or reuse) this one datastore and stop: run one process per store to build both at once")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (repeatable): a module that registers methods of its own")
    args = p.parse_args(argv)
    if args.prompts is None:
        args.prompts = 3 if args.quick else 20
    for module in args.imports:
        importlib.import_module(module)
    chosen_methods(args.methods)  # a bad name fails now, not after the datastores are built
    report = run(args)
    if report is not None:
        print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
