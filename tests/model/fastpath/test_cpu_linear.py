"""Tests for dresd.model.fastpath.cpu_linear: the packed linear computes what nn.Linear computes on both of
its paths, a row's result does not depend on the rows it shares a call with, conversion
keeps tied weights tied, load_model applies it only when asked, and greedy decoding on a
converted model matches the stock model's."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

import dresd.model.fastpath.cpu_linear as cpu_linear
from dresd.decoding.calibration import _cost_key
from dresd.config import ModelConfig, SpeculativeConfig
from dresd.model.fastpath.cpu_linear import (
    MAX_CODED_ROWS, MAX_PACKED_ROWS, PACK_COLUMNS, DualLayoutLinear, SiblingGroup, has_dual_layout, pack, pack_weight, packed_bytes,
    packed_formats, packed_product, use_dual_layout,
)
from dresd.decoding.loop import SpeculativeDecoder
from dresd.model.loading import load_model
from tiny_models import make_tiny_llama
from tests_support import coded_weight, greedy_reference


def test_pack_weight_layout():
    weight = torch.arange(130 * 5, dtype=torch.float32).reshape(130, 5)
    packed = pack_weight(weight)
    assert packed.shape == (3, 5, PACK_COLUMNS) and packed.is_contiguous()
    for b, k, c in [(0, 0, 0), (0, 4, 63), (1, 2, 10), (2, 3, 1)]:
        assert packed[b, k, c] == weight[b * PACK_COLUMNS + c, k]
    assert not packed[2, :, 2:].any()  # columns past out_features are zero


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5,), (1, 5), (2, 5), (3, 5), (7, 5), (2, 3, 5), (1, 9, 5), (1, 40, 5)])
def test_matches_nn_linear_on_both_paths(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(5, 7, bias=bias)
    dual = DualLayoutLinear(linear)
    x = torch.randn(*shape)
    with torch.no_grad():
        got, want = dual(x), linear(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_features", [64, 130, 1000])
@pytest.mark.parametrize("in_features", [48, 200])  # 200 spans several input chunks
def test_packed_product_matches_and_rows_are_independent(out_features, in_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    dual = DualLayoutLinear(linear)
    x = torch.randn(MAX_PACKED_ROWS, in_features)
    with torch.no_grad():
        together = dual(x)
        torch.testing.assert_close(together, linear(x), rtol=1e-5, atol=1e-5)
        # The same bits whatever rows share the call (a tree's position vs a one-token step)
        # and however many threads split the columns.
        for start, stop in [(0, 1), (3, 4), (0, 5), (2, 9), (6, 13), (15, 16)]:
            assert torch.equal(dual(x[start:stop]), together[start:stop])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(dual(x), together)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out_features,in_features", [(64, 32), (130, 96), (200, 576), (7, 1536)])
def test_coded_weights_give_the_float_products_bits(bits, out_features, in_features):
    weight = coded_weight(out_features, in_features, bits, seed=out_features)
    coded, plain = pack(weight), pack(weight, codes=False)
    assert (coded.bits, plain.bits) == (bits, 32)
    # 4 or 8 bits a weight plus a float32 scale and offset per 32: 6 or 10 bits of 32.
    assert coded.nbytes == plain.nbytes * (bits + 2) // 32
    x = torch.randn(MAX_CODED_ROWS, in_features, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(out_features)
    want = packed_product(x, plain, bias)
    torch.testing.assert_close(want, x @ weight.T + bias, rtol=1e-5, atol=1e-4)
    # Every row count (one pass of up to six rows, then several) and any rows sharing the
    # call: the float kernel's exact bits, since the codes decode to the exact weights.
    for start, stop in [(0, 16), (0, 1), (3, 5), (0, 6), (2, 9), (1, 13), (15, 16), (7, 40)]:
        assert torch.equal(packed_product(x[start:stop], coded, bias), want[start:stop])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(packed_product(x, coded, bias), want)
    finally:
        torch.set_num_threads(threads)


def test_a_coded_tiny_model_decodes_like_its_float_packed_copy():
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    models = []
    for codes in (True, False, None):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():  # GGUF-like weights: Q4_1 linears, a Q8_0 embedding / tied head
            for i, (name, param) in enumerate(model.named_parameters()):
                if param.dim() == 2:
                    param.copy_(coded_weight(*param.shape, 8 if "embed" in name else 4, seed=i))
        if codes is not None:
            use_dual_layout(model, codes=codes)
        models.append(model)
    coded, plain, stock = models
    assert packed_formats(coded) == "4+8" and packed_formats(plain) == "32" and packed_formats(stock) == ""
    assert packed_bytes(coded) < 0.35 * packed_bytes(plain)
    # Cost models calibrated on one layout must not serve the other.
    assert _cost_key(coded, torch.device("cpu")) != _cost_key(plain, torch.device("cpu"))
    prompt = [1, 40, 41, 42, 43, 44, 45]
    spec = SpeculativeConfig(method="greedy")
    runs = [SpeculativeDecoder(m, None, 2048, spec).generate_ids(prompt, 24).token_ids for m in (coded, plain)]
    assert runs[0] == runs[1] and len(runs[0]) == 24
    assert runs[0] == greedy_reference(stock, prompt, 24)


@pytest.mark.parametrize("rows", [1, 2, MAX_PACKED_ROWS, MAX_PACKED_ROWS + 1, MAX_CODED_ROWS, MAX_CODED_ROWS + 1])
@pytest.mark.parametrize("codes", [False, True])
def test_few_rows_use_the_packed_copy(rows, codes):
    linear = nn.Linear(64, 7, bias=False)
    with torch.no_grad():
        linear.weight.copy_(coded_weight(7, 64, 4))
    dual = DualLayoutLinear(linear, codes=codes)
    assert dual.packed.bits == (4 if codes else 32)
    # Zeroed scales and offsets (codes) or weights (float32) make the path taken visible.
    (dual.packed.scale if codes else dual.packed.values).zero_()
    if codes:
        dual.packed.offset.zero_()
    with torch.no_grad():
        out = dual(torch.ones(1, rows, 64))
    assert bool((out == 0).all()) == (rows <= (MAX_CODED_ROWS if codes else MAX_PACKED_ROWS))


def test_weight_is_shared_and_the_copy_is_not_saved():
    linear = nn.Linear(4, 6)
    dual = DualLayoutLinear(linear)
    assert dual.weight is linear.weight
    assert torch.equal(dual.packed.values, pack_weight(linear.weight)) and dual.packed.bits == 32
    assert "packed" not in dual.state_dict()  # derived state, not saved with the model


@pytest.mark.parametrize("sizes", [(6, 2, 3), (64, 32, 32)])
@pytest.mark.parametrize("bias", [False, True, "mixed"])
def test_sibling_group_gives_each_member_its_own_output(bias, sizes):
    torch.manual_seed(0)
    linears = [nn.Linear(6, n, bias=(bias is True) or (bias == "mixed" and i == 0)) for i, n in enumerate(sizes)]
    members = [DualLayoutLinear(lin) for lin in linears]
    group = SiblingGroup(members)
    assert group.packed.values.shape == (-(-sum(sizes) // PACK_COLUMNS), 6, PACK_COLUMNS)
    assert all(m.packed is None for m in members)  # one packed copy for the group
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
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear)
    assert use_dual_layout(model) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + the head
    assert has_dual_layout(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(type(m) is nn.Linear for m in model.modules())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.siblings is attn.v_proj.siblings is not None
    assert mlp.gate_proj.siblings is mlp.up_proj.siblings is not None and mlp.down_proj.siblings is None
    # One packed copy of every linear weight, padded to whole 64-column blocks.
    assert linear_bytes <= packed_bytes(model) < 1.5 * linear_bytes
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids[:, :1]).logits, step_before, rtol=1e-5, atol=1e-5)
    assert use_dual_layout(model) == 0  # idempotent: nothing left to convert


def test_models_it_cannot_serve_stay_stock(monkeypatch):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    half = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    assert use_dual_layout(half) == 0 and not has_dual_layout(half)
    # No compiler here: the kernel is unavailable and decoding runs torch's layers.
    monkeypatch.setattr(cpu_linear, "packed_kernel", lambda: None)
    model = transformers.LlamaForCausalLM(config)
    assert use_dual_layout(model) == 0 and not has_dual_layout(model)


def test_a_first_build_says_so_and_a_failed_one_falls_back(monkeypatch, tmp_path, caplog):
    from torch.utils import cpp_extension

    built = cpu_linear.packed_kernel()
    assert built is not None  # this machine has a compiler: the rest of the suite relies on it
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: nothing built yet

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    cpu_linear.packed_kernel.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="dresd.model.fastpath.cpu_linear"):
            assert cpu_linear.packed_kernel() is None
    finally:
        cpu_linear.packed_kernel.cache_clear()
    messages = [r.getMessage() for r in caplog.records]
    assert any("building the packed CPU linear kernel" in m for m in messages)
    assert any("unavailable (no C++ compiler)" in m for m in messages)


def test_load_model_applies_it_on_request(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny", vocab_size=300, seed=1)
    dual = load_model(ModelConfig(path=str(folder), device="cpu", dual_layout=True))
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


@pytest.mark.real_model
def test_the_packaged_model_runs_on_its_codes_with_the_same_bits(packaged_lm_packed):
    """SmolLM2-135M comes from a Q4_1 GGUF (Q8_0 embedding): every packed weight gets codes,
    and decode steps give the float-packed model's exact hidden states and logits."""
    from dresd.decoding.kv_cache import GrowingCache
    from dresd.decoding.tree import build_tree, tree_attention_mask, tree_position_ids
    from dresd.decoding.verify import forward

    packaged_lm = packaged_lm_packed
    coded = packaged_lm.model
    plain = load_model(ModelConfig(weight_codes=False, dual_layout=True)).model
    assert packed_formats(coded) == "4+8" and packed_formats(plain) == "32"
    assert packed_bytes(coded) < 0.25 * packed_bytes(plain)
    prefix = torch.tensor([packaged_lm.tokenizer.encode("The capital of France is Paris, and the capital of")])
    tree = build_tree(11, [[12, 13, 14], [12, 15], [16]])
    outs = []
    for model in (coded, plain):
        cache = GrowingCache()
        forward(model, prefix, cache, logits=False)
        one = forward(model, torch.tensor([[11]]), cache)
        cache.crop(-1)
        n = prefix.shape[1]
        many = forward(model, torch.tensor([tree.tokens]), cache, tree_position_ids(tree, n, "cpu"),
                       tree_attention_mask(tree, n, model.dtype, "cpu"))
        outs.append((one, many))
    for (h1, l1), (h2, l2) in zip(*outs):
        assert torch.equal(h1, h2) and torch.equal(l1, l2)


