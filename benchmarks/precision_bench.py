"""What decoding in bfloat16 costs against a store whose keys were made in float32.

    .venv/bin/python benchmarks/precision_bench.py --datastore runs/demo/datastore \
        --prompts-file runs/demo/eval_prompts.jsonl [--prompts 5 --max-new-tokens 48 --dtypes float32,bfloat16]

The same datastore serves DReSD (the paper's fixed settings: no draft budget, so drafting
does not adapt to what it sees) with the packaged model loaded in each dtype; greedy runs
through the same decoding loop in that dtype, interleaved per prompt. Reported per dtype:
mean accepted tokens per call (MAT, bonus included), whether DReSD's greedy output equals
that dtype's plain greedy output token for token (in bfloat16 a multi-position verification
forward need not give the bits of one-token steps), and how many prompts' greedy outputs
agree across the dtypes. The store's key dtype is taken from its manifest ("float32" for
stores that predate the record).
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
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from dresd.config import ModelConfig, SpeculativeConfig  # noqa: E402
from dresd.datastore.corpus import mtbench_first_turns  # noqa: E402
from dresd.datastore.store import Datastore  # noqa: E402
from dresd.decoding.engine import Engine  # noqa: E402
from dresd.evaluation.compare import markdown_table, run_methods, summarize  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402
from dresd.model.loading import load_model  # noqa: E402


def read_prompts(path: str | None, n: int) -> list[str]:
    """The first `n` prompts of a jsonl file ("prompt" field), or of MT-Bench's first turns."""
    if not path:
        return mtbench_first_turns()[:n]
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows][:n]


def partings(reference, prompt_ids: list[list[int]], greedy: list[list[int]], spec: list[list[int]]) -> list[str]:
    """Where each prompt's speculative output first differs from its plain greedy one, with
    the reference (float32) model's logit gap between the two tokens there, against its
    logit range: a small share is a near-tie that rounding can flip."""
    out = []
    for i, (ids, g, s) in enumerate(zip(prompt_ids, greedy, spec)):
        if g == s:
            continue
        at = next((k for k, (a, b) in enumerate(zip(g, s)) if a != b), min(len(g), len(s)))
        if at == min(len(g), len(s)):
            out.append(f"prompt {i}: one output stops early at token {at}")
            continue
        with torch.inference_mode():
            logits = reference.model(torch.tensor([ids + g[:at]], device=reference.device)).logits[0, -1].float()
        gap, span = abs(float(logits[g[at]] - logits[s[at]])), float(logits.max() - logits.min())
        out.append(f"prompt {i}: parts at token {at}; float32 logit gap {gap:.3f} of a range {span:.1f} "
                   f"({gap / span:.2%})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore", default="runs/demo/datastore")
    p.add_argument("--prompts-file", default=None, help="jsonl with a 'prompt' field (default: MT-Bench first turns)")
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="runs/bench/precision.md")
    args = p.parse_args(argv)

    prompts = read_prompts(args.prompts_file, args.prompts)
    specs = {"greedy": SpeculativeConfig(method="greedy"), "dresd": SpeculativeConfig(method="dresd", budget="off")}
    lines = ["# Decoding in another precision than the store's keys", ""]
    outputs: dict[str, list[list[int]]] = {}
    mats: dict[str, float] = {}
    reference = load_model(ModelConfig(dtype="float32", threads=args.threads))
    for dtype in args.dtypes.split(","):
        lm = reference if dtype == "float32" else load_model(ModelConfig(dtype=dtype, threads=args.threads))
        store = Datastore(args.datastore)
        engine = Engine(lm, store)
        runs = run_methods(engine, prompts, specs, args.max_new_tokens)
        rows = summarize(runs)
        outputs[dtype] = [g.token_ids for g in runs["greedy"].generations]
        mats[dtype] = next(r for r in rows if r["method"] == "dresd")["mean_accepted_tokens"]
        lines += [f"## model in {dtype}, keys made in {store.key_dtype}", "", markdown_table(rows), ""]
        lines += [f"- {x}" for x in partings(reference, [engine.prompt_ids(q) for q in prompts], outputs[dtype],
                                             [g.token_ids for g in runs["dresd"].generations])] + [""]
    lines += [f"{store.num_keys} keys ({args.datastore}); {len(prompts)} prompts x {args.max_new_tokens} new tokens; "
              "DReSD with no budget. Ran on a contended 2-core CPU: tokens/s are not comparable across runs.", ""]
    names = list(mats)
    for d in names[1:]:
        base = names[0]
        same = sum(a == b for a, b in zip(outputs[base], outputs[d]))
        lines.append(f"- DReSD MAT in {d} {mats[d]:.3f} vs {base} {mats[base]:.3f}: {mats[d] / mats[base] - 1:+.1%}; "
                     f"plain greedy outputs equal across the two dtypes on {same}/{len(prompts)} prompts")
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print(f"wrote {out} and {save_run('precision_bench', report, out.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
