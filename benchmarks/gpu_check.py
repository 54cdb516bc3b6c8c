"""GPU check: every method on CUDA with the real model, against a published datastore.

Runs plain greedy decoding and every named method (by default SuffixDecoding as published
and under the draft budget, budgeted prompt lookup, DReSD, the hybrid with SuffixDecoding
and the default, `auto`) on the same prompts in paired passes: within a pass each prompt
runs every method in an order that rotates by prompt and pass, every pass starts from new
engines (SuffixDecoding as published keeps served responses, and would otherwise draft a
prompt from its own earlier answer), and a ratio is the median over passes of that pass's
ratio (dresd.evaluation.compare.paired_table). Each set's table has the oracle bound beside
the measured speed, and the ratios issue 26 asks for: DReSD and the default against
SuffixDecoding. The verification cost curve the budget measured on this device heads the
report. Every method matching our greedy loop proves nothing if that loop itself decodes
wrongly (a transformers release that takes the KV cache under another keyword makes every
method decode the same wrong text), so our greedy output is also compared with HF
`generate()` greedy on the same model.

    python benchmarks/gpu_check.py --datastore runs/demo/datastore --prompts prompts.json --out gpu_check.md

`--prompts` is a JSON object {set name: [prompt, ...]}. The device is CUDA when present
(ModelConfig device "auto"); the same script runs on a CPU, slowly. Where SuffixDecoding
(arctic-inference) does not import, its methods are left out and the report says so; `auto`
then runs its fallback (the dense drafts with prompt lookup), as `dresd generate` would.
scripts/prepare_gpu_check.sh stages the model, wheels and SuffixDecoding's source for a
device machine, and builds SuffixDecoding there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dresd.config import ModelConfig  # noqa: E402
from dresd.datastore.store import Datastore  # noqa: E402
from dresd.decoding.engine import Engine  # noqa: E402
from dresd.evaluation.compare import GREEDY, median_ratio, paired_prompt, paired_table  # noqa: E402
from dresd.evaluation.hf_reference import hf_generate  # noqa: E402
from dresd.evaluation.methods import Method, chosen_methods  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402
from dresd.model.loading import load_model  # noqa: E402

METHODS = "suffix,suffix+budget,pld+budget,dresd,hybrid-sfx,auto"
BASE = "suffix+budget"  # what `dresd generate --method suffix` runs: SuffixDecoding under the draft budget
# The ratios issue 26's GPU goal reads: (method, against).
GOALS = (("dresd", "suffix+budget"), ("auto", "suffix+budget"), ("dresd", "suffix"), ("auto", "suffix"))


def suffix_decoding_found() -> str | None:
    """Where SuffixDecoding (arctic-inference) imports from, or None where it does not."""
    try:
        import arctic_inference.suffix_decoding as found
    except ImportError:
        return None
    return str(Path(found.__file__).parent)


def needs_suffix(m: Method) -> bool:
    return m.spec is not None and (m.spec.method == "suffix" or m.spec.hybrid_exact == "suffix")


def check_methods(names: str, suffix_ok: bool) -> tuple[list[Method], list[str]]:
    """The methods to run (greedy first) and what the report says of those left out."""
    chosen = chosen_methods(names)
    bad = [m.name for m in chosen if m.spec is None or m.store == "ood"]
    if bad:
        raise SystemExit(f"--methods: {', '.join(bad)}: the GPU check runs our loop on the one --datastore "
                         "(no HF references, no OOD store)")
    if suffix_ok:
        return chosen, []
    dropped = [m.name for m in chosen if needs_suffix(m)]
    notes = [f"SuffixDecoding (arctic-inference) does not import here: {', '.join(dropped)} left out, and auto "
             "runs its fallback (the dense drafts with prompt lookup)."] if dropped else []
    return [m for m in chosen if not needs_suffix(m)], notes


def run_set(lm, store: Datastore | None, cost, prompts: list[str], chosen: list[Method], passes: int,
            max_new_tokens: int, label: str) -> dict:
    """Paired passes over one prompt set: {"passes", "identical", "runs", "outputs"}."""
    names = [m.name for m in chosen]
    cell = {"passes": [], "identical": dict.fromkeys(names, 0), "runs": dict.fromkeys(names, 0), "outputs": {}}
    for k in range(passes):
        engines = {None: Engine(lm, cost=cost), "id": Engine(lm, store, cost=cost)}
        for m in chosen:  # untimed: drafters built, suffix trees warmed, CUDA kernels loaded
            engines[m.store].generate(prompts[0], m.spec, 4)
        cell["passes"].append({n: [] for n in names})
        for i, prompt in enumerate(tqdm(prompts, unit="prompt", desc=f"{label} pass {k + 1}/{passes}")):
            gens = paired_prompt(cell, chosen, k * len(prompts) + i,
                                 lambda m: engines[m.store].generate(prompt, m.spec, max_new_tokens))
            if k == 0:
                cell["outputs"][i] = gens[GREEDY].token_ids
    return cell


def goal_lines(cell: dict) -> list[str]:
    from dresd.decoding.metrics import aggregate

    rate = [{n: aggregate(ms).tokens_per_s for n, ms in p.items()} for p in cell["passes"]]
    out = []
    for name, base in GOALS:
        ratio = median_ratio(rate, name, base)
        if ratio is not None:
            out.append(f"- {name} at {ratio:.3f}x {base}'s tokens/s (median of {len(rate)} paired passes)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF folder or .gguf (default: the packaged model)")
    p.add_argument("--dtype", default="auto", help="ModelConfig.dtype (auto: bfloat16 on a CUDA device that has it)")
    p.add_argument("--datastore", required=True)
    p.add_argument("--prompts", required=True, help="JSON {set name: [prompts]}")
    p.add_argument("--methods", default=METHODS, help=f"comma list of benchmark method names (default {METHODS})")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default="gpu_check.md", help="the report, rewritten after every set")
    args = p.parse_args(argv)
    sets = json.loads(Path(args.prompts).read_text())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    found = suffix_decoding_found()
    chosen, notes = check_methods(args.methods, found is not None)
    notes += [f"SuffixDecoding from {found}."] if found else []
    start = time.time()
    lm = load_model(ModelConfig(path=args.model, dtype=args.dtype))
    store = Datastore(args.datastore)
    cost = Engine(lm, store).cost_model()
    device = torch.cuda.get_device_name(0) if lm.device.type == "cuda" else str(lm.device)
    curve = ", ".join(f"k={k}: {s / cost.seconds[0]:.2f}x" for k, s in zip(cost.positions, cost.seconds))
    keys = store.manifest["counts"]["keys"]
    base = BASE if BASE in [m.name for m in chosen] else GREEDY
    lines = [f"# GPU check: {device}, torch {torch.__version__}, {lm.model.dtype}, datastore of {keys} keys, greedy, "
             f"{args.max_new_tokens} new tokens, {args.passes} paired passes (load {time.time() - start:.0f} s)", "",
             f"Verification cost (one-token step {cost.seconds[0] * 1e3:.2f} ms): {curve}", "", *notes]
    print("\n".join(lines), flush=True)
    for name, prompts in sets.items():
        first = len(lines)
        cell = run_set(lm, store, cost, prompts, chosen, args.passes, args.max_new_tokens, name)
        engine = Engine(lm)
        hf = [hf_generate(lm.model, engine.prompt_ids(q), args.max_new_tokens, lm.eos_token_id) for q in prompts]
        agree = sum(h.token_ids == cell["outputs"][i] for i, h in enumerate(hf))
        lines += [f"## {name} ({len(prompts)} prompts; 'x base' against {base})", "",
                  *paired_table(cell, [m.name for m in chosen], cost, base), "", *goal_lines(cell), "",
                  f"Our greedy loop's output equals HF generate() greedy's on {agree}/{len(prompts)} prompts.", ""]
        Path(args.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines[first:]), flush=True)
    print(f"wrote {save_run('gpu_check', chr(10).join(lines), Path(args.out).parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
