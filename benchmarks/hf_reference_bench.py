"""Our greedy loop against HF `generate()` as users run each: fresh processes, interleaved.

Each pass starts one fresh process per variant (the order rotates from pass to pass) over
the same prompts and reports tokens/s over the generate calls (prefill included, model
load excluded), over all prompts and without the first (which pays one-off start-up
costs); the table gives the median over passes. Variants:

- `hf`: benchmarks/hf_plain_generate.py: plain transformers, the model folder, `generate()`
  with its defaults, the environment as the user's shell has it (no OMP_WAIT_POLICY,
  no OPENBLAS_NUM_THREADS): the reference.
- `hf-passive`: the same with the environment the side-by-side benchmark sets for itself
  (OMP_WAIT_POLICY=PASSIVE, OPENBLAS_NUM_THREADS=1).
- `dresd`: `dresd generate --method greedy` as a user runs it (no warm-up call: one method).
- `dresd-passive`: the same with OMP_WAIT_POLICY=PASSIVE (the pair of `hf-passive`).
- `inproc`: the side-by-side benchmark's way (benchmarks/spec_bench.py before this script):
  one process with OMP_WAIT_POLICY=PASSIVE, the fast-path model and a stock copy, a warm-up
  call each, then our greedy and HF generate() interleaved per prompt; also HF generate() on
  the fast-path model (what `generate()` gives on a model loaded by dresd's load_model).

    .venv/bin/python benchmarks/hf_reference_bench.py --prompts 10 --max-new-tokens 64 --passes 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("hf", "dresd", "hf-passive", "dresd-passive", "inproc")
BENCH_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the thread settings the project's tools set."""
    env = {k: v for k, v in os.environ.items() if k not in BENCH_ENV}
    env.update(extra or {})
    return env


def rates(rows: list[dict]) -> dict[str, float]:
    """tokens/s over all prompts and over all but the first."""
    def tps(rs):
        wall = sum(r["wall_s"] for r in rs)
        return sum(r["new_tokens"] for r in rs) / wall if wall else float("nan")
    return {"all": tps(rows), "warm": tps(rows[1:])}


def run_hf(model_dir: str, prompts: Path, n: int, env: dict) -> dict[str, dict]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hf_plain_generate.py"), model_dir, str(prompts),
           "--max-new-tokens", str(n)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"hf": {"rows": [r for r in rows if "summary" not in r], "info": rows[-1]}}


def run_dresd(prompts: Path, n: int, tmp: Path, env: dict, name: str = "dresd") -> dict[str, dict]:
    out = tmp / f"{name}.jsonl"
    cmd = [str(Path(sys.executable).parent / "dresd"), "generate", "--method", "greedy", "--prompts", str(prompts),
           "--max-new-tokens", str(n), "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {name: {"rows": [{"new_tokens": r["metrics"]["new_tokens"], "wall_s": r["metrics"]["wall_s"],
                                "token_ids": r["token_ids"]} for r in rows]}}


