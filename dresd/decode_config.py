"""Typed configuration of the batch offline decoding job (jobs/decode.py).

Loaded with dresd.config.load_yaml (unknown keys are errors); every field can be
overridden on the job's command line with --set key=value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dresd.config import ModelConfig

PACKAGED_PROMPTS = ("mtbench", "sharegpt")


@dataclass
class DecodeConfig:
    """Prompts dataset -> Ray Data decode stage -> parquet part files (and optionally a corpus)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # Prompt source: a .jsonl / .json / .parquet file, a `datasets.save_to_disk` folder,
    # or "mtbench" (80 MT-Bench first turns) / "sharegpt" (deduplicated ShareGPT first turns).
    prompts: str = "mtbench"
    # Field holding the prompt text in a file source (ignored for the packaged sets).
    prompt_field: str = "prompt"
    # Field holding a stable row id in a file source (None = "<file name>:<row>").
    id_field: str | None = None
    # Skip this many rows of the source first (after which `limit` counts).
    skip: int = 0
    # Decode at most this many rows (None = all the rest).
    limit: int | None = None
    # Prompt layout: the tokenizer's chat template or "Question: ...\nAnswer:\n".
    prompt_format: Literal["chat", "qa"] = "chat"
    # Prompts longer than this many tokens (formatted) are rejected as "too_long"
    # (None = only those that leave no room in the model's context).
    max_prompt_tokens: int | None = 1024
    # New tokens per row at most (a row also stops at EOS).
    max_new_tokens: int = 128
    # 0 = greedy; > 0 = temperature sampling (with top_p), seeded per batch from `seed`.
    temperature: float = 0.0
    # Nucleus sampling mass (1.0 = plain temperature sampling). Ignored when greedy.
    top_p: float = 1.0
    # Sampling seed: batch b of chunk c draws from a generator seeded by (seed, c, b).
    seed: int = 0
    # Sequences per forward inside an actor (rows of a chunk are length-sorted first).
    batch_size: int = 8
    # Rows per chunk: one chunk = one parquet part = the unit of scheduling and resumption.
    chunk_rows: int = 64
    # Output folder of the part files (part-<chunk>.parquet).
    output: str = "runs/decode/mtbench"
    # Decoding actors (each loads the model once).
    actors: int = 1
    # CPUs each actor reserves in Ray's accounting (below its thread count on small machines).
    actor_cpus: float = 1.0
    # torch threads per actor (0 = this node's cores / actors).
    threads: int = 0
    # GPUs per actor (0 = CPU only).
    gpus: float = 0.0
    # OMP_WAIT_POLICY in the actors' environment (None = the OpenMP default, spin-waiting).
    # PASSIVE: with spinning, 2 torch threads on a 2-core node that other processes share
    # made batched decode steps ~25x slower (benchmarks/batch_decode_bench.py docstring).
    omp_wait_policy: str | None = "PASSIVE"
    # Ray address (None = RAY_ADDRESS or a fresh local Ray).
    ray_address: str | None = None
    # Also write an in-distribution corpus: jsonl of {"id", "prompt", "response"} records
    # (the model's own replies), ready for `dresd build --corpus FILE`.
    id_corpus: bool = False
    # Where the corpus goes (None = "<output>.jsonl", next to the output folder).
    corpus_file: str | None = None
