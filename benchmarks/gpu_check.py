"""GPU check: the decoding loop on CUDA with the real model, against a published datastore.

Runs greedy, prompt lookup, DReSD (budgeted, as published, and with the paper's settings)
and the hybrid on the same prompts, interleaved, and writes the usual comparison table per
prompt set plus the verification cost curve the budget measured on this device. Every
method matching our greedy loop proves nothing if that loop itself decodes wrongly (a
transformers release that takes the KV cache under another keyword makes every method
decode the same wrong text), so our greedy output is also compared with HF `generate()`
greedy on the same model.

    python benchmarks/gpu_check.py --datastore runs/demo/datastore --prompts prompts.json --out gpu_check.md

`--prompts` is a JSON object {set name: [prompt, ...]}. The device is CUDA when present
(ModelConfig device "auto"); the same script runs on a CPU, slowly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dresd.config import ModelConfig, SpeculativeConfig  # noqa: E402
from dresd.decoding.engine import Engine  # noqa: E402
from dresd.evaluation.compare import markdown_table, run_methods, summarize  # noqa: E402
from dresd.evaluation.hf_reference import hf_generate  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402

S = SpeculativeConfig
METHODS = {
    "greedy": S(method="greedy"),
    "pld": S(method="pld", budget="off"),
    "pld+budget": S(method="pld"),
    "dresd": S(method="dresd"),
    "dresd-nobudget": S(method="dresd", budget="off"),
    "dresd-ref": S(method="dresd", budget="off", context_keys=False),
    "hybrid": S(method="hybrid"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF folder or .gguf (default: the packaged model)")
    p.add_argument("--datastore", required=True)
    p.add_argument("--prompts", required=True, help="JSON {set name: [prompts]}")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", default="gpu_check.md")
    args = p.parse_args()
    start = time.time()
    engine = Engine.open(ModelConfig(path=args.model), args.datastore)
    device = torch.cuda.get_device_name(0) if engine.lm.device.type == "cuda" else str(engine.lm.device)
    cost = engine.cost_model()
    curve = ", ".join(f"k={k}: {s / cost.seconds[0]:.2f}x" for k, s in zip(cost.positions, cost.seconds))
    keys = engine.datastore.manifest["counts"]["keys"]
    lines = [f"# GPU check: {device}, torch {torch.__version__}, fp32, datastore of {keys} keys, greedy, "
             f"{args.max_new_tokens} new tokens (load {time.time() - start:.0f} s)", "",
             f"Verification cost (one-token step {cost.seconds[0] * 1e3:.2f} ms): {curve}", ""]
    for name, prompts in json.loads(Path(args.prompts).read_text()).items():
        runs = run_methods(engine, prompts, METHODS, args.max_new_tokens)
        hf = [hf_generate(engine.lm.model, engine.prompt_ids(p), args.max_new_tokens, engine.lm.eos_token_id)
              for p in prompts]
        agree = sum(h.token_ids == g.token_ids for h, g in zip(hf, runs["greedy"].generations))
        lines += [f"## {name} ({len(prompts)} prompts)", "", markdown_table(summarize(runs)), "",
                  f"Our greedy loop's output equals HF generate() greedy's on {agree}/{len(prompts)} prompts.", ""]
        print("\n".join(lines[-3:]), flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {save_run('gpu_check', chr(10).join(lines), Path(args.out).parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
