"""Tests for dresd.cpu_linear: the dual-layout linear computes what nn.Linear computes on
both of its paths, conversion keeps tied weights tied, load_model applies it only when
asked, and greedy decoding on a converted model matches the stock model's."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from dresd.budget import _cost_key
from dresd.config import ModelConfig, SpeculativeConfig
from dresd.cpu_linear import (
    BLOCK_COLUMNS, MAX_MATVEC_ROWS, ROW_BUCKETS, DualLayoutLinear, SiblingGroup, block_width, candidate_widths,
    has_dual_layout, product_plan_tag, row_bucket, tune_products, use_dual_layout,
)
from dresd.decoding import SpeculativeDecoder
from dresd.models import load_model, make_tiny_llama
from tests_support import greedy_reference


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5,), (1, 5), (2, 5), (3, 5), (4, 5), (2, 3, 5), (1, 9, 5)])
def test_matches_nn_linear_on_both_paths(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(5, 7, bias=bias)
    dual = DualLayoutLinear(linear)
    x = torch.randn(*shape)
    with torch.no_grad():
        got, want = dual(x), linear(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [384, 130, 1000])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
def test_blocked_product_matches_nn_linear(bias, out_features, rows):
    torch.manual_seed(0)
    linear = nn.Linear(48, out_features, bias=bias)
    dual = DualLayoutLinear(linear)
    assert dual.widths[1] == 0 and all(out_features % dual.widths[b] == 0 for b in ROW_BUCKETS[1:])
    # Every width the tuner may pick, including blocked one-row products; padded row counts.
    for width in candidate_widths(out_features):
        dual.widths = {b: width for b in ROW_BUCKETS}
        for shape in [(rows, 48), (1, rows, 48)]:
            x = torch.randn(*shape)
            with torch.no_grad():
                torch.testing.assert_close(dual(x), linear(x), rtol=1e-5, atol=1e-5)


def test_row_buckets_and_candidate_widths():
    assert [row_bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 4, 4, 4, 8, 8, 16, 16]
    assert candidate_widths(576) == [0, 32, 48, 64, 96, 144, 192, 288]
    assert candidate_widths(1000) == [0, 40, 50, 100, 125, 200, 250, 500]  # no multiple of 16 divides it
    widths = candidate_widths(49152)
    assert widths[0] == 0 and len(widths) == 8 and all(49152 % w == 0 for w in widths[1:])
    assert widths[1] == 32 and widths[-1] == 49152 // 2
    assert candidate_widths(48) == [0] and candidate_widths(64) == [0, 32]


def test_tuning_picks_candidates_caches_the_plan_and_tags_costs(monkeypatch, tmp_path):
    import dresd.cpu_linear as cpu_linear

    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path))
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    use_dual_layout(model, tune=False)
    untuned = product_plan_tag(model)
    plan = tune_products(model, reps=1)
    # One entry per weight shape: qkv group, o, gate+up group, down, head.
    assert set(plan) == {"64x128", "64x64", "64x384", "192x64", "64x300"}
    for shape, widths in plan.items():
        assert set(widths) == set(ROW_BUCKETS) and set(widths.values()) <= set(candidate_widths(int(shape.split("x")[1])))
    assert model.model.layers[1].mlp.gate_proj.siblings.widths == plan["64x384"]
    assert model.model.layers[0].mlp.down_proj.widths == plan["192x64"]
    # Read back from the cache, not measured again; refresh measures.
    monkeypatch.setattr(cpu_linear, "fastest_widths", lambda *a, **k: {b: 0 for b in ROW_BUCKETS})
    assert tune_products(model) == plan
    assert all(w == 0 for widths in tune_products(model, refresh=True).values() for w in widths.values())
    assert "" != product_plan_tag(model) != untuned  # cost models measured under other widths don't apply
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():  # the tuned widths keep the products exact
        stock = transformers.LlamaForCausalLM(config).eval()
        stock.load_state_dict(model.state_dict())
        assert product_plan_tag(stock) == ""
        torch.testing.assert_close(model(ids[:, :3]).logits, stock(ids[:, :3]).logits, rtol=1e-5, atol=1e-5)


def test_block_width_divides_and_stays_wide_enough():
    assert block_width(576) == block_width(960) == block_width(3072) == block_width(49152) == BLOCK_COLUMNS
    assert block_width(1000) == 125 and block_width(130) == 130
    # No divisor wide enough: one plain product (blocks of a few columns would be slow).
    assert block_width(7) == 0 and block_width(2 * 211) == 0


@pytest.mark.parametrize("rows", [1, 2, MAX_MATVEC_ROWS, MAX_MATVEC_ROWS + 1, 40])
def test_few_rows_use_the_input_major_copy(rows):
    linear = nn.Linear(5, 7, bias=False)
    dual = DualLayoutLinear(linear)
    dual.weight_t.zero_()  # makes the path taken visible
    with torch.no_grad():
        out = dual(torch.ones(1, rows, 5))
    assert bool((out == 0).all()) == (rows <= MAX_MATVEC_ROWS)


def test_weight_is_shared_and_copy_is_input_major():
    linear = nn.Linear(4, 6)
    dual = DualLayoutLinear(linear)
    assert dual.weight is linear.weight
    assert dual.weight_t.shape == (4, 6) and dual.weight_t.is_contiguous()
    assert torch.equal(dual.weight_t, linear.weight.t())
    # The copy is derived state: it is not saved with the model.
    assert "weight_t" not in dual.state_dict()


@pytest.mark.parametrize("sizes", [(6, 2, 3), (64, 32, 32)])  # the second runs blocked
@pytest.mark.parametrize("bias", [False, True, "mixed"])
def test_sibling_group_gives_each_member_its_own_output(bias, sizes):
    torch.manual_seed(0)
    linears = [nn.Linear(6, n, bias=(bias is True) or (bias == "mixed" and i == 0)) for i, n in enumerate(sizes)]
    members = [DualLayoutLinear(lin) for lin in linears]
    group = SiblingGroup(members)
    assert group.weight_t.shape == (6, sum(sizes))
    assert (group.widths[4] > 0) == (sum(sizes) >= 64)
    x, other = torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    with torch.no_grad():
        # In order, as attention calls q, k, v: one product serves all three.
        for m, lin in zip(members, linears):
            torch.testing.assert_close(m(x), lin(x))
        assert group._input is None and not group._pending  # nothing held afterwards
        # Out of order, repeated, and interleaved with another input: still each its own.
        for i in (2, 0, 0, 1):
            torch.testing.assert_close(members[i](x), linears[i](x))
            torch.testing.assert_close(members[1](other), linears[1](other))


def test_conversion_keeps_tied_head_and_outputs():
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        step_before = model(ids[:, :1]).logits
    assert not has_dual_layout(model)
    assert use_dual_layout(model) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + the head
    assert has_dual_layout(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(type(m) is nn.Linear for m in model.modules())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.siblings is attn.v_proj.siblings is not None
    assert mlp.gate_proj.siblings is mlp.up_proj.siblings is not None and mlp.down_proj.siblings is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids[:, :1]).logits, step_before, rtol=1e-5, atol=1e-5)
    assert use_dual_layout(model) == 0  # idempotent: nothing left to convert


def test_load_model_applies_it_on_request(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny", vocab_size=300, seed=1)
    dual = load_model(ModelConfig(path=str(folder), device="cpu"))
    stock = load_model(ModelConfig(path=str(folder), device="cpu", dual_layout=False))
    assert has_dual_layout(dual.model) and not has_dual_layout(stock.model)
    assert dual.identity == stock.identity  # same model, same datastore compatibility
    # Forward costs differ between layouts, so cached cost models must not be shared.
    assert _cost_key(dual.model, dual.device) != _cost_key(stock.model, stock.device)
    prompt = [1, 40, 41, 42, 43, 44, 45]
    spec = SpeculativeConfig(method="greedy")
    ours = SpeculativeDecoder(dual.model, dual.eos_token_id, dual.max_context, spec).generate_ids(prompt, 24)
    assert ours.token_ids == greedy_reference(stock.model, prompt, 24)[: len(ours.token_ids)]
    assert len(ours.token_ids) > 0
