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
Configurations run in turn within each pass, so load on the machine hits them alike; the
table reports the median tokens/s over the passes, and every output is checked against
one-at-a-time greedy decoding.
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

    configs = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        configs.append((bs, "plain batched", plain(bs)))
        configs.append((bs, f"{method} batched", batched(SpeculativeConfig(method=method), unaware, bs)))
        configs.append((bs, "auto", batched(SpeculativeConfig(method="auto"), batch_cost, bs)))
        if bs == 1:
            configs.append((bs, f"{method} one-sequence loop", single_loop))
    results: dict[tuple[int, str], list[dict]] = {(bs, name): [] for bs, name, _ in configs}
    for p in range(args.passes):
        for bs, name, run in configs:
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
             f"tokens, greedy, datastore {args.datastore}; {args.passes} interleaved passes, median tok/s. "
             f"auto drafts with {auto_method} under the batch-aware budget.", "",
             "| batch | run | tok/s (median) | x plain batched | tokens per call | positions per call | same as greedy |",
             "|---|---|---|---|---|---|---|"]
    for (bs, name), runs in results.items():
        rate = statistics.median(r["tokens"] / r["wall"] for r in runs)
        base = statistics.median(r["tokens"] / r["wall"] for r in results[(bs, "plain batched")])
        r0 = runs[0]
        lines.append(f"| {bs} | {name} | {rate:.1f} | {rate / base:.2f} | {r0['tokens'] / r0['calls']:.2f} | "
                     f"{r0['verified'] / r0['calls']:.2f} | {min(r['same'] for r in runs)}/{n} |")
    lines += ["", "Which wins, and why (the measured forward cost T(b, k) of b rows of k positions):", ""]
    for bs in sorted({b for b, _ in results}):
        rates = {name: statistics.median(r["tokens"] / r["wall"] for r in runs)
                 for (b, name), runs in results.items() if b == bs}
        best = max(rates, key=rates.get)
        plain, spec = rates["plain batched"], rates[f"{method} batched"]
        lines.append(f"- batch {bs}: {best} is fastest; auto at {rates['auto'] / max(plain, spec):.2f}x the better of "
                     f"plain and {method} batched. A second position per row costs T({bs}, 2) / T({bs}, 1) = "
                     f"{cost.cost(bs, 2) / cost.cost(bs, 1):.2f}x a step, so a draft pays only when it is accepted "
                     f"more often than that excess.")
    return lines + [""]
