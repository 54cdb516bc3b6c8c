"""Fit first against the full-reservoir fit (issue 24): one corpus built both ways.

    .venv/bin/python benchmarks/fit_first_bench.py [--max-records 100] [--sample-size 12000] \\
        [--flat-below 20000] [--prompts 8] [--max-new-tokens 64] [--out runs/bench/fit_first] \\
        [--id-corpus runs/bench/batch_id/id.jsonl]

Builds the corpus of jobs/configs/build_sharegpt.yaml (the packaged ShareGPT, first turns;
its first --max-records rows) twice in one Ray instance with the same index settings:
- `fit: all`: the compressor fitted on --sample-size keys drawn uniformly from the whole
  corpus (what the streaming reservoir over every embedded key drew before fit-first; it
  embeds every record once more for the fit);
- `fit: sample`: the keys of whole records in a seeded random order, embedded before the
  streaming pass (the default).
Either way the index then trains on --sample-size stored keys drawn uniformly.
--sample-size is well below the corpus's keys so that the two samples differ: "sample" then
draws from --sample-size / (keys a record) records, fewer than the default 200,000 keys
would give, a harder case than a default build's. --flat-below (the config's 50,000 unless
given) lets a corpus this small get the IVF-PQ index.

Reports side by side the intrinsic check (recall@50 against exact search, self-retrieval
MRR), scratch bytes per key, what each fit embedded, the build times, and DReSD's mean
accepted tokens (paper settings, no budget) on held-out ShareGPT first turns (rows after the
corpus whose prompt is not in it: the corpus's own distribution). With --id-corpus (the
spec benchmark's in-distribution store corpus: the packaged model's own greedy answers to
ShareGPT first turns after the first 40, made by jobs/decode.py with
jobs/configs/generate_id_corpus.yaml), the same comparison runs on it too, its MAT on those
first 40 turns: the in-distribution scenario, where drafts are accepted often enough for MAT
to tell fits apart. Gate: recall@50 and MRR drop by at most 0.01, MAT by at most 2%.
Writes <out>/fit_first_bench.md and .json.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the dresd command line sets it (dresd/cli/main.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

from dresd.config import BuildConfig, CorpusConfig, ModelConfig, SpeculativeConfig, load_config  # noqa: E402
from dresd.datastore.corpus import (SHAREGPT, RecordError, extract_examples, read_rows,  # noqa: E402
                                    sharegpt_first_turns)
from dresd.datastore.store import Datastore  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("all", "sample")
ID_HELD_OUT = 40  # the first deduplicated ShareGPT turns, which the ID corpus leaves out (benchmarks/spec_bench.py)


def held_out_prompts(cfg: CorpusConfig, n: int, max_chars: int = 1000) -> list[str]:
    """First turns of ShareGPT rows after the corpus's, whose prompt the corpus does not hold."""
    first = CorpusConfig(kind="conversations", conversation_mode="first_turn")
    seen, out = set(), []
    for raw in read_rows(SHAREGPT, on_error="skip"):
        try:
            examples = extract_examples(raw, first)
        except RecordError:
            continue
        for ex in examples:
            key = ex.prompt.strip()
            if raw.row <= cfg.max_records:
                seen.add(key)
            elif key not in seen and len(ex.prompt) <= max_chars:
                seen.add(key)
                out.append(ex.prompt)
        if len(out) >= n:
            break
    return out[:n]


