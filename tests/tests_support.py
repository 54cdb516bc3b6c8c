"""Helpers shared by several test modules (imported by name; tests/ is on sys.path)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from dresd.datastore.compression import Compressor, compress, fit_compressor
from dresd.datastore.publish import DatastoreParts
from dresd.datastore.index import IndexParams, add_keys, train_index
from dresd.model.fastpath.weight_codes import CODE_RANGES, GROUP, WeightCodes, decode


TINY_VOCAB = 272  # ids of the tiny test models: the byte tokenizer's 259 (tests/tiny_models.py) and spare ones
CASE_TOKENS = 40  # greedy tokens of the conftest's `tiny_case`


def identity_compressor(dim: int) -> Compressor:
    """A compressor that keeps hidden states as they are (then L2-normalises): keys = hidden."""
    return Compressor(np.zeros(dim, np.float32), np.ones(dim, np.float32), np.eye(dim, dtype=np.float32),
                      np.full(dim, 1.0 / dim, np.float32))


def write_small_corpus(folder: Path) -> tuple[Path, list[dict]]:
    """A jsonl corpus of 40 good prompt/response rows with 5 bad rows mixed in.

    Bad rows (1-based line numbers): 6 missing field, 10 bad JSON, 13 empty text,
    16 not a string, 21 prompt longer than max_tokens=256.
    """
    good = [{"prompt": f"question {i}?", "response": f"answer {i}: " + "abc " * (i % 7 + 3)} for i in range(40)]
    lines = [json.dumps(r) for r in good]
    lines.insert(5, json.dumps({"prompt": "no response here"}))
    lines.insert(9, "{not json")
    lines.insert(12, json.dumps({"prompt": "p", "response": "   "}))
    lines.insert(15, json.dumps({"prompt": "p", "response": 7}))
    lines.insert(20, json.dumps({"prompt": "x" * 600, "response": "too long"}))
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, good


def one_torch_thread():
    """Generator body of a module-scoped autouse fixture: one torch thread while the module runs.

    A tiny model gains nothing from two threads, and with the 2 cores busy (other tests, Ray
    workers) OpenMP spinning makes each forward far slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama_lm(tmp_path_factory, vocab_size: int = TINY_VOCAB):
    """A loaded tiny random Llama (dresd.model.loading.make_tiny_llama) in a fresh temp folder."""
    from dresd.config import ModelConfig
    from dresd.model.loading import load_model
    from tiny_models import make_tiny_llama

    folder = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", vocab_size=vocab_size, init_std=0.5)
    # The packed kernel whatever this CPU's layout check says of a tiny weight: a timing that
    # close either way must not decide what the suite tests.
    return load_model(ModelConfig(path=str(folder), device="cpu", dual_layout=True))


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding without any cache (the ground truth)."""
    import torch

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


# ----------------------------------------------------------------------------- a small store

EOS = 2
VALUE_LEN = 4
# Three small records: 5 + 3 + 4 tokens.
RECORDS = [[10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33]]
FLAT = IndexParams("flat", 8, 0, 0, 0, False, 1.0)  # make_parts' default layout
IDENTITY = {
    "name": "tiny-model",
    "architecture": "llama",
    "vocab_size": 272,
    "hidden_size": 16,
    "num_layers": 2,
    "fingerprint": "abc123",
}


def flat_params(dim: int = 8) -> IndexParams:
    return IndexParams("flat", dim, 0, 0, 0, False, 1.0)


def make_parts(records=RECORDS, key_positions=None, hidden_dim=16, seed=0, dim=8, hidden=None):
    """Parts of a store over `records` (keys: every position but each record's last) with
    random hidden states (or `hidden`), compressed to `dim` in an exact flat index."""
    tokens = np.concatenate([np.asarray(r) for r in records]).astype(np.int32)
    offsets = np.cumsum([0] + [len(r) for r in records]).astype(np.int64)
    if key_positions is None:
        key_positions = [p for s, e in zip(offsets[:-1], offsets[1:]) for p in range(s, e - 1)]
    key_positions = np.asarray(key_positions, dtype=np.int64)
    if hidden is None:
        hidden = np.random.default_rng(seed).normal(size=(len(key_positions), hidden_dim)).astype(np.float32)
    comp = fit_compressor(hidden, dim)
    index = train_index(flat_params(dim), compress(comp, hidden))
    add_keys(index, compress(comp, hidden))
    parts = DatastoreParts(
        tokens=tokens,
        record_offsets=offsets,
        key_positions=key_positions,
        sources=[f"src-{i}" for i in range(len(records))],
        compressor=comp,
        index=index,
    )
    return parts


def make_manifest(identity=IDENTITY, fmt_fingerprint="fmt-1", eos=EOS, value_len=VALUE_LEN, dim=8):
    """The manifest fields `publish` needs for a `make_parts` store."""
    params = flat_params(dim)
    return {
        "model": dict(identity),
        "prompt_format": {"name": "chat", "fingerprint": fmt_fingerprint, "shared_prefix_len": 0},
        "eos_id": eos,
        "value_len": value_len,
        "index": {"params": params.to_dict(), "factory": params.factory},
    }


def publish_for_model(root, lm, version: str | None = None, prompt_format: str = "chat", value_len: int = 12,
                      seed: int = 0, **identity_changes):
    """Publish a small random store that a loaded model `lm` accepts (its identity, prompt
    format fingerprint and EOS; `identity_changes` make one it refuses). Returns the version."""
    from dresd.datastore.formatting import format_fingerprint
    from dresd.datastore.publish import publish

    rng = np.random.default_rng(seed)
    records = [rng.integers(3, 259, n).tolist() for n in (30, 20, 25)]
    parts = make_parts(records, hidden_dim=lm.identity["hidden_size"], seed=seed)
    manifest = make_manifest({**lm.identity, **identity_changes}, format_fingerprint(lm.tokenizer, prompt_format),
                             lm.eos_token_id, value_len)
    manifest["prompt_format"]["name"] = prompt_format
    return Path(publish(root, parts, manifest, version)).name


def coded_weight(out: int, inn: int, bits: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight built as GGUF dequantizes one: Q4_1 (bits 4) or Q8_0 (bits 8) blocks
    of GROUP inputs with float16 scales (and offsets), random codes."""
    gen = torch.Generator().manual_seed(seed)
    low, high = CODE_RANGES[bits]
    codes = torch.randint(low, high + 1, (out, inn), generator=gen, dtype=torch.int16)
    # The quantizer maps each block's extremes to the end codes.
    codes[:, ::GROUP] = low if bits == 4 else high
    codes[:, 1::GROUP] = high
    groups = inn // GROUP
    scale = (torch.rand(out, groups, generator=gen) * 0.02 + 1e-4).half().float()
    offset = (-torch.rand(out, groups, generator=gen) * 0.1).half().float() if bits == 4 else torch.zeros(out, groups)
    return decode(WeightCodes(codes, scale, offset, bits))


def passes_in_process(monkeypatch) -> None:
    """Builds and updates run their passes (pipelines/passes.py) in this process: the same
    stage callables the Ray Data graphs call (read, embed, write, code), called directly, and
    Ray never joined. For tests whose checks run before or after the passes."""
    from types import SimpleNamespace

    import pyarrow as pa
    import ray

    import pipelines.work as work_mod
    from dresd.datastore.corpus import list_corpus_files
    from pipelines import passes
    from functools import partial

    from pipelines.embed import Embed, compress_held
    from pipelines.encode import code_shards, write_shards
    from pipelines.read import _file_shards

    def shards(cfg, tokenize, skip=frozenset(), select=None):
        for i, path in enumerate(list_corpus_files(cfg.corpus.paths)):
            yield from _file_shards({"path": [path], "index": [i]}, tokenize, cfg.shard_rows, cfg.corpus.max_records,
                                    skip, select)

    def stage(cfg, **codec):
        return Embed(cfg.model.path, "cpu", 1, cfg.batch_size, cfg.model.dtype, **codec)

    def count_pass(cfg, tokenize):
        return {s: c for block in shards(cfg, tokenize) for s, c in passes.counts_of(passes._counts(block)).items()}

    def fit_pass(cfg, tokenize, identity, select, per_call=1):
        embed = stage(cfg)
        return passes.sample_of([embed(block) for block in shards(cfg, tokenize, select=select)], select)

    def stream_pass(cfg, tokenize, identity, work, ctag, plan, skip, held=None):
        embed = stage(cfg, work=work, ctag=ctag) if held is None else partial(compress_held, work=work, ctag=ctag,
                                                                              held=held)
        return [s for block in shards(cfg, tokenize, skip=skip)
                for s in write_shards(embed(block), work, ctag, plan).column("shard").to_pylist()]

    def code_pass(cfg, work, ctag, tag, first_ids):
        table = pa.table({"shard": sorted(first_ids), "first": [first_ids[s] for s in sorted(first_ids)]})
        return code_shards(table, work, ctag, tag).column("shard").to_pylist()

    monkeypatch.setattr(work_mod, "ensure_ray", lambda address=None: None)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "here"))
    for name, fn in [("count_pass", count_pass), ("fit_pass", fit_pass), ("stream_pass", stream_pass),
                     ("code_pass", code_pass)]:
        monkeypatch.setattr(passes, name, fn)


def hold_in_child(entry: Path) -> subprocess.Popen:
    """A child process that leases cache entry `entry` (dresd.storage.leases) and sleeps until
    killed; returns once it holds it."""
    code = ("import sys, time; from pathlib import Path; from dresd.storage.leases import Lease\n"
            "lease = Lease(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(entry)], cwd=Path(__file__).resolve().parents[1],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child
