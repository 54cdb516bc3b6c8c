"""dresd.model.loading in other dtypes: model.dtype resolved and honoured, the identity kept
across dtypes, the float32-only CPU fast path left out, and a model too large for its
device refused before it loads."""

from __future__ import annotations

import pytest
import torch

import dresd.model.loading as loading
from dresd.config import ModelConfig
from dresd.model.fastpath import lean_forward
from dresd.model.fastpath.cpu_linear import has_dual_layout
from dresd.model.loading import ModelTooLarge, fit_problem, load_model, resolve_dtype, weight_bytes
from tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("dtype") / "tiny-d", vocab_size=300, seed=0)


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32  # the CPU default
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("float32", cpu) == torch.float32
    if torch.cuda.is_available():
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        assert resolve_dtype("auto", torch.device("cuda")) == want
    with pytest.raises(ValueError, match="'int8' is not one of"):
        resolve_dtype("int8", cpu)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_load_keeps_identity_and_skips_fast_path(tiny_folder, dtype):
    f32 = load_model(ModelConfig(path=str(tiny_folder), device="cpu", dual_layout=True))
    half = load_model(ModelConfig(path=str(tiny_folder), device="cpu", dtype=dtype, dual_layout=True))
    assert half.dtype == dtype and f32.dtype == "float32"
    assert all(p.dtype == getattr(torch, dtype) for p in half.model.parameters())
    # The fingerprint hashes the checkpoint's rows, not the rounded ones: a store built in
    # float32 still matches the model loaded in half precision.
    rounded = f32.model.get_input_embeddings().weight[:64].to(getattr(torch, dtype)).float()
    assert not torch.equal(rounded, f32.model.get_input_embeddings().weight[:64])  # rounding does change them
    assert half.identity == f32.identity
    # The packed CPU kernel and the lean forward are float32 only: HF's forward serves half precision.
    assert has_dual_layout(f32.model) and lean_forward.applies(f32.model)
    assert not has_dual_layout(half.model) and not lean_forward.applies(half.model)
    ids = torch.tensor([[5, 9, 30, 41]])
    with torch.inference_mode():
        a, b = f32.model(ids).logits, half.model(ids).logits
    assert b.dtype == getattr(torch, dtype) and torch.allclose(a, b.float(), atol=0.2)


def test_weight_bytes_follow_the_dtype(tiny_folder):
    model = load_model(ModelConfig(path=str(tiny_folder), device="cpu", dual_layout=False)).model
    params = sum(p.numel() for p in model.parameters())
    assert weight_bytes(tiny_folder, torch.float32) == 4 * params
    assert weight_bytes(tiny_folder, torch.bfloat16) == 2 * params
    assert weight_bytes(tiny_folder.parent, torch.float32) is None  # no checkpoint there


def test_model_too_large_for_its_device_is_refused_before_loading(tiny_folder, monkeypatch):
    need = weight_bytes(tiny_folder, torch.float32)
    monkeypatch.setattr(loading, "device_memory", lambda device: need - 1)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded anyway"))
    with pytest.raises(ModelTooLarge, match=r"'tiny-d' needs .* GiB for its weights in float32 but device cpu has"):
        load_model(ModelConfig(path=str(tiny_folder), device="cpu"))


def test_fit_problem_names_sizes_and_the_way_out():
    gib = 2**30
    cuda = torch.device("cuda", 0)
    assert fit_problem("m", 10 * gib, 80 * gib, cuda, torch.bfloat16) is None
    msg = fit_problem("llama-70b", 140 * gib, 80 * gib, cuda, torch.bfloat16)
    assert "140.0 GiB" in msg and "80.0 GiB" in msg and "bfloat16" in msg and "device_map" in msg
    assert "half the bytes" not in msg  # already half precision: nothing smaller to offer
    assert "half the bytes" in fit_problem("m", 28 * gib, 24 * gib, cuda, torch.float32)
