"""HF `generate()` as a user runs it: plain transformers in a fresh process, the model folder,
`generate()` with its defaults (the folder's generation_config; only max_new_tokens given).

Imports nothing from dresd and sets no environment variable or thread count, so the timing is
what a user of transformers sees. Used by benchmarks/hf_reference_bench.py (one fresh process
per pass) as the external reference; runnable on its own:

    .venv/bin/python benchmarks/hf_plain_generate.py MODEL_DIR prompts.txt --max-new-tokens 64

Prints one JSON line per prompt (new tokens, seconds of the generate() call, prefill
included, token ids) and a last summary line.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("prompts", help="a text file, one prompt a line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args(argv)
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    load_s = time.perf_counter() - start
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    prompts = [line for line in open(args.prompts).read().splitlines() if line.strip()]
    total_tokens, total_s = 0, 0.0
    for i, prompt in enumerate(prompts):
        inputs = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens)
        wall = time.perf_counter() - t0
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        cut = next((j + 1 for j, t in enumerate(new) if t in eos), len(new))
        new = new[:cut]
        total_tokens += len(new)
        total_s += wall
        print(json.dumps({"prompt": i, "new_tokens": len(new), "wall_s": wall, "token_ids": new}), flush=True)
    print(json.dumps({"summary": True, "tokens": total_tokens, "wall_s": total_s, "load_s": load_s,
                      "tokens_per_s": total_tokens / total_s if total_s else 0.0, "dtype": str(model.dtype),
                      "threads": torch.get_num_threads(), "attn": model.config._attn_implementation,
                      "generation_config": model.generation_config.to_diff_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
