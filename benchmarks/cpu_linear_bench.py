"""What the packed weight copies (dresd.model.fastpath.cpu_linear) buy on this machine, in one run.

    .venv/bin/python benchmarks/cpu_linear_bench.py [--prompts 4] [--max-new-tokens 64]

Prints (and writes to --out) two tables comparing the stock HF model with the same weights
converted by `use_dual_layout`, packed as float32 and as exact integer codes (the default
for GGUF-derived weights, dresd.model.fastpath.weight_codes), measurements interleaved so machine noise
hits all:
1. one verification step over k new positions after a 256-token cache: stock (LM head
   over every position) and both packed layouts (lazy greedy head, in-place KV cache);
2. plain greedy decoding on MT-Bench first turns: our loop on each layout and HF
   `generate()` on the stock model, as ms per new token, with the check that all produce
   the same tokens.
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
from dresd.datastore.corpus import mtbench_first_turns  # noqa: E402
from dresd.model.fastpath.cpu_linear import packed_bytes, packed_formats  # noqa: E402
from dresd.decoding.engine import Engine  # noqa: E402
from dresd.evaluation.hf_reference import hf_generate  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402
from dresd.decoding.kv_cache import GrowingCache  # noqa: E402
from dresd.model.loading import load_model  # noqa: E402
from dresd.decoding.tree import build_tree  # noqa: E402
from dresd.decoding.verify import forward, verify_token_tree  # noqa: E402

POSITIONS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


def verify_ms(models: dict, context: int = 256, reps: int = 9) -> dict[str, dict[int, float]]:
    """Median ms of one greedy verification step over k positions, interleaved.

    The model named "stock" runs the LM head over every position (how verification ran
    before the packed copies); the others run verify_token_tree (lazy head), as decoding does.
    """
    vocab = next(iter(models.values())).config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, context), generator=gen)
    caches = {name: DynamicCache() if name == "stock" else GrowingCache() for name in models}
    for name, model in models.items():
        forward(model, prefix, caches[name], logits=False)
    times = {name: {k: [] for k in POSITIONS} for name in models}
    for _ in range(reps + 1):
        for k in POSITIONS:
            tree = build_tree(1, [torch.randint(0, vocab, (k - 1,), generator=gen).tolist()] if k > 1 else [])
            ids = torch.tensor([tree.tokens])
            for name, model in models.items():
                t0 = time.perf_counter()
                if name == "stock":
                    forward(model, ids, caches[name])
                else:
                    verify_token_tree(model, caches[name], tree)
                times[name][k].append(time.perf_counter() - t0)
            for cache in caches.values():
                cache.crop(context - cache.get_seq_length())
    return {n: {k: 1e3 * statistics.median(v[1:]) for k, v in per.items()} for n, per in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default="runs/bench/cpu_linear.md")
    args = p.parse_args()
    # dual_layout=True: the packed layouts whatever the layout check says of this CPU (the bench compares them).
    loaded = {"codes": load_model(ModelConfig(dual_layout=True)),
              "float32": load_model(ModelConfig(weight_codes=False, dual_layout=True)),
              "stock": load_model(ModelConfig(dual_layout=False))}
    lm = loaded["codes"]
    lines = [f"# Packed weight copies (dual layout): {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), {lm.identity['name']} fp32, OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}", "",
             "Extra memory of the packed copies: " + ", ".join(
                 f"{n} {packed_bytes(m.model) / 2**20:.0f} MiB (bits {packed_formats(m.model)})"
                 for n, m in loaded.items() if n != "stock"), "",
             "## One greedy verification step over k new positions (256 cached), median ms", "",
             "| k | stock, full head | packed float32, lazy head | packed codes, lazy head | codes / float32 |",
             "|---|---|---|---|---|"]
    ms = verify_ms({n: m.model for n, m in loaded.items()})
    for k in POSITIONS:
        a, b, c = ms["stock"][k], ms["float32"][k], ms["codes"][k]
        lines.append(f"| {k} | {a:.1f} | {b:.1f} | {c:.1f} | {c / b:.2f} |")
    for name in ms:
        lines += ["", f"Cost of k positions relative to one, {name}: "
                  + ", ".join(f"k={k} {ms[name][k] / ms[name][1]:.2f}x" for k in POSITIONS)]

    spec = SpeculativeConfig(method="greedy")
    engines = {f"ours ({n})": Engine(m) for n, m in loaded.items()}
    runs = {name: [] for name in [*engines, "HF generate (stock)"]}
    same = 0
    prompts = mtbench_first_turns()[: args.prompts]
    for engine in engines.values():
        engine.generate("Hello!", spec, 4)  # warm-up
    for prompt in prompts:
        outs = {}
        for name in runs:
            if name.startswith("HF"):
                ids = engines["ours (stock)"].prompt_ids(prompt)
                g = hf_generate(loaded["stock"].model, ids, args.max_new_tokens, loaded["stock"].eos_token_id)
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
    lines += ["", f"Identical tokens from all {len(runs)}: {same}/{len(prompts)} prompts"]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(f"wrote {save_run('cpu_linear_bench', text, Path(args.out).parent)}")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
