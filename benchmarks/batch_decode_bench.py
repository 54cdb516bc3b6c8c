"""Batched greedy decoding (dresd.decoding.batch.generate_batch) vs one-at-a-time greedy, and
with --method, the same method one at a time and batched (dresd.decoding.batch_spec).

    .venv/bin/python benchmarks/batch_decode_bench.py [--prompts 16] [--max-new-tokens 64] \
        [--batch-sizes 4,8,16] [--threads 1,2] [--model PATH] [--method pld [--datastore ROOT]]

Same MT-Bench first-turn prompts (chat template), same model, same process. One-at-a-time
is `Engine.generate` with method "greedy" (SpeculativeDecoder, one token per forward).
Batched rows are length-sorted before grouping (as jobs/decode.py does) unless --no-sort.
tokens/s counts new tokens over the whole wall time, prefill included. CPU-s counts this
process's CPU time: on a shared machine it moves less than wall time with other jobs' load.

OMP_WAIT_POLICY defaults to PASSIVE here (set before torch loads OpenMP): with the default
spin-waiting, torch threads on a machine that other processes also use spin at barriers
while their partner is descheduled, and decode steps, batched ones most, run many times
slower (docs/speed-study.md#openmp-and-openblas-threads). Pass --omp-wait-policy "" to keep it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":
    _policy = sys.argv[sys.argv.index("--omp-wait-policy") + 1] if "--omp-wait-policy" in sys.argv else "PASSIVE"
    if _policy:
        os.environ["OMP_WAIT_POLICY"] = _policy

import torch  # noqa: E402

from dresd.decoding.batch import BatchStats, generate_batch  # noqa: E402
from dresd.config import ModelConfig, SpeculativeConfig  # noqa: E402
from dresd.datastore.corpus import mtbench_first_turns  # noqa: E402
from dresd.decoding.engine import Engine  # noqa: E402
from dresd.datastore.store import Datastore  # noqa: E402
from dresd.decoding.batch_spec import BatchedSpeculativeDecoder, BatchRequest  # noqa: E402
from dresd.drafters.registry import drafter_factory  # noqa: E402
from dresd.evaluation.results import save_run  # noqa: E402
from dresd.model.loading import load_model  # noqa: E402


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="4,8,16")
    p.add_argument("--threads", default="0", help="torch thread counts to run, e.g. 1,2 (0 = torch's default)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY ('' = leave it)")
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: packaged SmolLM2-135M)")
    p.add_argument("--no-sort", action="store_true", help="group prompts in file order")
    p.add_argument("--method", default=None, help="also run this drafting method one at a time and batched "
                                                  "(dresd.decoding.batch_spec), e.g. pld, suffix, dresd")
    p.add_argument("--datastore", default=None, help="datastore for --method dresd / hybrid / rest / suffix")
    p.add_argument("--out", default="runs/bench", help="folder for batch_decode_bench.json")
    p.add_argument("--study", choices=["greedy", "spec"], default="greedy",
                   help="spec: plain batched vs speculative batched vs auto at each batch size, interleaved "
                        "(batch_spec_study.py; in-distribution with --datastore and --prompt-set sharegpt)")
    p.add_argument("--passes", type=int, default=3, help="--study spec: interleaved passes (median reported)")
    p.add_argument("--prompt-set", choices=["mtbench", "sharegpt"], default="mtbench",
                   help="mtbench first turns, or the held-out ShareGPT first turns (the first 40)")
    args = p.parse_args()
    if args.study == "spec":
        from batch_spec_study import spec_study  # noqa: E402 - a sibling script

        return spec_study(args)

    lm = load_model(ModelConfig(path=args.model, device="cpu"))
    engine = Engine(lm, Datastore(args.datastore) if args.datastore else None)
    prompts = mtbench_first_turns()[: args.prompts]
    ids = [engine.prompt_ids(q) for q in prompts]
    print(f"model {lm.identity['name']}, cores {os.cpu_count()}, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', '(default)')}; {len(ids)} MT-Bench prompts, "
          f"{sum(map(len, ids))} prompt tokens (min {min(map(len, ids))}, max {max(map(len, ids))}), "
          f"{args.max_new_tokens} new tokens, greedy", flush=True)
    default_threads = torch.get_num_threads()
    report = ["# Batched greedy decoding against one at a time", "",
              f"{lm.identity['name']}, {os.cpu_count()} cores, {len(ids)} MT-Bench prompts, "
              f"{args.max_new_tokens} new tokens, greedy.", ""]
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads or default_threads)
        report += run(lm, engine, prompts, ids, args)
    print(f"wrote {save_run('batch_decode_bench', chr(10).join(report), args.out)}")


def run(lm, engine, prompts, ids, args) -> list[str]:
    n_new = args.max_new_tokens
    print(f"\ntorch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}", flush=True)

    # Warm-up (first forwards allocate and pick kernels).
    generate_batch(lm, ids[:2], 2)
    spec = SpeculativeConfig(method="greedy")
    t0, c0 = _clock()
    seq_out, seq_prefill = [], 0.0
    for q in prompts:
        gen = engine.generate(q, spec, n_new)
        seq_out.append(gen.token_ids)
        seq_prefill += gen.metrics.prefill_s
    t1, c1 = _clock()
    seq_tokens = sum(map(len, seq_out))
    rows = [("one-at-a-time", 1, seq_tokens, t1 - t0, c1 - c0, seq_prefill, len(ids), "-", "-")]
    print(f"one-at-a-time: {seq_tokens} tokens in {t1 - t0:.1f} s (load avg {os.getloadavg()[0]:.1f})", flush=True)

    order = list(range(len(ids))) if args.no_sort else sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        out: dict[int, list[int]] = {}
        prefill = pad_slots = all_slots = dead = slot_steps = 0.0
        t0, c0 = _clock()
        for b in range(0, len(order), bs):
            group = order[b : b + bs]
            st = BatchStats()
            for i, toks in zip(group, generate_batch(lm, [ids[i] for i in group], n_new, stats=st)):
                out[i] = toks
            prefill += st.prefill_s
            pad_slots += st.rows * st.width - st.prompt_tokens
            all_slots += st.rows * st.width
            dead += st.rows * (st.steps + 1) - st.new_tokens
            slot_steps += st.rows * (st.steps + 1)
        t1, c1 = _clock()
        tokens = sum(map(len, out.values()))
        same = sum(out[i] == seq_out[i] for i in range(len(ids)))
        rows.append((f"batch {bs}", bs, tokens, t1 - t0, c1 - c0, prefill, same,
                     f"{pad_slots / all_slots:.0%}", f"{dead / slot_steps:.0%}"))
        print(f"batch {bs}: {tokens} tokens in {t1 - t0:.1f} s (load avg {os.getloadavg()[0]:.1f})", flush=True)

    if args.method:
        rows += _speculative_rows(lm, engine, prompts, ids, seq_out, args)

    base_wall = rows[0][2] / rows[0][3]
    base_cpu = rows[0][2] / rows[0][4]
    table = [f"## torch threads {torch.get_num_threads()}", "",
             "| run | tokens | wall s | prefill s | tok/s | x | tok/CPU-s | x | same as 1-by-1 | prefill pad | dead slots |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, _, tokens, wall, cpu, pre, same, pad, dead in rows:
        table.append(f"| {name} | {tokens} | {wall:.1f} | {pre:.1f} | {tokens / wall:.2f} | {tokens / wall / base_wall:.2f} "
                     f"| {tokens / cpu:.2f} | {tokens / cpu / base_cpu:.2f} | {same}/{len(ids)} | {pad} | {dead} |")
    print("\n" + "\n".join(table), flush=True)
    return table + [""]


def _speculative_rows(lm, engine, prompts, ids, seq_out, args) -> list[tuple]:
    """--method one at a time (the decoding loop) and batched (every row's tree in one forward)."""
    n_new, spec = args.max_new_tokens, SpeculativeConfig(method=args.method)
    rows = []
    t0, c0 = _clock()
    alone = [engine.generate(q, spec, n_new) for q in prompts]
    t1, c1 = _clock()
    tokens = sum(len(g.token_ids) for g in alone)
    same = sum(g.token_ids == seq_out[i] for i, g in enumerate(alone))
    rows.append((f"{args.method} one-at-a-time", 1, tokens, t1 - t0, c1 - c0,
                 sum(g.metrics.prefill_s for g in alone), same, "-", "-"))
    print(f"{args.method} one-at-a-time: {tokens} tokens in {t1 - t0:.1f} s", flush=True)
    cost = engine.cost_model() if spec.budget == "auto" else None
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        dec = BatchedSpeculativeDecoder(lm.model, lm.eos_token_id, lm.max_context, spec,
                                        drafter_factory(spec, engine.datastore, lm.tokenizer, lm.eos_token_id),
                                        cost, max_batch=bs)
        t0, c0 = _clock()
        gens = dec.generate([BatchRequest(i, n_new) for i in ids])
        t1, c1 = _clock()
        tokens = sum(len(g.token_ids) for g in gens)
        same = sum(g.token_ids == seq_out[i] for i, g in enumerate(gens))
        mat = tokens / max(1, sum(g.metrics.target_calls for g in gens))
        rows.append((f"{args.method} batch {bs} (MAT {mat:.2f})", bs, tokens, t1 - t0, c1 - c0,
                     sum(g.metrics.prefill_s for g in gens), same, "-", "-"))
        print(f"{args.method} batch {bs}: {tokens} tokens in {t1 - t0:.1f} s", flush=True)
    return rows


if __name__ == "__main__":
    main()
