"""Every drafting method on the same prompts, in one run: the side-by-side report.

    .venv/bin/python benchmarks/spec_bench.py            # full: 20 prompts per set, 128 tokens
    .venv/bin/python benchmarks/spec_bench.py --quick    # smoke run: cached stores, 3 prompts per set
    .venv/bin/python benchmarks/spec_bench.py --sets code --quick   # one scenario: only its stores are built

Scenarios (datastores built once and cached under --workdir), each in and out of distribution:
- chat, evaluated on MT-Bench first turns and held-out ShareGPT first turns (the first
  HELD_OUT deduplicated turns; the corpora use the turns after them and drop any record
  whose prompt equals an evaluation prompt). ID store: the packaged model's own greedy
  answers to >= 1,000 deduplicated, length-capped ShareGPT first turns (jobs/decode.py with
  jobs/configs/generate_id_corpus.yaml; resumable); OOD store: the ShareGPT replies to the
  same first turns, cut to the ID store's token count.
- code, evaluated on CODE_HELD_OUT functions with docstrings from the installed third-party
  packages (dresd/evaluation/code_prompts.py: signature and docstring as the prompt, a
  deterministic order). ID store: the model's own greedy answers to the CODE_ID_ROWS
  functions after them (the same decode job); OOD store: those functions' own source, as
  the packages write it, cut to the ID store's token count. HumanEval, the standard library
  and chitchat are held-out checks and stay out of this benchmark.

Methods share our decoding loop and tree verifier (greedy acceptance, lossless) except the
external HF `generate()` references (hf-greedy, hf-pld: as users run HF, in a fresh process
with plain transformers and generate()'s defaults; hf-greedy-dual runs HF's loop on our
dual-layout model in this process, see dresd.model.fastpath.cpu_linear); REST, SuffixDecoding and DReSD draft from the same
corpus token streams. Methods are interleaved per prompt so machine noise hits all alike;
results go to results.jsonl (one line per prompt x method: rerun to resume) and the report
(report.md, summary.json, PNG plots) is rewritten from all results at the end. Every row
carries the oracle bound (dresd/evaluation/oracle.py), and every verified draft node's
predicted acceptance is logged for the calibration section (dresd/evaluation/reliability.py).
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
from dresd.evaluation.code_prompts import CodeFunction, code_functions, split_functions  # noqa: E402
from dresd.evaluation.methods import Method, chosen_methods  # noqa: E402
from dresd.evaluation.reliability import ReliabilityLog, watch  # noqa: E402
from dresd.datastore.formatting import record_ids  # noqa: E402
from dresd.model.loading import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = 40  # first deduplicated ShareGPT turns, kept out of every corpus
ID_ROWS = 1100  # ShareGPT turns answered by the model (some are rejected as too long)
MIN_ID_RECORDS = 1000
RECORD_MAX_TOKENS = 512
CODE_HELD_OUT = 20  # first functions of the code order: the code evaluation set
CODE_ID_ROWS = 144  # functions after them that the model answers for the code ID store
MIN_CODE_ID_RECORDS = 128
CODE_FUNCTIONS = CODE_HELD_OUT + 3 * CODE_ID_ROWS  # enough sources for an OOD store of the ID store's tokens
# The scenario of each evaluation set, and the datastore each scenario's "id"/"ood" methods draft from.
SCENARIO = {"mtbench": "chat", "sharegpt": "chat", "code": "code"}
STORES = {"chat": {"id": "id", "ood": "ood"}, "code": {"id": "code-id", "ood": "code-ood"}}


# ----------------------------------------------------------------------------- data


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def eval_sets(names: list[str], functions: list[CodeFunction] | None = None) -> dict[str, list[str]]:
    """The evaluation prompts of the named sets: MT-Bench first turns, held-out ShareGPT first
    turns, held-out code functions (`functions`: the code order, read when not given)."""
    out = {}
    if "mtbench" in names:
        out["mtbench"] = mtbench_first_turns()
    if "sharegpt" in names:
        out["sharegpt"] = [p for _, p, _ in sharegpt_first_turns()[:HELD_OUT]]
    if "code" in names:
        held, _ = split_functions(functions or code_functions(CODE_FUNCTIONS), CODE_HELD_OUT)
        out["code"] = [f.prompt for f in held]
    return out


def decode_answers(workdir: Path, raw: Path, name: str, overrides: list[str]) -> None:
    """The model's greedy answers (jobs/decode.py, resumable) written to `raw`, unless there already."""
    if raw.exists():
        return
    # As a module from the repository root: jobs/ is not an installed package.
    cmd = [sys.executable, "-m", "jobs.decode", "--config", str(ROOT / "jobs/configs/generate_id_corpus.yaml"),
           *overrides, "--set", "max_new_tokens=128", "--set", "batch_size=16", "--set", "chunk_rows=64",
           "--set", f"output={workdir / f'{name}_decode'}", "--set", f"corpus_file={raw}"]
    print(f"generating the {name} corpus:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def id_corpus(workdir: Path, banned: set[str], rows: int | None = None) -> Path:
    """The model's own answers to `rows` ShareGPT turns (ID_ROWS when None; decode job,
    resumable), minus any evaluation prompt; MIN_ID_RECORDS of every ID_ROWS must survive."""
    rows = ID_ROWS if rows is None else rows
    raw = workdir / "sharegpt_id.jsonl"
    decode_answers(workdir, raw, "id", ["--set", f"skip={HELD_OUT}", "--set", f"limit={rows}"])
    return filtered_corpus(raw, workdir / "corpora" / "id.jsonl", banned, rows * MIN_ID_RECORDS // ID_ROWS, "--id-rows")


def code_id_corpus(workdir: Path, functions: list[CodeFunction], banned: set[str], rows: int | None = None) -> Path:
    """The model's own answers to the `rows` functions (CODE_ID_ROWS when None) after the held-out ones."""
    rows = CODE_ID_ROWS if rows is None else rows
    _, rest = split_functions(functions, CODE_HELD_OUT)
    prompts = workdir / "corpora" / "code_prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"id": f.id, "prompt": f.prompt}) + "\n" for f in rest[:rows]))
    raw = workdir / "code_id.jsonl"
    decode_answers(workdir, raw, "code-id", ["--set", f"prompts={prompts}", "--set", "id_field=id",
                                             "--set", "skip=0", "--set", f"limit={rows}"])
    return filtered_corpus(raw, workdir / "corpora" / "code-id.jsonl", banned,
                           rows * MIN_CODE_ID_RECORDS // CODE_ID_ROWS, "--code-id-rows")


def filtered_corpus(raw: Path, out: Path, banned: set[str], min_records: int, knob: str) -> Path:
    """`raw`'s records minus evaluation prompts and empty answers, written to `out`."""
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
    print(f"{out.stem} corpus: {kept} records ({dropped} dropped: evaluation prompt or empty answer)")
    if kept < min_records:
        raise SystemExit(f"{out.stem} corpus ({out}) has {kept} records, fewer than {min_records}: raise {knob}")
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


def ood_corpus(workdir: Path, banned: set[str], tokenizer, eos_id: int, target_tokens: int,
               records=None, name: str = "ood") -> Path:
    """Human-written replies, as many as make `target_tokens` tokens: by default ShareGPT's own
    replies to the ID corpus's turns; for code, `records` = (id, prompt, the function's source)."""
    out = workdir / "corpora" / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    total = n = 0
    with open(out, "w") as dst:
        for sid, prompt, reply in (sharegpt_first_turns()[HELD_OUT:] if records is None else records):
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
    print(f"{name} corpus: {n} human-written records, {total} tokens (its ID store: {target_tokens})")
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


def build_corpora(workdir: Path, set_names: list[str], functions: list[CodeFunction] | None, banned: set[str],
                  lm, id_rows: int | None = None, code_id_rows: int | None = None) -> dict[str, Path]:
    """The corpora of the stores the named sets' scenarios draft from, by store name."""
    scenarios = {SCENARIO[n] for n in set_names}
    corpora = {}
    if "chat" in scenarios:
        corpora["id"] = id_corpus(workdir, banned, id_rows)
        id_tokens = corpus_tokens(corpora["id"], lm.tokenizer, lm.eos_token_id)
        corpora["ood"] = ood_corpus(workdir, banned, lm.tokenizer, lm.eos_token_id, id_tokens)
    if "code" in scenarios:
        corpora["code-id"] = code_id_corpus(workdir, functions, banned, code_id_rows)
        id_tokens = corpus_tokens(corpora["code-id"], lm.tokenizer, lm.eos_token_id)
        _, rest = split_functions(functions, CODE_HELD_OUT)
        corpora["code-ood"] = ood_corpus(workdir, banned, lm.tokenizer, lm.eos_token_id, id_tokens,
                                         [(f.id, f.prompt, f.source) for f in rest], "code-ood")
    return corpora


def run(args) -> Path | None:
    workdir = Path(args.workdir)
    out_dir = workdir / ("quick" if args.quick else "full")
    out_dir.mkdir(parents=True, exist_ok=True)
    functions = code_functions(CODE_FUNCTIONS) if "code" in args.sets else None
    sets = eval_sets(args.sets, functions)
    banned = {norm(p) for prompts in sets.values() for p in prompts}
    lm = load_model(ModelConfig())
    # The external references run as users run HF: a fresh process, plain transformers, the
    # model folder, generate()'s defaults (dresd.evaluation.hf_reference.PlainHFProcess).
    stock = None
    corpora = build_corpora(workdir, args.sets, functions, banned, lm, args.id_rows, args.code_id_rows)
    if args.only_store:
        if args.only_store not in corpora:
            raise SystemExit(f"--only-store {args.only_store}: no set of --sets {','.join(args.sets)} drafts from it")
        store(workdir, args.only_store, corpora[args.only_store])
        return None
    roots = {name: store(workdir, name, path) for name, path in corpora.items()}
    # Calibrated afresh: the forward cost per verified position depends on this machine's state now.
    cost = cached_cost_model(lm.model, refresh=True)
    engines = {None: Engine(lm, cost=cost), **{k: Engine(lm, Datastore(r), cost=cost) for k, r in roots.items()}}
    chosen = chosen_methods(args.methods)
    results_path = out_dir / "results.jsonl"
    done = load_results(results_path)
    log = ReliabilityLog()  # every verified draft node's predicted acceptance, taken per request

    def engine_of(m: Method, set_name: str) -> Engine:
        return engines[None if m.store is None else STORES[SCENARIO[set_name]][m.store]]

    def generate(m: Method, set_name: str, prompt: str, n: int) -> Generation:
        engine = engine_of(m, set_name)
        nonlocal stock
        if m.spec is None:
            from dresd.evaluation.hf_reference import PlainHFProcess, hf_generate

            if not m.hf_stock:
                return hf_generate(lm.model, engine.prompt_ids(prompt), n, lm.eos_token_id, m.hf_lookup)
            if stock is None:
                stock = PlainHFProcess(lm.model.name_or_path)
            return stock.generate(engine.prompt_ids(prompt), n, m.hf_lookup)
        watch(engine.decoder(m.spec), log)
        return engine.generate(prompt, m.spec, n)

    # Untimed warm-up, once per (method, engine): builds drafters (REST index, suffix tree warm-up).
    t0 = time.perf_counter()
    warmed = set()
    for set_name in sets:
        for m in chosen:
            if (m.name, id(engine_of(m, set_name))) not in warmed:
                warmed.add((m.name, id(engine_of(m, set_name))))
                generate(m, set_name, "Hello!", 4)
    print(f"warm-up (drafters) {time.perf_counter() - t0:.1f} s")
    with open(results_path, "a") as fh:
        for set_name, prompts in sets.items():
            for i, prompt in enumerate(tqdm(prompts[: args.prompts], desc=f"{set_name}: {len(chosen)} methods", unit="prompt")):
                for m in chosen:
                    if (set_name, m.name, i) in done:
                        continue
                    log.take()  # nothing logged outside this request counts for it
                    gen = generate(m, set_name, prompt, args.max_new_tokens)
                    rec = {"set": set_name, "method": m.name, "prompt": i, "token_ids": gen.token_ids,
                           "metrics": gen.metrics.summary(), "reliability": log.take()}
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    done[(set_name, m.name, i)] = rec
    if stock is not None:
        stock.close()
    from dresd.evaluation.report import write_report

    done = {k: v for k, v in done.items() if k[0] in sets}
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
    p.add_argument("--id-rows", type=int, default=ID_ROWS,
                   help=f"ShareGPT turns the model answers for the chat ID store (default {ID_ROWS}); a smaller "
                        "store builds sooner: give it its own --workdir, since stores are cached there")
    p.add_argument("--code-id-rows", type=int, default=CODE_ID_ROWS,
                   help=f"functions the model answers for the code ID store (default {CODE_ID_ROWS}); as --id-rows")
    p.add_argument("--sets", default=",".join(SCENARIO),
                   help=f"comma list of evaluation sets (default all: {','.join(SCENARIO)}); only their stores are built")
    p.add_argument("--only-store", choices=[name for stores in STORES.values() for name in stores.values()],
                   help="write the corpora, build (or reuse) this one datastore and stop: run one process per store to build them at once")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (repeatable): a module that registers methods of its own")
    args = p.parse_args(argv)
    if args.prompts is None:
        args.prompts = 3 if args.quick else 20
    args.sets = [n.strip() for n in args.sets.split(",") if n.strip()]
    unknown = [n for n in args.sets if n not in SCENARIO]
    if unknown or not args.sets:
        p.error(f"--sets: unknown or no set {unknown}; sets: {', '.join(SCENARIO)}")
    for module in args.imports:
        importlib.import_module(module)
    chosen_methods(args.methods)  # a bad name fails now, not after the datastores are built
    report = run(args)
    if report is not None:
        print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
