"""A model's name resolved on a node: local folders, storage URIs fetched once into the
node's cache, the identity read without loading weights, and a node's mismatching copy
refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from tests_support import TINY_VOCAB
from tiny_models import make_tiny_llama

from dresd.config import ModelConfig
from dresd.model.loading import load_model
from dresd.model.resolve import (
    ModelIdentityMismatch,
    check_identity,
    model_facts,
    model_folder,
    resolve_model,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_facts_give_the_loaded_models_identity_without_loading_it(tiny_model_dir, monkeypatch):
    loaded = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu", dual_layout=False)).identity
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("model_facts loaded the weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    facts = model_facts(str(tiny_model_dir))
    assert facts.identity == loaded  # byte-identical fingerprint: existing stores still open
    assert facts.max_context == 2048 and facts.eos_token_id == facts.tokenizer.eos_token_id


def test_a_storage_uri_is_fetched_once_into_the_nodes_cache_and_refetched_when_replaced(tiny_model_dir, cache, tmp_path):
    remote = tmp_path / "bucket" / "tiny"
    shutil.copytree(tiny_model_dir, remote)
    uri = f"file://{remote}"
    name, folder = model_folder(uri)
    assert name == "tiny" and folder.is_relative_to(cache) and (folder / "config.json").is_file()
    assert model_folder(uri)[1] == folder  # the second resolve reuses the entry
    lm = load_model(ModelConfig(path=uri, device="cpu", dual_layout=False))
    assert lm.identity == model_facts(uri).identity == {**model_facts(str(tiny_model_dir)).identity, "name": "tiny"}
    shutil.rmtree(remote)
    make_tiny_llama(remote, vocab_size=TINY_VOCAB, seed=5, hidden_size=32)
    other = model_folder(uri)[1]
    assert other != folder and model_facts(uri).identity["hidden_size"] == 32


def test_missing_models_name_the_node_and_what_to_do(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found on storage"):
        resolve_model(f"file://{tmp_path}/nope")
    with pytest.raises(FileNotFoundError, match="every node has"):
        resolve_model(str(tmp_path / "nope"))


def test_a_node_whose_copy_differs_is_refused_naming_the_difference(tiny_model_dir, tmp_path):
    other = make_tiny_llama(tmp_path / type(tiny_model_dir).__name__, vocab_size=TINY_VOCAB, seed=9)
    a, b = model_facts(str(tiny_model_dir)).identity, model_facts(str(other)).identity
    check_identity(a, dict(a), "here")
    with pytest.raises(ModelIdentityMismatch, match="embedding actor on node x.*fingerprint"):
        check_identity(a, {**b, "name": a["name"]}, "embedding actor on node x")
    assert torch.get_default_dtype() == torch.float32


def test_the_packaged_defaults_facts_match_its_loaded_identity(packaged_lm):
    """Stores built with the packaged model before this module existed still open."""
    facts = model_facts(None)
    assert facts.identity == packaged_lm.identity and facts.name == "SmolLM2-135M-Instruct"
    assert facts.eos_token_id == packaged_lm.eos_token_id and facts.max_context == packaged_lm.max_context