def run_inproc(prompts: Path, n: int) -> dict[str, dict]:
    cmd = [sys.executable, __file__, "--inproc-child", str(prompts), "--max-new-tokens", str(n)]
    out = subprocess.run(cmd, env=user_env(BENCH_ENV), check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def inproc_child(prompts: Path, n: int) -> None:
    """The side-by-side benchmark's set-up: both models in one process, warm-up, interleaved."""
    sys.path.insert(0, str(ROOT))
    from dresd.config import ModelConfig, SpeculativeConfig
    from dresd.decoding.engine import Engine
    from dresd.evaluation.hf_reference import hf_generate
    from dresd.model.loading import load_model

    lm = load_model(ModelConfig())
    stock = load_model(ModelConfig(dual_layout=False)).model
    engine, greedy = Engine(lm), SpeculativeConfig(method="greedy")
    texts = [line for line in prompts.read_text().splitlines() if line.strip()]
    engine.generate("Hello!", greedy, 4)
    hf_generate(stock, engine.prompt_ids("Hello!"), 4, lm.eos_token_id)
    hf_generate(lm.model, engine.prompt_ids("Hello!"), 4, lm.eos_token_id)
    out = {"inproc-ours": {"rows": []}, "inproc-hf": {"rows": []}, "inproc-hf-on-fast-path": {"rows": []}}
    for text in texts:
        ids = engine.prompt_ids(text)
        for name, gen in (("inproc-ours", engine.generate(text, greedy, n)),
                          ("inproc-hf", hf_generate(stock, ids, n, lm.eos_token_id)),
                          ("inproc-hf-on-fast-path", hf_generate(lm.model, ids, n, lm.eos_token_id))):
            out[name]["rows"].append({"new_tokens": gen.metrics.new_tokens, "wall_s": gen.metrics.wall_s,
                                      "token_ids": gen.token_ids})
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=10, help="MT-Bench first turns, the first N")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "runs" / "hf_reference"), help="folder for the report (.md, .json)")
    p.add_argument("--inproc-child", metavar="PROMPTS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inproc_child:
        inproc_child(Path(args.inproc_child), args.max_new_tokens)
        return 0
    sys.path.insert(0, str(ROOT))
    from dresd.datastore.corpus import mtbench_first_turns
    from dresd.model.loading import DEFAULT_GGUF_FILE, gguf_cache_dir, packaged_default_dir

    model_dir = str(gguf_cache_dir(packaged_default_dir() / DEFAULT_GGUF_FILE))
    variants = args.variants.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="hf-ref-"))
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(q.replace("\n", " ") for q in mtbench_first_turns()[: args.prompts]) + "\n")
    runners = {"hf": lambda: run_hf(model_dir, prompts, args.max_new_tokens, user_env()),
               "hf-passive": lambda: {"hf-passive": run_hf(model_dir, prompts, args.max_new_tokens,
                                                           user_env(BENCH_ENV))["hf"]},
               "dresd": lambda: run_dresd(prompts, args.max_new_tokens, tmp, user_env()),
               "dresd-passive": lambda: run_dresd(prompts, args.max_new_tokens, tmp, user_env(BENCH_ENV),
                                                  "dresd-passive"),
               "inproc": lambda: run_inproc(prompts, args.max_new_tokens)}
    results: dict[str, list[dict]] = {}
    log, loads = [], [os.getloadavg()[0]]
    tokens: dict[str, list[list[int]]] = {}
    for k in range(args.passes):
        order = variants[k % len(variants):] + variants[: k % len(variants)]
        for v in order:
            for name, res in runners[v]().items():
                r = rates(res["rows"])
                r["load"] = os.getloadavg()[0]
                loads.append(r["load"])
                log.append((k + 1, name, r))
                results.setdefault(name, []).append(r)
                tokens[name] = [row["token_ids"] for row in res["rows"]]
                print(f"pass {k + 1} {name}: {r['all']:.1f} tok/s (without the first prompt {r['warm']:.1f})"
                      f"  load {r['load']:.1f}"
                      + (f"  [{res['info']['dtype']}, {res['info']['threads']} threads, {res['info']['attn']}]"
                         if "info" in res else ""), flush=True)
    ref = statistics.median(r["all"] for r in results["hf"]) if "hf" in results else None
    import platform

    import torch

    md = [f"# HF generate() as users run it, against our greedy: {time.strftime('%Y-%m-%d %H:%M')}", "",
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, SmolLM2-135M-Instruct "
          f"({model_dir}); {args.prompts} MT-Bench first turns x {args.max_new_tokens} new tokens; fresh "
          f"processes interleaved, {args.passes} passes, the median; a shared machine (load average "
          f"{min(loads):.1f}-{max(loads):.1f} while it ran). tok/s = new tokens / seconds of the generate "
          "calls, prefill included, model load excluded.", "",
          "| variant | tok/s | tok/s without the first prompt | ms/token / hf's | tokens identical to hf |",
          "|---|---|---|---|---|"]
    for name, rs in results.items():
        a, w = statistics.median(r["all"] for r in rs), statistics.median(r["warm"] for r in rs)
        ratio = f"{ref / a:.2f}x" if ref else "-"
        same = f"{sum(x == y for x, y in zip(tokens[name], tokens['hf']))}/{len(tokens[name])}" if "hf" in tokens else "-"
        md.append(f"| {name} | {a:.1f} | {w:.1f} | {ratio} | {same} |")
    md += ["", "## Every pass", "", "| pass | variant | tok/s | without the first prompt | load average |",
           "|---|---|---|---|---|"]
    md += [f"| {k} | {name} | {r['all']:.1f} | {r['warm']:.1f} | {r['load']:.1f} |" for k, name, r in log]
    text = "\n".join(md) + "\n"
    print("\n" + text)
    from dresd.evaluation.results import save_run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_reference_bench.md").write_text(text)
    print(f"written {save_run('hf_reference_bench', text, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
