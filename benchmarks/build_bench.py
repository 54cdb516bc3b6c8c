"""Build benchmarks (issue: production datastore builds), on the real packaged model.

1. Embedding throughput of the Ray pipeline vs a plain loop of the same model forward on
   the same batches, in the same run (goal: pipeline >= 0.8 of the loop).
2. Peak memory of a whole build (driver + every Ray process, PSS so shared object-store
   pages count once) on a ~100k-token corpus vs a ~25k-token corpus (goal: within +25%).

    .venv/bin/python benchmarks/build_bench.py [--small 25000] [--large 100000]

Prints a table and writes runs/bench/build_bench.md.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import psutil

from dresd.config import BuildConfig, CorpusConfig, ModelConfig
from dresd.datastore.corpus import sharegpt_first_turns
from dresd.datastore.formatting import record_ids, shared_prefix_len
from dresd.datastore.corpus import Example, RecordError
from dresd.model.loading import load_model
from dresd.evaluation.results import save_run


class PeakMemory:
    """Samples the summed PSS of this process and all its descendants (Ray's are ours)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _total(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._total())
                time.sleep(self.interval)
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def write_corpus(path: Path, tokenizer, eos: int, target_tokens: int, offset: int = 0) -> int:
    """ShareGPT first turns until `target_tokens` tokens; returns the token count."""
    n, rows = 0, []
    for sid, prompt, reply in sharegpt_first_turns(max_chars=1500)[offset:]:
        try:
            ids = record_ids(tokenizer, Example(sid, prompt, reply), "chat", 512, eos)
        except RecordError:  # the build would reject it too: keep the corpus clean
            continue
        rows.append({"id": sid, "prompt": prompt, "response": reply})
        n += len(ids)
        if n >= target_tokens:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return n


def plain_loop_tokens_per_s(corpus: Path, batch_size: int) -> float:
    """The same forwards as the embed stage (length-sorted padded batches), no Ray."""
    from pipelines.embed import Embed
    from dresd.model.loading import load_model as _load

    lm = _load(ModelConfig(dual_layout=False))
    emb = Embed(str(lm.model.name_or_path), "cpu", 0, batch_size)
    prefix = shared_prefix_len(lm.tokenizer, "chat")
    seqs, starts = [], []
    for line in corpus.read_text().splitlines():
        r = json.loads(line)
        seqs.append(record_ids(lm.tokenizer, Example(r["id"], r["prompt"], r["response"]), "chat", 512, lm.eos_token_id))
        starts.append(prefix)
    t = time.perf_counter()
    keys = emb.embed_keys(seqs, starts)
    elapsed = time.perf_counter() - t
    return sum(len(s) for s in seqs) / elapsed, len(keys)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=25_000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(ModelConfig(dual_layout=False))
    from pipelines.build import build_datastore
    from pipelines.runtime import ensure_ray

    results = {}
    for label, target in [("small", args.small), ("large", args.large)]:
        corpus = out / f"corpus_{label}.jsonl"
        n_tok = write_corpus(corpus, lm.tokenizer, lm.eos_token_id, target)
        cfg = BuildConfig(corpus=CorpusConfig(paths=[str(corpus)], id_field="id", max_tokens=512),
                          output=str(out / f"store_{label}"), shard_rows=100)
        ensure_ray()
        with PeakMemory() as mem:
            report = build_datastore(cfg)
        # The streaming pass (read, tokenize, embed, compress, write); the fit pass is timed apart.
        embed_s = report.timings["read+tokenize+embed+write"]
        results[label] = {"tokens": n_tok, "peak_gib": mem.peak / 2**30, "embed_s": embed_s,
                          "scratch_bytes_per_key": report.scratch_bytes_per_key,
                          "pipeline_tok_s": n_tok / embed_s, "total_s": report.timings["total"]}
        print(label, results[label], flush=True)
    # Plain loops over the same corpora, same batches, same process (after the builds).
    loop = {label: plain_loop_tokens_per_s(out / f"corpus_{label}.jsonl", BuildConfig().batch_size)[0]
            for label in results}
    growth = results["large"]["peak_gib"] / results["small"]["peak_gib"] - 1
    lines = [
        f"Build benchmark, {time.strftime('%Y-%m-%d %H:%M')}, 2-core CPU, SmolLM2-135M fp32",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
        *[line for label, r in results.items() for line in (
            f"| pipeline embedding (read+tokenize+embed wall incl. Ray and actor start-up, {r['tokens']} tokens) "
            f"| {r['pipeline_tok_s']:.0f} tok/s | |",
            f"| plain loop, same forwards, {r['tokens']} tokens | {loop[label]:.0f} tok/s | |",
            f"| pipeline / plain loop, {r['tokens']} tokens | {r['pipeline_tok_s'] / loop[label]:.2f} | >= 0.8 |")],
        f"| peak memory, {results['small']['tokens']} tokens | {results['small']['peak_gib']:.2f} GiB | |",
        f"| peak memory, {results['large']['tokens']} tokens | {results['large']['peak_gib']:.2f} GiB | |",
        f"| growth for {results['large']['tokens'] / results['small']['tokens']:.1f}x tokens | {growth:+.1%} | <= +25% |",
    ]
    text = "\n".join(lines) + "\n"
    (out / "build_bench.md").write_text(text)
    print(text)
    print(f"wrote {save_run('build_bench', text, out)}")


if __name__ == "__main__":
    main()
