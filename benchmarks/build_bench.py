"""Build benchmark at scale (issue 24, item 6), on the real packaged model and ShareGPT.

Two end-to-end builds from packaged data, a ~100k-token corpus and a ~1M-token one (the
first 100k tokens of the larger corpus are the smaller), each measured for:

- scratch bytes per key (the work folder once every shard is coded) and published bytes per
  corpus token (the version folder);
- peak memory summed over the driver and every Ray process (PSS, so object-store pages
  shared by several processes count once); goal: at most +25% for 10x the data;
- the pipeline's embedding throughput, tokens embedded by its passes (the fit sample and the
  stream) over their wall time, against a plain loop of the same forwards on the 100k
  corpus in this process (goal: at least 0.85).

Then a serving replica's resident memory: a fresh process opens the model (baseline), then
the 1M store (index memory-mapped) and decodes with DReSD; RSS and PSS after each.

    .venv/bin/python benchmarks/build_bench.py [--small 100000] [--large 1000000]

Prints the table and writes runs/bench/build_bench.{md,json}. The projection for larger
models lives in docs/index-layout.md and is computed from these figures by `projection`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from dresd.config import BuildConfig, CorpusConfig, ModelConfig
from dresd.datastore.corpus import Example, RecordError, sharegpt_first_turns
from dresd.datastore.formatting import record_ids, shared_prefix_len
from dresd.evaluation.results import save_run
from dresd.model.loading import load_model


def _label(cmdline: list[str], name: str) -> str:
    """A process's label: a Ray worker's title (ray::IDLE, ray::MapWorker(...)), a Python
    script's file name, else the executable's name."""
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0][:48]
    scripts = [Path(a).name for a in cmdline if a.endswith(".py")]
    return scripts[0] if scripts else name


class PeakMemory:
    """The peak summed memory of this process and all its descendants (Ray's are ours): RSS
    every `interval` seconds (cheap), PSS every `pss_every` (reading it walks each process's
    page tables, which at every half second took most of a core from the build it measured;
    PSS counts pages shared by several processes, the object store's, once)."""

    def __init__(self, interval: float = 0.5, pss_every: float = 10.0):
        self.interval, self.pss_every = interval, pss_every
        self.peak = self.peak_rss = 0
        self.at_peak: dict[str, int] = {}  # PSS by process name at the peak PSS reading: where the memory was
        self._stop = threading.Event()

    @staticmethod
    def _processes():
        me = psutil.Process()
        return me, [me, *me.children(recursive=True)]

    @classmethod
    def _each(cls) -> dict[str, int]:
        """PSS by process label (read on the PSS schedule only: labels read each command line)."""
        me, procs = cls._processes()
        out: dict[str, int] = {}
        for p in procs:
            try:
                name = "driver" if p.pid == me.pid else _label(p.cmdline(), p.name())
                out[name] = out.get(name, 0) + p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    @classmethod
    def _rss(cls) -> int:
        total = 0
        for p in cls._processes()[1]:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def __enter__(self):
        def loop():
            last, rss_then = 0.0, 0
            while not self._stop.is_set():
                rss = self._rss()
                # PSS on its schedule, and as soon as RSS has grown 5% past its last reading.
                if time.monotonic() - last >= self.pss_every or rss > 1.05 * rss_then:
                    each = self._each()
                    if sum(each.values()) > self.peak:
                        self.peak, self.at_peak = sum(each.values()), each
                    last, rss_then = time.monotonic(), rss
                self.peak_rss = max(self.peak_rss, rss)
                time.sleep(self.interval)
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def write_corpus(path: Path, tokenizer, eos: int, target_tokens: int) -> int:
    """ShareGPT first turns, in their packaged order, until `target_tokens` tokens; returns
    the token count (records the build would reject are left out)."""
    n, rows = 0, []
    for sid, prompt, reply in sharegpt_first_turns(max_chars=1500):
        try:
            ids = record_ids(tokenizer, Example(sid, prompt, reply), "chat", 512, eos)
        except RecordError:
            continue
        rows.append({"id": sid, "prompt": prompt, "response": reply})
        n += len(ids)
        if n >= target_tokens:
            break
    if n < target_tokens:
        raise SystemExit(f"the packaged ShareGPT first turns hold {n} tokens, fewer than {target_tokens}")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return n


def plain_loop_tokens_per_s(corpus: Path, batch_size: int, shard_rows: int) -> float:
    """The stream pass's forwards over `corpus` in one process, no Ray: records in shards of
    `shard_rows`, each shard's records in length-sorted padded batches of `batch_size`."""
    from pipelines.embed import Embed

    lm = load_model(ModelConfig(dual_layout=False))
    emb = Embed(str(lm.model.name_or_path), "cpu", 0, batch_size)
    prefix = shared_prefix_len(lm.tokenizer, "chat")
    seqs = [record_ids(lm.tokenizer, Example(r["id"], r["prompt"], r["response"]), "chat", 512, lm.eos_token_id)
            for r in map(json.loads, corpus.read_text().splitlines())]
    t = time.perf_counter()
    for a in range(0, len(seqs), shard_rows):
        emb.embed_keys(seqs[a : a + shard_rows], [prefix] * len(seqs[a : a + shard_rows]))
    return sum(len(s) for s in seqs) / (time.perf_counter() - t)


REPLICA = """
import json, sys, psutil
from dresd.config import ModelConfig, SpeculativeConfig
from dresd.datastore.store import Datastore
from dresd.decoding.engine import Engine
from dresd.model.loading import load_model
def mem():
    m = psutil.Process().memory_full_info()
    return {"rss": m.rss, "pss": m.pss}
lm = load_model(ModelConfig())
Engine(lm, None).generate("Write a haiku about autumn.", SpeculativeConfig(method="greedy"), 64)
base = mem()
Engine(lm, Datastore(sys.argv[1])).generate("Write a haiku about autumn.", SpeculativeConfig(method="dresd"), 64)
print(json.dumps({"model": base, "store": mem()}))
"""


def replica_memory(store: Path) -> dict:
    """RSS and PSS of a fresh process with the model alone, then with the store open."""
    out = subprocess.run([sys.executable, "-c", REPLICA, str(store)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# A 7B model's shapes (Llama-2-7B / Mistral-7B class) and GPUs' dense bfloat16 peaks, for the projection.
SEVEN_B = {"params": 6.74e9, "hidden": 4096}
GPUS = {"H100 SXM": 989e12, "A100": 312e12}
MFU = 0.40  # the share of peak an embedding forward of long, batched records reaches (an assumption)


def projection(large: dict, corpus_tokens: float = 100e6) -> list[str]:
    """Markdown rows for a 7B model per `corpus_tokens`, from this run's per-key and per-token
    costs (which depend on the index settings, not on the model's width) and the model's
    shapes: a forward costs about 2 x params FLOPs a token."""
    keys = corpus_tokens * large["keys"] / large["tokens"]
    gb = 1e9
    hours = {gpu: corpus_tokens * 2 * SEVEN_B["params"] / (peak * MFU) / 3600 for gpu, peak in GPUS.items()}
    full = keys * SEVEN_B["hidden"] * 2  # what bf16 full states would take as scratch
    return [
        f"| keys | {keys / 1e6:.0f} M ({large['keys'] / large['tokens']:.3f} a corpus token, measured) |",
        f"| build scratch | {keys * large['scratch_bytes_per_key'] / gb:.1f} GB "
        f"({large['scratch_bytes_per_key']:.0f} B a key, measured; full bf16 states would be {full / 1e12:.2f} TB) |",
        f"| index memory (index.faiss, memory-mapped by replicas) | {keys * large['index_bytes_per_key'] / gb:.1f} GB "
        f"({large['index_bytes_per_key']:.0f} B a key, measured) |",
        f"| published on disk | {corpus_tokens * large['published_bytes_per_token'] / gb:.1f} GB "
        f"({large['published_bytes_per_token']:.0f} B a corpus token, measured) |",
        *[f"| embedding, one {gpu} | {h:.1f} GPU-hours (2 x {SEVEN_B['params'] / 1e9:.2f}e9 FLOPs a token at "
          f"{MFU:.0%} of {GPUS[gpu] / 1e12:.0f} TFLOP/s) |" for gpu, h in hours.items()],
    ]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


SHARD_ROWS = 100  # corpus rows a shard: the 1M-token corpus makes 38 shards


def build(label: str, corpus: Path, out: Path, tokens: int) -> dict:
    from pipelines.build import build_datastore
    from pipelines.runtime import ensure_ray

    cfg = BuildConfig(corpus=CorpusConfig(paths=[str(corpus)], id_field="id", max_tokens=512),
                      output=str(out / f"store_{label}"), shard_rows=SHARD_ROWS)
    ensure_ray()
    with PeakMemory() as mem:
        report = build_datastore(cfg)
    t = report.timings
    # Tokens the passes embedded: the fit sample's records, then the stream's (none when the
    # sample was every key and the stream compressed the fit's states).
    embedded = report.fit["sample_tokens"] + (0 if report.fit["embedded_once"] else tokens)
    row = {"tokens": tokens, "keys": report.keys, "peak_gib": mem.peak / 2**30, "peak_rss_gib": mem.peak_rss / 2**30,
           "scratch_bytes_per_key": report.scratch_bytes_per_key,
           "published_bytes_per_token": folder_bytes(Path(report.version_dir)) / tokens,
           "index_bytes_per_key": (Path(report.version_dir) / "index.faiss").stat().st_size / report.keys,
           "embedded_tokens": embedded, "embed_s": t["fit"] + t["read+tokenize+embed+write"],
           "total_s": t["total"], "layout": report.index_layout, "store": str(report.version_dir),
           "at_peak_mib": {k: round(v / 2**20) for k, v in sorted(mem.at_peak.items(), key=lambda kv: -kv[1])}}
    row["pipeline_tok_s"] = embedded / row["embed_s"]
    print(label, {k: v for k, v in row.items() if k != "layout"}, flush=True)
    return row


def report(results: dict, loop: float, replica: dict, note: str = "") -> list[str]:
    """The benchmark's markdown: the two builds, the plain loop, the replica, the projection."""
    small, large = results["small"], results["large"]
    growth = large["peak_gib"] / small["peak_gib"] - 1
    gib = 2**30
    lines = [
        f"Build benchmark, {time.strftime('%Y-%m-%d %H:%M')}, 2-core CPU, SmolLM2-135M float32, ShareGPT first turns",
        "",
        "| figure | " + " | ".join(f"{r['tokens']:,} tokens" for r in results.values()) + " | goal |",
        "|---|---|---|---|",
        "| keys | " + " | ".join(f"{r['keys']:,}" for r in results.values()) + " | |",
        "| index layout | " + " | ".join(r["layout"].split(":")[0] for r in results.values()) + " | |",
        "| build wall, end to end | " + " | ".join(f"{r['total_s'] / 60:.1f} min" for r in results.values()) + " | |",
        "| scratch per key | " + " | ".join(f"{r['scratch_bytes_per_key']:.0f} B" for r in results.values())
        + " | <= 300 B |",
        "| published per corpus token | " + " | ".join(f"{r['published_bytes_per_token']:.0f} B"
                                                     for r in results.values()) + " | |",
        "| index.faiss per key | " + " | ".join(f"{r['index_bytes_per_key']:.0f} B" for r in results.values()) + " | |",
        "| peak memory, driver + every Ray process (PSS) | " + " | ".join(f"{r['peak_gib']:.2f} GiB"
                                                                         for r in results.values())
        + f" | {growth:+.1%} for {large['tokens'] / small['tokens']:.0f}x (goal <= +25%) |",
        "| peak memory, summed RSS (shared pages counted per process) | "
        + " | ".join(f"{r['peak_rss_gib']:.2f} GiB" for r in results.values()) + " | |",
        "| tokens embedded (fit sample + stream) | " + " | ".join(f"{r['embedded_tokens']:,}" for r in results.values())
        + " | |",
        "| pipeline embedding, fit + stream passes | " + " | ".join(f"{r['pipeline_tok_s']:.0f} tok/s"
                                                                    for r in results.values()) + " | |",
        f"| plain loop, the stream pass's forwards, {small['tokens']:,}-token corpus, no Ray | {loop:.0f} tok/s | | |",
        "| pipeline / plain loop | " + " | ".join(f"{r['pipeline_tok_s'] / loop:.2f}" for r in results.values())
        + " | >= 0.85 |",
        "",
        *(["Where each peak was (PSS by process at the peak reading, MiB):", "",
            *[f"- {r['tokens']:,} tokens: " + ", ".join(f"{k} {v:,}" for k, v in r["at_peak_mib"].items() if v >= 20)
              for r in results.values()], ""] if all("at_peak_mib" in r for r in results.values()) else []),
        f"Serving replica (a fresh process, the {large['tokens']:,}-token store open, index memory-mapped, one "
        "DReSD generation):",
        "",
        "| process | RSS | PSS |",
        "|---|---|---|",
        f"| model only | {replica['model']['rss'] / gib:.2f} GiB | {replica['model']['pss'] / gib:.2f} GiB |",
        f"| model + store | {replica['store']['rss'] / gib:.2f} GiB | {replica['store']['pss'] / gib:.2f} GiB |",
        f"| the store's share | {(replica['store']['rss'] - replica['model']['rss']) / gib:.2f} GiB | "
        f"{(replica['store']['pss'] - replica['model']['pss']) / gib:.2f} GiB |",
        "",
        f"Projection: a 7B model on GPU workers, per 100M corpus tokens, at the default index settings "
        f"(from the {large['tokens']:,}-token build's measured costs and the model's shapes):",
        "",
        "| figure | per 100M corpus tokens |",
        "|---|---|",
        *projection(large),
    ]
    return lines + (["", note] if note else [])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=100_000, help="corpus tokens of the smaller build")
    ap.add_argument("--large", type=int, default=1_000_000, help="corpus tokens of the larger build")
    ap.add_argument("--out", default="runs/bench/build")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(ModelConfig(dual_layout=False))
    corpora = {label: (out / f"corpus_{label}.jsonl", target) for label, target in
               [("small", args.small), ("large", args.large)]}
    tokens = {label: write_corpus(path, lm.tokenizer, lm.eos_token_id, target)
              for label, (path, target) in corpora.items()}
    del lm
    results = {label: build(label, corpora[label][0], out, tokens[label]) for label in corpora}
    loop = plain_loop_tokens_per_s(corpora["small"][0], BuildConfig().batch_size, SHARD_ROWS)
    replica = replica_memory(Path(results["large"]["store"]))
    lines = report(results, loop, replica)
    text = "\n".join(lines) + "\n"
    (out / "build_bench.md").write_text(text)
    (out / "build_bench_figures.json").write_text(json.dumps({"builds": results, "loop_tok_s": loop,
                                                              "replica": replica}, indent=1))
    print(text)
    print(f"wrote {save_run('build_bench', text, out)}")


if __name__ == "__main__":
    main()
