"""What the packed weight copies (dresd.cpu_linear) buy on this machine, in one run.

    .venv/bin/python benchmarks/cpu_linear_bench.py [--prompts 4] [--max-new-tokens 64]

Prints (and writes to --out) two tables, the stock HF model against the same weights
converted by `use_dual_layout`, measurements interleaved so machine noise hits both:
1. one verification step over k new positions after a 256-token cache: before (stock
   model, LM head over every position) and after (dual layout, lazy greedy head);
2. plain greedy decoding on MT-Bench first turns: our loop on the dual layout, our loop on
   the stock model and HF `generate()` on the stock model, as ms per new token, with the
   check that all three produce the same tokens.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from dresd.config import ModelConfig, SpeculativeConfig  # noqa: E402
from dresd.corpus import mtbench_first_turns  # noqa: E402
from dresd.cpu_linear import packed_bytes  # noqa: E402
from dresd.engine import Engine  # noqa: E402
from dresd.hf_reference import hf_generate  # noqa: E402
from dresd.kv_cache import GrowingCache  # noqa: E402
from dresd.models import load_model  # noqa: E402
from dresd.tree import build_tree  # noqa: E402
from dresd.verify import forward, verify_token_tree  # noqa: E402

POSITIONS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


def verify_ms(stock, dual, context: int = 256, reps: int = 9) -> dict[str, dict[int, float]]:
    """Median ms of one greedy verification step over k positions, interleaved.

    "before": the stock model, LM head over every position (how verification ran before);
    "after": the packed copies with verify_token_tree's lazy head and the in-place KV cache
    (what decoding runs now).
    """
    vocab = stock.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, context), generator=gen)
    caches = {}
    for name, model, cache in (("before", stock, DynamicCache()), ("after", dual, GrowingCache())):
        caches[name] = cache
        forward(model, prefix, caches[name], logits=False)
    times = {name: {k: [] for k in POSITIONS} for name in caches}
    for _ in range(reps + 1):
        for k in POSITIONS:
            tree = build_tree(1, [torch.randint(0, vocab, (k - 1,), generator=gen).tolist()] if k > 1 else [])
            ids = torch.tensor([tree.tokens])
            t0 = time.perf_counter()
            forward(stock, ids, caches["before"])
            times["before"][k].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            verify_token_tree(dual, caches["after"], tree)
            times["after"][k].append(time.perf_counter() - t0)
            for cache in caches.values():
                cache.crop(context - cache.get_seq_length())
    return {n: {k: 1e3 * statistics.median(v[1:]) for k, v in per.items()} for n, per in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default="runs/bench/cpu_linear.md")
    args = p.parse_args()
    dual = load_model(ModelConfig())
    stock = load_model(ModelConfig(dual_layout=False))
    extra = packed_bytes(dual.model)
    lines = [f"# Packed weight copies (dual layout): {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), {dual.identity['name']} fp32; extra memory of the packed "
             f"weight copies: {extra / 2**20:.0f} MiB", "",
             "## One greedy verification step over k new positions (256 cached), median ms", "",
             "| k | before: stock, full head | after: packed copies, lazy head | after / before |",
             "|---|---|---|---|"]
    ms = verify_ms(stock.model, dual.model)
    for k in POSITIONS:
        a, b = ms["before"][k], ms["after"][k]
        lines.append(f"| {k} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    for name in ms:
        lines += ["", f"Cost of k positions relative to one, {name}: "
                  + ", ".join(f"k={k} {ms[name][k] / ms[name][1]:.2f}x" for k in POSITIONS)]

    spec = SpeculativeConfig(method="greedy")
    engines = {"ours (dual)": Engine(dual), "ours (stock)": Engine(stock)}
    runs = {"ours (dual)": [], "ours (stock)": [], "HF generate (stock)": []}
    same = 0
    prompts = mtbench_first_turns()[: args.prompts]
    engines["ours (dual)"].generate("Hello!", spec, 4)  # warm-up
    for prompt in prompts:
        outs = {}
        for name in runs:
            if name.startswith("HF"):
                ids = engines["ours (stock)"].prompt_ids(prompt)
                g = hf_generate(stock.model, ids, args.max_new_tokens, stock.eos_token_id)
            else:
                g = engines[name].generate(prompt, spec, args.max_new_tokens)
            outs[name] = g.token_ids
            runs[name].append((g.metrics.wall_s, len(g.token_ids)))
        same += len({tuple(t) for t in outs.values()}) == 1
    ms_tok = {n: 1e3 * sum(w for w, _ in r) / sum(t for _, t in r) for n, r in runs.items()}
    hf = ms_tok["HF generate (stock)"]
    lines += ["", f"## Plain greedy, {len(prompts)} MT-Bench prompts x {args.max_new_tokens} new tokens "
              "(prefill included)", "", "| loop | ms/token | / HF generate() |", "|---|---|---|"]
    lines += [f"| {n} | {v:.1f} | {v / hf:.2f}x |" for n, v in ms_tok.items()]
    lines += ["", f"Identical tokens from all three: {same}/{len(prompts)} prompts"]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
