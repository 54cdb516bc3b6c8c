"""`batch_decode_bench.py --study spec`: at each batch size, plain batched decoding against
speculative batched decoding and `auto`, interleaved, on the same prompts.

    .venv/bin/python benchmarks/batch_decode_bench.py --study spec --batch-sizes 1,4,16 \\
        --prompt-set sharegpt --datastore runs/bench/batch_id/store --method dresd --passes 3

Rows at each batch size b (every one decodes all prompts, b sequences at a time, a waiting
prompt joining the slot of one that finishes):
- plain batched: dresd.decoding.batch.generate_batch, the job's plain path (static groups);
- <method> batched: BatchedSpeculativeDecoder drafting with --method, each row's drafts
  planned as if it were decoding alone (a cost model flat in the batch size): speculative
  batching without a batch-aware budget;
- auto: the job's default: method "auto" with the batch-aware budget (dresd.decoding.
  batch_plan), which verifies drafts only where they pay at this batch size;
- at batch 1, also the one-sequence loop (dresd.decoding.loop) with --method and its budget.
Configurations run in turn within each pass, each pass starting the turn of a batch size at
the next configuration, so load on the machine hits them alike. This machine's speed drifts
by 20% or more between passes a few minutes apart, so comparisons are paired: "x plain" and
"auto / better" are medians over passes of the ratio within each pass, not ratios of medians.
Every output is checked against one-at-a-time greedy decoding.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from dresd.config import SpeculativeConfig
from dresd.datastore.corpus import mtbench_first_turns, sharegpt_first_turns
from dresd.decoding.batch import generate_batch
from dresd.decoding.batch_plan import BatchCostModel
from dresd.decoding.batch_spec import BatchedSpeculativeDecoder, BatchRequest
from dresd.drafters.registry import drafter_factory, resolve_method
from dresd.evaluation.results import save_run


def _prompts(args) -> list[str]:
    if args.prompt_set == "sharegpt":  # held out of the ID corpus, which starts at turn 40
        return [p for _, p, _ in sharegpt_first_turns()[:40]][: args.prompts]
    return mtbench_first_turns()[: args.prompts]


def spec_study(args) -> None:
    from dresd.datastore.store import Datastore
    from dresd.decoding.engine import Engine
    from dresd.model.loading import load_model
    from dresd.config import ModelConfig

    lm = load_model(ModelConfig(path=args.model, device="cpu"))
    engine = Engine(lm, Datastore(args.datastore) if args.datastore else None)
    prompts = _prompts(args)
    ids = [engine.prompt_ids(q) for q in prompts]
    n_new, method = args.max_new_tokens, args.method or resolve_method("auto", engine.datastore is not None)
    batch_cost = engine.batch_cost_model()
    single = batch_cost.single()
    # What a row's planner assumes when it plans alone: the one-sequence curve at any batch size.
    unaware = BatchCostModel([1, 2], list(single.positions), [list(single.seconds)] * 2, single.context, "unaware")
    auto_method = resolve_method("auto", engine.datastore is not None)
    print(f"model {lm.identity['name']}, cores {os.cpu_count()}, torch threads {torch.get_num_threads()}; "
          f"{len(ids)} {args.prompt_set} prompts, {n_new} new tokens, greedy; method {method}, auto = {auto_method}; "
          f"datastore {args.datastore}", flush=True)
    print("batch cost model (ms):", {b: [round(1e3 * t, 1) for t in row]
                                     for b, row in zip(batch_cost.batches, batch_cost.seconds)}, flush=True)

    greedy = SpeculativeConfig(method="greedy")
    reference = [engine.decoder(greedy).generate_ids(i, n_new).token_ids for i in ids]

    def batched(spec: SpeculativeConfig, cost, bs: int):
        dec = BatchedSpeculativeDecoder(lm.model, lm.eos_token_id, lm.max_context, spec,
                                        drafter_factory(spec, engine.datastore, lm.tokenizer, lm.eos_token_id),
                                        cost, max_batch=bs)
        return lambda: dec.generate([BatchRequest(i, n_new) for i in ids])

    def plain(bs: int):
        def run():
            out = []
            for b in range(0, len(ids), bs):
                out += generate_batch(lm, ids[b:b + bs], n_new)
            return out
        return run

    def single_loop():
        dec = engine.decoder(SpeculativeConfig(method=method))
        return [dec.generate_ids(i, n_new) for i in ids]

    groups = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        group = [(bs, "plain batched", plain(bs)),
                 (bs, f"{method} batched", batched(SpeculativeConfig(method=method), unaware, bs)),
                 (bs, "auto", batched(SpeculativeConfig(method="auto"), batch_cost, bs))]
        if bs == 1:
            group.append((bs, f"{method} one-sequence loop", single_loop))
        groups.append(group)
    results: dict[tuple[int, str], list[dict]] = {(bs, name): [] for g in groups for bs, name, _ in g}
    for p in range(args.passes):
        for bs, name, run in [c for g in groups for c in g[p % len(g):] + g[: p % len(g)]]:
            t0 = time.perf_counter()
            gens = run()
            wall = time.perf_counter() - t0
            toks = [g if isinstance(g, list) else g.token_ids for g in gens]
            calls = sum(g.metrics.target_calls for g in gens if not isinstance(g, list)) or sum(map(len, toks))
            verified = sum(g.metrics.verified_positions for g in gens if not isinstance(g, list)) or sum(map(len, toks))
            results[(bs, name)].append({"tokens": sum(map(len, toks)), "wall": wall, "calls": calls,
                                        "verified": verified, "same": sum(t == r for t, r in zip(toks, reference))})
            print(f"pass {p + 1} batch {bs} {name}: {sum(map(len, toks)) / wall:.1f} tok/s "
                  f"(load avg {os.getloadavg()[0]:.1f})", flush=True)
    report = _report(args, lm, method, auto_method, results, len(ids), batch_cost)
    print("\n".join(report), flush=True)
    print(f"wrote {save_run('batch_decode_spec', chr(10).join(report), args.out)}")


def _report(args, lm, method: str, auto_method: str, results: dict, n: int, cost: BatchCostModel) -> list[str]:
    lines = ["# Speculative batched decoding at each batch size", "",
             f"{lm.identity['name']}, {os.cpu_count()} cores, {n} {args.prompt_set} prompts, {args.max_new_tokens} new "
             f"tokens, greedy, datastore {args.datastore}; {args.passes} interleaved passes, median tok/s; "
             f"ratios are medians of each pass's ratio. auto drafts with {auto_method} under the batch-aware budget.", "",
             "| batch | run | tok/s (median) | x plain batched | tokens per call | positions per call | same as greedy |",
             "|---|---|---|---|---|---|---|"]

    def rates(bs: int, name: str) -> list[float]:
        return [r["tokens"] / r["wall"] for r in results[(bs, name)]]

    def paired(bs: int, name: str, base: str) -> float:
        """The median over passes of name's rate over base's in the same pass."""
        return statistics.median(a / b for a, b in zip(rates(bs, name), rates(bs, base)))

    for (bs, name), runs in results.items():
        r0 = runs[0]
        lines.append(f"| {bs} | {name} | {statistics.median(rates(bs, name)):.1f} | "
                     f"{paired(bs, name, 'plain batched'):.2f} | {r0['tokens'] / r0['calls']:.2f} | "
                     f"{r0['verified'] / r0['calls']:.2f} | {min(r['same'] for r in runs)}/{n} |")
    lines += ["", "Which wins, and why (the measured forward cost T(b, k) of b rows of k positions):", ""]
    for bs in sorted({b for b, _ in results}):
        medians = {name: statistics.median(rates(b, name)) for b, name in results if b == bs}
        best = max(medians, key=medians.get)
        better = max(["plain batched", f"{method} batched"], key=medians.get)
        lines.append(f"- batch {bs}: {best} is fastest; auto at {paired(bs, 'auto', better):.2f}x the better of "
                     f"plain and {method} batched ({better}; per pass: "
                     f"{', '.join(f'{a / b:.2f}' for a, b in zip(rates(bs, 'auto'), rates(bs, better)))})"
                     + (f", {paired(bs, 'auto', f'{method} one-sequence loop'):.2f}x the one-sequence loop"
                        if (bs, f"{method} one-sequence loop") in results else "")
                     + f". A second position per row costs T({bs}, 2) / T({bs}, 1) = "
                     f"{cost.cost(bs, 2) / cost.cost(bs, 1):.2f}x a step, so a draft pays only when it is accepted "
                     f"more often than that excess.")
    return lines + [""]