def build(cfg: BuildConfig, mode: str, out: Path, reuse: bool) -> dict:
    """Build the store with fit `mode` into `out` (or read back an earlier run's report); the report's figures."""
    from pipelines.build import build_datastore

    saved = out / f"{mode}_report.json"
    if reuse and saved.is_file() and (out / f"store_{mode}" / "CURRENT").is_file():
        return json.loads(saved.read_text())
    shutil.rmtree(out / f"store_{mode}", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg.fit, cfg.output = mode, str(out / f"store_{mode}")
    t = time.perf_counter()
    report = build_datastore(cfg)
    print("\n".join(report.lines()), flush=True)
    figures = {"keys": report.keys, "tokens": report.tokens, "records": report.examples_embedded,
               "seconds": time.perf_counter() - t, "timings": report.timings, "check": report.check,
               "scratch_per_key": report.scratch_bytes_per_key, "fit": report.fit, "layout": report.index_layout}
    saved.write_text(json.dumps(figures))
    return figures


def mat(lm, stores: dict[str, Path], prompts: list[str], max_new: int) -> dict[str, dict]:
    """DReSD (paper settings, no budget) on each store, the same prompts."""
    from dresd.decoding.engine import Engine
    from dresd.evaluation.compare import run_methods, summarize

    spec = {"dresd": SpeculativeConfig(method="dresd", budget="off")}
    out = {}
    for mode, path in stores.items():
        [row] = summarize(run_methods(Engine(lm, Datastore(path)), prompts, spec, max_new))
        out[mode] = row
        print(f"{mode}: MAT {row['mean_accepted_tokens']:.3f}, acceptance {row['acceptance_rate']:.3f}", flush=True)
    return out


def section(title: str, corpus: str, args, figures: dict, mats: dict, prompts: str) -> tuple[list[str], bool]:
    """One scenario's table, and whether it passes the gate."""
    a, s = figures["all"], figures["sample"]
    d_recall = s["check"]["recall@50"] - a["check"]["recall@50"]
    d_mrr = s["check"]["self_mrr@50"] - a["check"]["self_mrr@50"]
    d_mat = mats["sample"]["mean_accepted_tokens"] / mats["all"]["mean_accepted_tokens"] - 1
    ok = d_recall >= -0.01 and d_mrr >= -0.01 and d_mat >= -0.02

    def row(name, fn, goal=""):
        return f"| {name} | {fn(a)} | {fn(s)} | {goal} |"

    lines = [
        f"## {title}",
        "",
        f"Corpus: {corpus} ({a['records']} records, {a['keys']} keys); index.sample_size {args.sample_size}"
        + (f", index.flat_below {args.flat_below}" if args.flat_below is not None else "")
        + f"; index {a['layout'].split(':')[0]}. MAT: {prompts} x {args.max_new_tokens} new tokens, DReSD with the "
        "paper's settings (no budget).",
        "",
        "| figure | fit: all (reservoir over every key) | fit: sample (fit first) | goal |",
        "|---|---|---|---|",
        row("recall@50 (index vs exact)", lambda f: f"{f['check']['recall@50']:.3f}",
            f"sample - all = {d_recall:+.3f} (>= -0.01)"),
        row("self-retrieval MRR@50", lambda f: f"{f['check']['self_mrr@50']:.3f}", f"sample - all = {d_mrr:+.3f} (>= -0.01)"),
        row("mean accepted tokens (DReSD)", lambda f: f"{mats[f['fit']['mode']]['mean_accepted_tokens']:.3f}",
            f"sample / all - 1 = {d_mat:+.1%} (>= -2%)"),
        row("acceptance rate (DReSD)", lambda f: f"{mats[f['fit']['mode']]['acceptance_rate']:.3f}"),
        row("scratch bytes per key", lambda f: f"{f['scratch_per_key']:.1f}", "<= 300"),
        row("fit sample: keys / records / tokens embedded",
            lambda f: f"{f['fit']['sample_keys']} / {f['fit']['sample_records']} / {f['fit']['sample_tokens']}"),
        row("explained variance of the PCA", lambda f: f"{f['fit']['explained_variance']:.3f}"),
        row("build wall (count / fit / stream / train+code+merge)",
            lambda f: f"{f['seconds']:.0f} s ({f['timings']['count']:.0f} / {f['timings']['fit']:.0f} / "
                      f"{f['timings']['read+tokenize+embed+write']:.0f} / {f['timings']['train+code+merge']:.0f})"),
        "",
        f"Gate (recall and MRR within 0.01, MAT within 2%): {'pass' if ok else 'FAIL'}.",
        "",
    ]
    return lines, ok


def base_config(args) -> BuildConfig:
    cfg = load_config(BuildConfig, ROOT / "jobs/configs/build_sharegpt.yaml")
    cfg.corpus.max_records, cfg.index.sample_size, cfg.shard_rows = args.max_records, args.sample_size, args.shard_rows
    if args.flat_below is not None:
        cfg.index.flat_below = args.flat_below
    return cfg


def id_config(args) -> BuildConfig:
    """The ID corpus (jsonl of id, prompt, response), with the same settings otherwise."""
    cfg = base_config(args)
    cfg.corpus = CorpusConfig(paths=[str(Path(args.id_corpus).resolve())], kind="prompt_response", id_field="id",
                              prompt_format=cfg.corpus.prompt_format, max_tokens=cfg.corpus.max_tokens)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-records", type=int, default=100)
    p.add_argument("--sample-size", type=int, default=12_000)
    p.add_argument("--flat-below", type=int, default=None, help="index.flat_below (default: the config's)")
    p.add_argument("--shard-rows", type=int, default=50)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default="runs/bench/fit_first")
    p.add_argument("--reuse", action="store_true", help="reuse stores (and reports) an earlier run built")
    p.add_argument("--id-corpus", default=None, help="also compare on this in-distribution corpus (jsonl: id, prompt, "
                                                       "response; e.g. runs/bench/batch_id/id.jsonl)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from dresd.model.loading import load_model
    from pipelines.runtime import ensure_ray

    ensure_ray()
    scenarios = [("ShareGPT conversations (jobs/configs/build_sharegpt.yaml)",
                  f"jobs/configs/build_sharegpt.yaml, first {args.max_records} rows", base_config, out,
                  lambda cfg: held_out_prompts(cfg.corpus, args.prompts),
                  f"{args.prompts} held-out ShareGPT first turns (rows after the corpus)")]
    if args.id_corpus:
        scenarios.append(("In distribution: the model's own answers (the spec benchmark's ID corpus)",
                          args.id_corpus, id_config, out / "id",
                          lambda cfg: [p for _, p, _ in sharegpt_first_turns()[:ID_HELD_OUT]][: args.prompts],
                          f"{args.prompts} of the first {ID_HELD_OUT} ShareGPT first turns (held out of the ID corpus)"))
    built = []
    for title, corpus, make_cfg, folder, prompts_of, prompts_text in scenarios:
        figures = {mode: build(make_cfg(args), mode, folder, args.reuse) for mode in MODES}
        built.append((title, corpus, figures, prompts_of(make_cfg(args)), prompts_text, folder))
    lm = load_model(ModelConfig())
    lines = [f"Fit first vs the full-reservoir fit, {datetime.now():%Y-%m-%d %H:%M}, 2-core CPU, SmolLM2-135M fp32, "
             "one Ray instance", ""]
    passed = True
    for title, corpus, figures, prompts, prompts_text, folder in built:
        mats = mat(lm, {m: folder / f"store_{m}" for m in MODES}, prompts, args.max_new_tokens)
        part, ok = section(title, corpus, args, figures, mats, prompts_text)
        lines += part
        passed &= ok
    lines.append(f"Every scenario within the gate: {'yes' if passed else 'NO'}.")
    text = "\n".join(lines)
    print("\n" + text)
    (out / "fit_first_bench.md").write_text(text + "\n")
    print(f"wrote {save_run('fit_first_bench', text, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