def test_the_layout_check_times_both_layouts_once_per_machine_and_weight(tmp_path, monkeypatch):
    """"auto" converts a model only where the kernel measured faster than torch's linear:
    the timing is real, taken once per weight shape and code width, and read back after."""
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    pays = cpu_linear.dual_layout_pays(model)
    record = next((tmp_path / "cache" / "layout-check").glob("*.json"))
    times = json.loads(record.read_text())["value"]
    assert times["kernel_s"] > 0 and times["stock_s"] > 0 and times["bits"] == 32
    assert pays == (times["kernel_s"] < times["stock_s"])

    def measured_again(*args, **kwargs):
        raise AssertionError("the cached verdict should be read back")

    monkeypatch.setattr(cpu_linear, "time_layouts", measured_again)
    assert cpu_linear.dual_layout_pays(model) == pays


@pytest.mark.parametrize("kernel_faster", [True, False])
def test_auto_keeps_torchs_layers_where_the_kernel_is_slower(tmp_path, monkeypatch, caplog, kernel_faster):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    folder = make_tiny_llama(tmp_path / "tiny", vocab_size=300, seed=1)
    # This machine's real timings, with the kernel's replaced by one faster or slower than torch's.
    real = cpu_linear.time_layouts
    monkeypatch.setattr(cpu_linear, "time_layouts", lambda *a, **k: {
        **(t := real(*a, **k)), "kernel_s": t["stock_s"] * (0.5 if kernel_faster else 2.0)})
    with caplog.at_level("INFO", logger="dresd.model.fastpath.cpu_linear"):
        first = load_model(ModelConfig(path=str(folder), device="cpu"))
        again = load_model(ModelConfig(path=str(folder), device="cpu"))
    assert has_dual_layout(first.model) == has_dual_layout(again.model) == kernel_faster
    said = [r for r in caplog.records if "slower than torch's linear layers" in r.getMessage()]
    # Said as a warning when measured, then quietly at each load that reads the verdict.
    assert [r.levelname for r in said] == ([] if kernel_faster else ["WARNING", "INFO"])
    forced = load_model(ModelConfig(path=str(folder), device="cpu", dual_layout=True))
    assert has_dual_layout(forced.model)
