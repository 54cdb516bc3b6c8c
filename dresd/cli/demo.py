"""The README's demo: a real datastore from packaged ShareGPT, then greedy vs DReSD.

Held-out evaluation prompts are the first deduplicated ShareGPT first turns; the datastore
is built from the records after them, so no evaluated prompt is in the datastore. A second
run reuses the converted model and the datastore when the build config is unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dresd.config import BuildConfig, CorpusConfig, DemoConfig, ModelConfig, SpeculativeConfig
from dresd.datastore.corpus import sharegpt_first_turns
from dresd.datastore.store import Datastore, reusable_store
from dresd.decoding.engine import Engine
from dresd.evaluation.compare import markdown_table, run_methods, summarize

# ShareGPT first turns longer than this are left out; trades prompt variety against the demo's run time.
MAX_CHARS = 1500


def run_demo(cfg: DemoConfig) -> int:
    """Build (or reuse) the demo datastore, decode held-out prompts with each method, print a table."""
    workdir, n_prompts, max_new_tokens, n_records = Path(cfg.workdir), cfg.prompts, cfg.max_new_tokens, cfg.records
    workdir.mkdir(parents=True, exist_ok=True)
    turns = sharegpt_first_turns(max_chars=MAX_CHARS)
    eval_turns, store_turns = turns[:n_prompts], turns[n_prompts : n_prompts + n_records]
    corpus = workdir / "sharegpt_datastore.jsonl"
    with open(corpus, "w") as fh:
        for sid, prompt, reply in store_turns:
            fh.write(json.dumps({"id": sid, "prompt": prompt, "response": reply}) + "\n")
    (workdir / "eval_prompts.jsonl").write_text("".join(json.dumps({"id": s, "prompt": p}) + "\n" for s, p, _ in eval_turns))

    build = BuildConfig(
        corpus=CorpusConfig(paths=[str(corpus)], id_field="id", max_tokens=512),
        output=str(workdir / "datastore"),
    )
    root = Path(build.output)
    if reusable_store(root, build):
        print(f"reusing datastore {Datastore(root).path}")
    else:
        from pipelines.build import build_datastore

        print(f"building a datastore from {len(store_turns)} ShareGPT records (held out: {len(eval_turns)} prompts)")
        print("\n".join(build_datastore(build).lines()))

    engine = Engine.open(ModelConfig(), str(root))
    specs = {
        "greedy": SpeculativeConfig(method="greedy"),
        "dresd": SpeculativeConfig(method="dresd"),  # draft budget sized to this machine
        "hybrid": SpeculativeConfig(method="hybrid"),
        "dresd-ref": SpeculativeConfig(method="dresd", budget="off", context_keys=False),  # the paper's settings
        "pld": SpeculativeConfig(method="pld", budget="off"),
    }
    runs = run_methods(engine, [p for _, p, _ in eval_turns], specs, max_new_tokens)
    with open(workdir / "generations.jsonl", "w") as fh:  # what a rerun's outputs can be compared with
        for name, run in runs.items():
            for gen in run.generations:
                fh.write(json.dumps({"method": name, "token_ids": gen.token_ids}) + "\n")
    table = markdown_table(summarize(runs))
    stamp = time.strftime("%Y-%m-%d %H:%M")
    report = (
        f"DReSD demo, {stamp}: SmolLM2-135M-Instruct (fp32), OOD datastore of "
        f"{engine.datastore.num_keys} keys from {len(store_turns)} ShareGPT replies, "
        f"{len(eval_turns)} held-out ShareGPT prompts, greedy, {max_new_tokens} new tokens\n\n{table}\n"
    )
    (workdir / "results.md").write_text(report)
    print(report)
    lossless = all(r["identical_to_greedy"] == r["prompts"] for r in summarize(runs))
    print("all speculative outputs identical to greedy:", lossless)
    return 0
