"""Stage 3 (pipelines/embed.py) on its own, no Ray: the actor class called directly. Its keys
equal a direct forward of the tiny model; its shard files are whole or absent, and a
finished shard is not read again."""

from __future__ import annotations

import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
import transformers

import pipelines.shards as shards_mod
from dresd.config import CorpusConfig
from dresd.datastore.formatting import shared_prefix_len
from pipelines.embed import Embed
from pipelines.read import _file_shards
from pipelines.scratch import Scratch
from pipelines.shards import META, done_shards, shard_hidden, shard_id, shard_tokens
from pipelines.tokenize import cached_tokenizer
from tests_support import one_torch_thread, write_small_corpus

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
LENGTHS = [7, 3, 12, 5, 9]
NODE = "node-under-test"


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """The actor asks Ray for its node id (which would start a local Ray): answer it here."""
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: NODE))


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The tiny model loaded by transformers alone: each sequence run by itself, no padding."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()

    def states(seq) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.tensor([list(seq)]), output_hidden_states=True)
            h = out.hidden_states[-1][0]
            # The final-norm output: the state the model predicts the next token from.
            assert torch.allclose(model.lm_head(h), out.logits[0], atol=1e-5)
        return h.numpy()

    return states


@pytest.fixture(scope="module")
def seqs():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 259, size=n).astype(np.int32) for n in LENGTHS]


def _embed(tiny_model_dir, work, batch_size=2) -> Embed:
    return Embed(str(tiny_model_dir), device="cpu", threads=1, work=str(work), batch_size=batch_size)


def test_padded_batch_states_equal_each_sequence_alone(tiny_model_dir, tmp_path, seqs, reference):
    got = _embed(tiny_model_dir, tmp_path).embed(seqs)  # one right-padded batch of 5
    assert [h.shape for h in got] == [(n, 64) for n in LENGTHS]
    for s, h in zip(seqs, got):
        np.testing.assert_allclose(h, reference(s), atol=1e-4)


def test_keys_are_the_states_at_key_positions_in_record_order(tiny_model_dir, tmp_path, seqs, reference):
    stage = _embed(tiny_model_dir, tmp_path, batch_size=2)  # length-sorted mini-batches of 2
    starts = [2, 0, 4, 1, 8]
    keys = stage.embed_keys(seqs, starts)
    # Keys: positions start .. len-2 (the last token predicts nothing inside its record).
    expected = np.concatenate([reference(s)[k : len(s) - 1] for s, k in zip(seqs, starts)])
    assert keys.shape == (sum(n - 1 - k for n, k in zip(LENGTHS, starts)), 64)
    np.testing.assert_allclose(keys, expected, atol=1e-4)
    assert stage.embed_keys([], []).shape == (0, 64)


def _payload(seqs, starts, rows_read, rejects):
    return pickle.dumps({"seqs": seqs, "key_starts": starts, "sources": [f"s{i}" for i in range(len(seqs))],
                         "rows_read": rows_read, "rejects": rejects, "messages": [f"m{r}" for r in rejects]})


