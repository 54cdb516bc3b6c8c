"""Tests for dresd.model.fastpath.lean_forward: on every kind of step the decode loops run (prefill, one
position, a chain after a cache, a masked tree, a batch of rows) it computes what HF's
forward computes, keys and values in the cache included; it applies only where it should."""

from __future__ import annotations

import pytest
import torch
import transformers

from dresd.model.fastpath import lean_forward
from dresd.config import ModelConfig
from dresd.model.fastpath.cpu_linear import use_dual_layout
from dresd.decoding.kv_cache import GrowingCache
from dresd.model.loading import load_model
from dresd.decoding.tree import build_tree, tree_attention_mask, tree_position_ids


def hf_forward(model, ids, cache, positions=None, mask=None):
    with torch.inference_mode():
        return model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache,
                                use_cache=True).last_hidden_state


def steps(vocab: int, prefix: int):
    """(name, ids, positions, mask) for each kind of step, in the order the loop runs them."""
    g = torch.Generator().manual_seed(0)
    tree = build_tree(5, [[6, 7, 8], [6, 9], [10, 11, 12, 13]])
    after_tree = prefix + 1 + len(tree)
    return [
        ("prefill", torch.randint(0, vocab, (1, prefix), generator=g), None, None),
        ("one position", torch.tensor([[3]]), None, None),
        ("chain", torch.tensor([[4, 5, 6, 7]]), None, None),
        ("tree", torch.tensor([tree.tokens]), tree_position_ids(tree, prefix + 5),
         tree_attention_mask(tree, prefix + 5, torch.float32)),
        ("one position after the tree", torch.tensor([[9]]), torch.tensor([[after_tree + 4]]), None),
    ]


def compare(model, vocab: int, prefix: int, atol: float) -> None:
    ours, theirs = GrowingCache(), GrowingCache()
    for name, ids, positions, mask in steps(vocab, prefix):
        got = lean_forward.decoder_forward(model, ids, ours, positions, mask)
        want = hf_forward(model, ids, theirs, positions, mask)
        assert (got - want).abs().max().item() <= atol, name
        for a, b in zip(ours.layers, theirs.layers, strict=True):
            assert (a.keys - b.keys).abs().max().item() <= atol, name
            assert (a.values - b.values).abs().max().item() <= atol, name


def test_matches_hf_forward_on_every_kind_of_step(tiny_model_dir):
    lm = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu", dual_layout=True))
    assert lean_forward.applies(lm.model)
    compare(lm.model, lm.model.config.vocab_size, prefix=20, atol=1e-5)


def test_a_batch_of_rows_matches_hf(tiny_model_dir):
    lm = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu", dual_layout=True))
    model = lm.model
    ours, theirs = GrowingCache(), GrowingCache()
    prefix = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(1))
    lean_forward.decoder_forward(model, prefix, ours)
    hf_forward(model, prefix, theirs)
    for cache in (ours, theirs):
        cache.batch_repeat_interleave(3)
    rows = torch.tensor([[1, 2, 3], [1, 4, 5], [1, 2, 6]])
    positions = torch.arange(9, 12)[None].expand(3, -1)
    got = lean_forward.decoder_forward(model, rows, ours, positions)
    torch.testing.assert_close(got, hf_forward(model, rows, theirs, positions), atol=1e-5, rtol=0)


def tiny_qwen2(**changes):
    config = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, **changes)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    use_dual_layout(model)
    return model


def test_qwen2_with_its_qkv_biases_matches_hf():
    model = tiny_qwen2()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert lean_forward.applies(model)
    compare(model, 300, prefix=20, atol=1e-5)


def test_applies_only_to_converted_llama_models_on_sdpa(tiny_model_dir):
    assert not lean_forward.applies(load_model(ModelConfig(path=str(tiny_model_dir), device="cpu",
                                                           dual_layout=False)).model)
    eager = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu", dual_layout=True)).model
    eager.config._attn_implementation = "eager"
    assert not lean_forward.applies(eager)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert not lean_forward.applies(gpt2)
    sliding = tiny_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert "sliding_attention" in sliding.config.layer_types and not lean_forward.applies(sliding)


@pytest.mark.real_model
def test_packaged_model_gets_the_same_bits(packaged_lm_packed):
    """Measured 0.0 difference on this machine; one float32 rounding step is all that may differ."""
    model = packaged_lm_packed.model
    assert lean_forward.applies(model)
    compare(model, model.config.vocab_size, prefix=200, atol=1e-6)
