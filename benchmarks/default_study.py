"""The default method against SuffixDecoding and plain decoding, in paired passes: issue 26's goals.

    .venv/bin/python benchmarks/default_study.py --workdir runs/s26 --id-rows 192 --code-id-rows 64 \\
        --sets sharegpt,mtbench,code --methods suffix+budget,dresd,auto \\
        --prompts 8 --max-new-tokens 96 --passes 3 --temperatures 0,0.7

The scenarios and datastores are spec_bench.py's (chat: held-out ShareGPT and MT-Bench first
turns; code: held-out functions with docstrings; each with an ID store of the model's own
answers and an OOD store of human-written text of the same size), built or reused under
--workdir (`--id-rows` below spec_bench's default builds a smaller chat ID store sooner).
Every method runs on both stores (`name` and `name@ood`), greedy and at each sampling
temperature (top-p 1, a fixed seed per prompt, so speculative sampling must emit exactly
what plain sampling emits).

Within a pass, each prompt runs every method in turn, the order rotating by prompt and
pass, so the machine's drift (20% over minutes on this 2-core host) hits all alike. Each
pass and temperature starts from new engines: SuffixDecoding as published keeps served
responses for later requests, and would otherwise draft a prompt from its own earlier answer. The
ratios are paired: a method's "x plain" and "x base" (against --base) are the medians over passes of that
pass's ratio of aggregate tokens/s (all prompts), not ratios of medians. MAT is mean
accepted tokens per target call (bonus included); the oracle is the speed had every step
verified exactly its accepted tokens (dresd.evaluation.oracle), at this pass's plain step.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as spec_bench.py: spinning threads slow a shared machine
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from tqdm import tqdm  # noqa: E402

import spec_bench as sb  # noqa: E402  (benchmarks/ is on sys.path: the script's own folder)
from dresd.config import ModelConfig, SamplingParams  # noqa: E402
from dresd.datastore.store import Datastore  # noqa: E402
from dresd.decoding.calibration import cached_cost_model  # noqa: E402
from dresd.decoding.engine import Engine  # noqa: E402
from dresd.evaluation.compare import paired_prompt, paired_table  # noqa: E402
from dresd.evaluation.methods import Method, chosen_methods  # noqa: E402
from dresd.evaluation.reliability import ReliabilityLog, plot_reliability, pooled, report_lines, watch  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402
from dresd.model.loading import load_model  # noqa: E402

PLAIN = "greedy"  # plain decoding: greedy at temperature 0, plain sampling above it
SEED = 1234  # + the prompt's index: the seed of its sampled decodes, the same for every method


def study_methods(names: str) -> list[Method]:
    """Plain decoding, then every named method on the ID store and on the OOD store."""
    both = ",".join(f"{n},{n}@ood" for n in names.split(",") if n.strip() and n.strip() != PLAIN)
    return chosen_methods(both)


def run(args) -> tuple[list[str], Path]:
    workdir = Path(args.workdir)
    functions = sb.code_functions(sb.CODE_FUNCTIONS) if "code" in args.sets else None
    sets = sb.eval_sets(args.sets, functions)
    banned = {sb.norm(p) for prompts in sets.values() for p in prompts}
    lm = load_model(ModelConfig())
    corpora = sb.build_corpora(workdir, args.sets, functions, banned, lm, args.id_rows, args.code_id_rows)
    roots = {name: sb.store(workdir, name, path) for name, path in corpora.items()}
    cost = cached_cost_model(lm.model, refresh=True)  # this machine's forward cost now
    stores = {k: Datastore(r) for k, r in roots.items()}
    chosen = study_methods(args.methods)
    names = [m.name for m in chosen]
    engines: dict = {}

    def fresh_engines() -> None:
        """New engines, so new drafters: SuffixDecoding as published keeps every served response
        for later requests, and a pass or temperature that decodes a prompt again would draft
        from its own earlier answer. Each (pass, temperature) block starts from the warmed
        corpus alone, and within it every prompt is decoded once per method."""
        engines.clear()
        engines.update({None: Engine(lm, cost=cost), **{k: Engine(lm, st, cost=cost) for k, st in stores.items()}})
        for set_name in sets:  # untimed warm-up: drafters are built (suffix trees warmed) before any timing
            for m in chosen:
                engine_of(m, set_name).generate("Hello!", m.spec, 4)

    def engine_of(m: Method, set_name: str) -> Engine:
        return engines[None if m.store is None else sb.STORES[sb.SCENARIO[set_name]][m.store]]

    cells = {(s, t): {"passes": [], "identical": dict.fromkeys(names, 0), "runs": dict.fromkeys(names, 0)}
             for s in sets for t in args.temperatures}
    # Every verified node's predicted acceptance against the outcome, per method and temperature.
    calibration: dict[str, ReliabilityLog] = {}
    log = open(workdir / "default_study.jsonl", "a")
    for k in range(args.passes):
        for cell in cells.values():
            cell["passes"].append({n: [] for n in names})
        for t in args.temperatures:
            fresh_engines()
            for set_name, prompts in sets.items():
                for i, prompt in enumerate(tqdm(prompts[: args.prompts], unit="prompt",
                                                desc=f"pass {k + 1}/{args.passes} t={t:g} {set_name}")):
                    cell = cells[(set_name, t)]
                    sampling = SamplingParams(temperature=t, seed=SEED + i) if t > 0 else None

                    def generate(m: Method):
                        engine = engine_of(m, set_name)
                        if m.spec.method != PLAIN:
                            watch(engine.decoder(m.spec), calibration.setdefault(f"{m.name} t={t:g}", ReliabilityLog()))
                        return engine.generate(prompt, m.spec, args.max_new_tokens, sampling)

                    for name, gen in paired_prompt(cell, chosen, k * len(prompts) + i, generate, PLAIN).items():
                        log.write(json.dumps({"pass": k, "set": set_name, "temperature": t, "prompt": i,
                                              "method": name, "metrics": gen.metrics.summary()}) + "\n")
        log.flush()
    log.close()
    out = [f"SmolLM2-135M-Instruct, {os.cpu_count()} cores; {args.prompts} prompts per set x {args.max_new_tokens} new "
           f"tokens; {args.passes} passes, methods in rotating order per prompt; ratios are medians of per-pass "
           f"ratios, 'x base' against {args.base}; temperature > 0 samples with top-p 1 and a seed per prompt, and 'identical' compares with plain "
           f"sampling of the same seed. Stores: " + ", ".join(
               f"{k} {engines[k].datastore.manifest.get('counts', {}).get('records', '?')} records" for k in roots)]
    for (set_name, t), cell in cells.items():
        out += ["", f"## {set_name}, temperature {t:g}", ""]
        for tag in ("", "@ood"):
            base = f"{args.base}{tag}"
            out += [f"Store {'ID' if not tag else 'OOD'} ('x base' against {base}):", ""]
            out += paired_table(cell, [PLAIN] + [n for n in names if n != PLAIN and n.endswith("@ood") == bool(tag)], cost,
                         base)
            out.append("")
    out_dir = Path(args.out or workdir / "default_study")
    out_dir.mkdir(parents=True, exist_ok=True)
    image = "reliability.png"  # added to benchmarks/results/ as default_study_reliability.png
    drawn = plot_reliability(pooled(calibration), out_dir / image)
    return out + report_lines(calibration, image if drawn else None), out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(sb.ROOT / "runs" / "bench"), help="spec_bench.py's stores and corpora")
    p.add_argument("--id-rows", type=int, default=sb.ID_ROWS, help="as spec_bench.py --id-rows")
    p.add_argument("--code-id-rows", type=int, default=sb.CODE_ID_ROWS, help="as spec_bench.py --code-id-rows")
    p.add_argument("--sets", default="sharegpt,mtbench,code", help=f"comma list of {', '.join(sb.SCENARIO)}")
    p.add_argument("--methods", default="suffix+budget,dresd,auto", help="comma list of spec_bench method names")
    p.add_argument("--base", default="suffix+budget",
                   help="the method of --methods the 'x base' columns divide by (default: SuffixDecoding under "
                        "the draft budget, what `dresd generate --method suffix` runs)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--temperatures", default="0,0.7", help="comma list; 0 = greedy")
    p.add_argument("--out", default=None, help="folder for the run's result JSON (default: --workdir/default_study)")
    args = p.parse_args(argv)
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not args.sets or any(s not in sb.SCENARIO for s in args.sets):
        p.error(f"--sets {args.sets}: sets are {', '.join(sb.SCENARIO)}")
    if args.base not in args.methods.split(","):
        p.error(f"--methods must include --base {args.base}: the goals are ratios against it")
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    study_methods(args.methods)  # a bad name fails before any store is built
    lines, out_dir = run(args)
    print("\n".join(lines))
    print(f"result: {save_run('default_study', chr(10).join(lines), out_dir, sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