def test_call_writes_each_shard_and_returns_only_receipts(tiny_model_dir, tmp_path, seqs, reference):
    stage = _embed(tiny_model_dir, tmp_path)
    batch = {"shard": ["00000-000000", "00000-000001"], "file": ["a.jsonl", "a.jsonl"],
             "payload": [_payload(seqs[:3], [1, 0, 2], 4, {"bad_json": 1}), _payload([], [], 2, {"empty_text": 2})]}
    receipts = stage(batch)
    n_keys = (7 - 1 - 1) + (3 - 1 - 0) + (12 - 1 - 2)
    assert receipts == {"shard": ["00000-000000", "00000-000001"], "keys": [n_keys, 0]}

    work = Scratch(str(tmp_path))
    metas = done_shards(work)
    assert metas["00000-000000"] == {"shard": "00000-000000", "file": "a.jsonl", "rows_read": 4, "examples": 3,
                                     "tokens": 22, "keys": n_keys, "rejects": {"bad_json": 1},
                                     "messages": ["mbad_json"], "node": NODE, "dtype": "float32"}
    assert metas["00000-000001"]["keys"] == 0 and metas["00000-000001"]["rejects"] == {"empty_text": 2}
    tokens, offsets, key_starts, sources = shard_tokens(work, "00000-000000")
    assert tokens.tolist() == np.concatenate(seqs[:3]).tolist() and offsets.tolist() == [0, 7, 10, 22]
    assert key_starts.tolist() == [1, 0, 2] and sources == ["s0", "s1", "s2"]
    hidden = shard_hidden(work, "00000-000000")
    assert hidden.dtype == np.float16  # stored at half size
    expected = np.concatenate([reference(s)[k : len(s) - 1] for s, k in zip(seqs[:3], [1, 0, 2])])
    np.testing.assert_allclose(np.asarray(hidden, np.float32), expected, atol=2e-2, rtol=2e-3)
    assert shard_hidden(work, "00000-000001").shape == (0, 64)
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_a_bfloat16_stage_records_its_dtype_and_near_float32_keys(tiny_model_dir, tmp_path, seqs, reference):
    stage = Embed(str(tiny_model_dir), device="cpu", threads=1, work=str(tmp_path), batch_size=2, dtype="bfloat16")
    assert stage.lm.dtype == "bfloat16"
    stage({"shard": ["00000-000000"], "file": ["a.jsonl"], "payload": [_payload(seqs[:3], [1, 0, 2], 3, {})]})
    work = Scratch(str(tmp_path))
    assert done_shards(work)["00000-000000"]["dtype"] == "bfloat16"  # the build's manifest records it
    hidden = np.asarray(shard_hidden(work, "00000-000000"), np.float32)
    expected = np.concatenate([reference(s)[k : len(s) - 1] for s, k in zip(seqs[:3], [1, 0, 2])])
    cos = (hidden * expected).sum(1) / np.linalg.norm(hidden, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(hidden, expected.astype(np.float16).astype(np.float32))


def test_a_crash_mid_write_leaves_no_shard_and_a_rerun_replaces_it(tiny_model_dir, tmp_path, seqs, monkeypatch):
    stage = _embed(tiny_model_dir, tmp_path)
    batch = {"shard": ["00000-000000"], "file": ["a.jsonl"], "payload": [_payload(seqs[:2], [0, 0], 2, {})]}
    real_save = np.save

    def crash(path, arr):
        if str(path).endswith("hidden.npy"):
            raise OSError("disk full")
        real_save(path, arr)

    monkeypatch.setattr(shards_mod.np, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        stage(batch)
    monkeypatch.setattr(shards_mod.np, "save", real_save)
    assert not (tmp_path / "shards" / "00000-000000").exists()  # absent, not half-written
    assert done_shards(Scratch(str(tmp_path))) == {}

    # A folder left without meta.json (not complete) is replaced whole by the next write.
    stale = tmp_path / "shards" / "00000-000000"
    stale.mkdir()
    (stale / "tokens.npy").write_bytes(b"junk")
    stage(batch)
    assert list(done_shards(Scratch(str(tmp_path)))) == ["00000-000000"]
    assert shard_tokens(Scratch(str(tmp_path)), "00000-000000")[0].tolist() == np.concatenate(seqs[:2]).tolist()


def test_read_then_embed_without_ray_and_finished_shards_are_not_read_again(tiny_model_dir, tmp_path):
    tok = cached_tokenizer(str(tiny_model_dir))
    tokenize = dict(model_dir=str(tiny_model_dir), corpus=CorpusConfig(max_tokens=256), eos_id=tok.eos_token_id,
                    max_tokens=256, prefix_len=shared_prefix_len(tok, "chat"))
    path, good = write_small_corpus(tmp_path)
    work = tmp_path / "work"
    stage = _embed(tiny_model_dir, work, batch_size=8)

    def run(skip=frozenset()):
        written = []
        for block in _file_shards({"path": [str(path)], "index": [0]}, tokenize, 15, None, skip):
            written += stage(block)["shard"]
        return written

    assert run() == [shard_id(0, c) for c in range(3)]  # 45 rows / 15
    metas = done_shards(Scratch(str(work)))
    assert sum(m["rows_read"] for m in metas.values()) == 45
    assert sum(m["examples"] for m in metas.values()) == len(good)
    assert sum(sum(m["rejects"].values()) for m in metas.values()) == 45 - len(good)
    assert run(frozenset(metas)) == []  # a rerun of the same build does nothing
    stamp = (work / "shards" / shard_id(0, 0) / META).stat().st_mtime_ns
    shutil.rmtree(work / "shards" / shard_id(0, 1))  # lost: only that one is embedded again
    assert run(frozenset(done_shards(Scratch(str(work))))) == [shard_id(0, 1)]
    assert (work / "shards" / shard_id(0, 0) / META).stat().st_mtime_ns == stamp
    assert done_shards(Scratch(str(work))) == metas
