"""Running several decoding methods on the same prompts and comparing them honestly.

Methods are interleaved per prompt so machine noise hits all of them alike; speedup is
tokens/s of a method over tokens/s of our plain greedy loop in the same run; losslessness
is checked token by token against the greedy outputs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from tqdm import tqdm

from dresd.config import SpeculativeConfig
from dresd.decoding.loop import Generation
from dresd.decoding.engine import Engine
from dresd.decoding.budget import CostModel
from dresd.decoding.metrics import DecodeMetrics, aggregate
from dresd.evaluation.oracle import oracle_tokens_per_s, plain_step_s

GREEDY = "greedy"


@dataclass
class MethodRun:
    """All generations of one method, in prompt order."""

    name: str
    spec: SpeculativeConfig
    generations: list[Generation]


def run_methods(engine: Engine, prompts: list[str], specs: dict[str, SpeculativeConfig], max_new_tokens: int,
                warmup: bool = True, sampling=None) -> dict[str, MethodRun]:
    """Generate every prompt with every method, interleaved per prompt."""
    if warmup and prompts:
        # First calls pay one-off costs (allocator growth, lazy init): keep them out of the figures.
        for spec in specs.values():
            engine.generate(prompts[0], spec, min(8, max_new_tokens))
    runs = {name: MethodRun(name, spec, []) for name, spec in specs.items()}
    for prompt in tqdm(prompts, desc=f"decoding ({', '.join(specs)})", unit="prompt"):
        for name, spec in specs.items():
            runs[name].generations.append(engine.generate(prompt, spec, max_new_tokens, sampling))
    return runs


def summarize(runs: dict[str, MethodRun], baseline: str = GREEDY, cost: CostModel | None = None) -> list[dict]:
    """One row per method: speed, speedup over the baseline, acceptance, MAT, losslessness.

    With `cost`, each row also holds the oracle bound (dresd.evaluation.oracle), its forward
    cost taken at the baseline's measured step."""
    base = runs.get(baseline)
    base_m = aggregate([g.metrics for g in base.generations]) if base else None
    base_tps = base_m.tokens_per_s if base_m else 0.0
    step_s = plain_step_s(base_m) if base_m else None
    rows = []
    for name, run in runs.items():
        m = aggregate([g.metrics for g in run.generations])
        identical = None
        if base is not None:
            identical = sum(g.token_ids == b.token_ids for g, b in zip(run.generations, base.generations))
        rows.append({
            "method": name,
            "prompts": len(run.generations),
            "new_tokens": m.new_tokens,
            "tokens_per_s": m.tokens_per_s,
            "speedup": m.tokens_per_s / base_tps if base_tps else float("nan"),
            "acceptance_rate": m.acceptance_rate,
            "mean_accepted_tokens": m.mean_accepted_tokens,
            "verified_per_call": m.verified_positions / m.target_calls if m.target_calls else 0.0,
            "calls_per_token": m.target_calls / m.new_tokens if m.new_tokens else 0.0,
            "retrieval_share": m.retrieval_share,
            "ms_per_token": 1000 * m.wall_s / m.new_tokens if m.new_tokens else 0.0,
            "per_position_acceptance": m.per_position_acceptance,
            "identical_to_greedy": identical,
            # Where the time went (seconds summed over the prompts), for the report's profile.
            "target_calls": m.target_calls,
            "wall_s": m.wall_s,
            "prefill_s": m.prefill_s,
            "model_s": m.model_s,
            "retrieval_s": m.retrieval_s,
            "other_s": m.other_s,
            # Loop internals are not observable in external references (HF generate).
            "observable": m.target_calls > 0,
        })
        if cost is not None:
            oracle = oracle_tokens_per_s(m, cost, step_s)
            rows[-1].update(oracle_tokens_per_s=oracle, oracle_speedup=oracle / base_tps if base_tps else float("nan"),
                            of_oracle=m.tokens_per_s / oracle if oracle else float("nan"))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The comparison table people read (MAT = tokens per target call, bonus included; the
    oracle columns when the rows hold the bound: dresd.evaluation.oracle)."""
    oracle = any("oracle_tokens_per_s" in r for r in rows)
    head = ("| method | tokens/s | speedup vs greedy | "
            + ("oracle tokens/s | oracle speedup | measured / oracle | " if oracle else "")
            + "acceptance | MAT (incl. bonus) | verified pos/call | target calls/token | retrieval share "
            "| identical to greedy |")
    lines = [head, "|" + "---|" * (12 if oracle else 9)]
    for r in rows:
        ident = "n/a" if r["identical_to_greedy"] is None else f"{r['identical_to_greedy']}/{r['prompts']}"
        if r.get("observable", True):
            inner = (f"{r['acceptance_rate']:.3f} | {r['mean_accepted_tokens']:.2f} | {r['verified_per_call']:.1f} "
                     f"| {r.get('calls_per_token', 0.0):.3f} | {r['retrieval_share']:.1%}")
        else:
            inner = "n/a | n/a | n/a | n/a | n/a"
        bound = ""
        if oracle:
            bound = (f"{r['oracle_tokens_per_s']:.2f} | {r['oracle_speedup']:.2f}x | {r['of_oracle']:.2f} | "
                     if r.get("observable", True) and r.get("oracle_tokens_per_s") else "n/a | n/a | n/a | ")
        lines.append(f"| {r['method']} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | {bound}{inner} | {ident} |")
    return "\n".join(lines)


# Paired passes: every pass decodes every prompt with every method, in an order that rotates
# by prompt and pass so the machine's drift hits all alike; a method's ratio against another
# is the median over passes of the ratio within each pass (benchmarks/default_study.py,
# benchmarks/gpu_check.py).

def rotated(items: list, start: int) -> list:
    """`items` starting at index `start` (modulo its length), wrapping around."""
    start %= len(items)
    return items[start:] + items[:start]


def paired_prompt(cell: dict, methods: list, start: int, generate, plain: str = GREEDY) -> dict[str, Generation]:
    """One prompt of a paired pass: `generate(method)` for every method (anything with a
    `name`) in the order rotated to `start`, each one's metrics appended to the pass's lists
    in `cell` (paired_table's layout) and its output counted as equal to `plain`'s or not.
    Returns the generations by method name, in the order they ran."""
    gens: dict[str, Generation] = {}
    for m in rotated(methods, start):
        gens[m.name] = generate(m)
        cell["passes"][-1][m.name].append(gens[m.name].metrics)
    for name, gen in gens.items():
        cell["runs"][name] += 1
        cell["identical"][name] += gen.token_ids == gens[plain].token_ids
    return gens


def median_ratio(passes: list[dict[str, float]], name: str, base: str) -> float | None:
    """The median over passes of name's figure / base's figure within the pass."""
    ratios = [p[name] / p[base] for p in passes if p.get(name) and p.get(base)]
    return statistics.median(ratios) if ratios else None


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def paired_table(cell: dict, names: list[str], cost: CostModel, base: str, plain: str = GREEDY) -> list[str]:
    """One scenario's rows: the figures of every method, paired per pass. `cell` holds
    "passes" ([{method: [DecodeMetrics per prompt]}]), and per method the prompts decoded
    ("runs") and those whose output equals `plain`'s ("identical")."""
    passes = cell["passes"]
    totals = [{n: aggregate(ms) for n, ms in p.items()} for p in passes]  # per pass: all prompts summed
    rate = [{n: m.tokens_per_s for n, m in t.items()} for t in totals]
    mat = [{n: m.mean_accepted_tokens for n, m in t.items()} for t in totals]
    # Each method's oracle speed, beside plain decoding's measured speed of the same pass.
    oracle = [{**{n: oracle_tokens_per_s(m, cost, plain_step_s(t[plain])) for n, m in t.items()}, plain: r[plain]}
              for t, r in zip(totals, rate)]
    lines = ["| method | tok/s | x plain | x base | MAT | MAT x base | verified/call | oracle x plain | identical |",
             "|---" * 9 + "|"]
    for n in names:
        if not any(n in p for p in passes):
            continue
        every: DecodeMetrics = aggregate([m for p in passes for m in p[n]])  # every pass's prompts
        lines.append("| " + " | ".join([
            n, _fmt(statistics.median(r[n] for r in rate)), _fmt(median_ratio(rate, n, plain), ".3f", "x"),
            _fmt(median_ratio(rate, n, base), ".3f", "x"), _fmt(every.mean_accepted_tokens),
            _fmt(median_ratio(mat, n, base), ".3f", "x"),
            _fmt(every.verified_positions / every.target_calls if every.target_calls else None, ".1f"),
            _fmt(median_ratio(oracle, n, plain), ".3f", "x"),
            f"{cell['identical'][n]}/{cell['runs'][n]}"]) + " |")
    return lines
