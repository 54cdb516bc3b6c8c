"""A model's name, resolved on the node that needs it, and what a driver learns about the
model without loading its weights.

A job carries the model as `ModelConfig.path` names it, never a folder of the driver's own
cache: None (the packaged default, its GGUF converted once on each node), a storage URI of
an HF folder or a .gguf file (fetched once on each node into its cache), or a local path
that every node has. Each node resolves the name itself, under the cache entry's lock
(dresd.storage.cache.ensure_cached), and checks that what it found is the model the driver
saw (`check_identity`): two nodes whose copies at one path differ must not build one
datastore from two models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dresd.model.loading import (
    DEFAULT_GGUF_FILE,
    DEFAULT_MODEL_NAME,
    checkpoint_embedding_rows,
    convert_gguf,
    gguf_cache_dir,
    model_identity,
    packaged_default_dir,
)
from dresd.storage.cache import fetch_once
from dresd.storage.files import is_uri


class ModelIdentityMismatch(RuntimeError):
    """A node's copy of the job's model is another model than the one the driver saw."""


def resolve_model(path: str | None) -> tuple[str, Path]:
    """(model name, local path: an HF folder or a .gguf file) of a model name on this node."""
    if path is None:
        return DEFAULT_MODEL_NAME, packaged_default_dir() / DEFAULT_GGUF_FILE
    local = fetch_once(path) if is_uri(path) else Path(path).expanduser()
    if not local.exists():
        raise FileNotFoundError(
            f"model path does not exist on this node: {local} (expected a Hugging Face model folder or a .gguf "
            "file; on a cluster, name the model by a storage URI or a path every node has)")
    if local.is_dir():
        return local.resolve().name, local
    if local.suffix.lower() == ".gguf":
        return local.stem, local
    raise ValueError(f"model path {local} is neither a folder nor a .gguf file")


def model_folder(path: str | None) -> tuple[str, Path]:
    """(model name, HF folder) on this node: a .gguf is converted once into this node's cache."""
    name, local = resolve_model(path)
    if local.is_dir():
        return name, local
    return name, convert_gguf(local, gguf_cache_dir(local))


@dataclass
class ModelFacts:
    """What a job's driver needs of its model: identity and tokenizer, no weights."""

    name: str
    folder: Path  # this node's HF folder of the model
    identity: dict  # as dresd.model.loading.model_identity gives it for the loaded model
    tokenizer: transformers.PreTrainedTokenizerBase
    max_context: int  # config.max_position_embeddings

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer of {self.name!r} defines no eos token")
        return int(eos)


def model_facts(path: str | None) -> ModelFacts:
    """Identity and tokenizer of the model named `path`, read from its config and the
    checkpoint's first embedding rows; the weights are not loaded (a checkpoint without
    .safetensors files is the exception: it is loaded once to fingerprint it)."""
    name, folder = model_folder(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):  # parameter names and shapes only: nothing is allocated
        skeleton = AutoModelForCausalLM.from_config(config)
    rows = checkpoint_embedding_rows(folder, skeleton)
    if rows is None:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        identity = model_identity(model, name)
        del model
    else:
        identity = model_identity(skeleton, name, rows)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return ModelFacts(name, folder, identity, tokenizer, int(config.max_position_embeddings))


def check_identity(expected: dict, actual: dict, where: str) -> None:
    """Refuse a node's model whose identity is not the one the job was planned with."""
    if expected == actual:
        return
    diff = {k: (expected.get(k), actual.get(k)) for k in sorted(set(expected) | set(actual))
            if expected.get(k) != actual.get(k)}
    raise ModelIdentityMismatch(
        f"{where}: this node's copy of the model is not the one the job's driver saw (differences, driver vs "
        f"node: {diff}); give every node the same model, e.g. by a storage URI or the packaged default")
