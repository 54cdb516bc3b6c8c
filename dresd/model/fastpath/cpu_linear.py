"""A CPU decode-step speed-up: linear layers that also keep their weight packed for few rows.

A decode step multiplies one to a few dozen rows (the new position, a draft tree) by every
weight of the model: it is bound by how fast the weights stream from memory, and on CPU
torch's kernels stream them well below that speed. MKL's small-M matrix product packs the
weight on every call and reaches about half its one-row bandwidth for 2 to 16 rows; its
matrix-vector path over the row-major [out, in] weight is slower still.

Here each linear also keeps its weight packed in 64-column blocks, each block one
contiguous [in, 64] stream, and a small C++ kernel (`csrc/packed_linear.cpp`, built once
per machine by torch's extension builder and cached) multiplies up to MAX_PACKED_ROWS
rows by it (MAX_CODED_ROWS for integer codes, below), reading every weight once per
product. Six rows share one pass over the weights from memory; each further six cost
about as much again in arithmetic, so past a few dozen rows MKL's product is as fast and
longer forwards (prefill, builds) use the original layout. The timings are in
docs/cpu-fast-path.md#packed-weight-copies (`benchmarks/cpu_linear_bench.py` times whole steps).

The kernel sums every output element in one fixed order, whatever the row count, so a
position's linear outputs are the same bits whether it is verified alone or in a tree.
Every decoding loop here, plain greedy included, runs on the same converted model.

Sibling projections, the linears a block applies to one input one after the other (q, k, v
in attention; gate and up in the MLP), share one packed weight: the first sibling called
runs one wider product and hands the others their slices (fewer, larger products).

A weight that is exactly 4- or 8-bit integer codes times a per-32-input float16 scale plus
an offset (a GGUF model's Q4_1 / Q8_0 weights, dequantized) is packed as those codes
(dresd.model.fastpath.weight_codes): the kernel decodes them in registers into the same float bits and
multiplies as before, reading 6 or 10 bits a weight instead of 32 (SmolLM2-135M: Q4_1
linears, a Q8_0 tied head). A one-token step then reads a fraction of the bytes, and each
further row pays its own arithmetic, which the memory stream no longer hides
(docs/cpu-fast-path.md#exact-integer-codes). Identical bits either way, so plain and
speculative decoding stay exact. The cost is one more copy of the linear weights in
memory, much smaller with codes than as float32.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dresd.model.fastpath.weight_codes import find_codes
from dresd.storage.cache import cache_root, cached_measurement
from dresd.storage.locks import file_lock

log = logging.getLogger(__name__)

# Columns per packed block (four 16-float vectors; must match COLS in the kernel).
PACK_COLUMNS = 64
# Rows per weight pass (the kernel's ROWS); trades registers against weight reads; docs/cpu-fast-path.md#packed-weight-copies.
ROWS_PER_PASS = 6
# Float32 copies' row limit; trades one weight read against MKL's arithmetic; docs/cpu-fast-path.md#packed-weight-copies.
MAX_PACKED_ROWS = 16
# Coded copies' row limit (they read far less); the same trade; docs/cpu-fast-path.md#exact-integer-codes.
MAX_CODED_ROWS = 40
# Children of one module that consume the same input in this order (Llama, Mistral, Qwen2).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
KERNEL_SOURCE = Path(__file__).parent / "csrc" / "packed_linear.cpp"
# -march=native: the build is for this CPU, so the cache name includes the CPU model.
KERNEL_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast"]
# How long a process waits for another's build of the kernel before running stock linears
# instead: a build ends well within it, so a longer wait means a hung builder, and slower
# decoding beats none.
KERNEL_BUILD_WAIT_S = 300.0
# dresd's build lock in the extension's build folder: an flock (dresd.storage.locks).
BUILD_LOCK = "dresd-build.lock"
# torch's own build lock there (torch.utils.file_baton): a plain file that outlives its builder.
TORCH_LOCK = "lock"
# Rows the kernel is timed on against torch's linear before a model is converted: a
# one-token step and a small draft tree, the forwards the packed copies are for.
CHECK_ROWS = (1, 4)
# Timed repetitions per row count and layout (the fastest counts: the check shares the machine).
CHECK_REPS = 15


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "cpu")
    except OSError:
        return os.uname().machine


@functools.cache
def kernel_tag() -> str:
    """A digest of the kernel's source, build flags, CPU model and torch version: the build's
    cache name, and part of cached cost models' keys (forward costs depend on the kernel)."""
    key = "|".join([KERNEL_SOURCE.read_text(), *KERNEL_FLAGS, _cpu_name(), torch.__version__])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@functools.cache
def packed_kernel():
    """The compiled kernel module, or None where it cannot be built here (no C++ compiler):
    linears then stay stock. Built on first use into torch's extension cache
    ($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), where every later process on
    this machine finds it; concurrent first uses take turns on a build lock (load_kernel)."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the venv's ninja, when the venv is not activated
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    name = f"dresd_packed_linear_{kernel_tag()}"
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, False))
        return load_kernel(build_dir, name, KERNEL_BUILD_WAIT_S, lambda: cpp_extension.load(
            name=name, sources=[str(KERNEL_SOURCE)], extra_cflags=KERNEL_FLAGS, verbose=False))
    except Exception as exc:  # no compiler or ninja, or a hung builder: slower, never wrong
        log.warning("dresd: packed CPU linear kernel unavailable (%s); decoding uses torch's linear layers", exc)
        return None


def load_kernel(build_dir: Path, name: str, wait_s: float, load):
    """`load()` (torch's build-and-import of extension `name`) under dresd's build lock in
    `build_dir`; LockTimeout when another process holds that lock for over `wait_s` seconds.

    Every dresd process builds or loads the kernel holding this lock, and the kernel drops
    it when its holder dies. So torch's own lock file, found while holding it, belongs to no
    live build: a build killed midway left it, and torch would wait on it forever. It is
    removed, with a warning, and the build runs again.
    """
    with file_lock(build_dir / BUILD_LOCK, wait_s, f"building the packed CPU linear kernel {name}"):
        stale = build_dir / TORCH_LOCK
        if stale.exists():
            log.warning("dresd: removing %s, left by a kernel build that did not finish; building again", stale)
            stale.unlink(missing_ok=True)
        if not (build_dir / f"{name}.so").exists():
            # A first load on a fresh machine would otherwise sit silent through the build.
            log.warning("dresd: building the packed CPU linear kernel for this machine (once, ~25 s)")
        return load()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] weight (or codes, scales: any dtype) -> [blocks, in, PACK_COLUMNS]: block b
    holds output columns b*64 .. b*64+63 input-major, zero-padded past out_features."""
    out_features, in_features = weight.shape
    blocks = -(-out_features // PACK_COLUMNS)
    padded = weight.detach().new_zeros(blocks * PACK_COLUMNS, in_features)
    padded[:out_features] = weight.detach()
    return padded.view(blocks, PACK_COLUMNS, in_features).transpose(1, 2).contiguous()


@dataclass
class PackedWeight:
    """A weight in the kernel's layout: float32 blocks, or its exact codes (dresd.model.fastpath.weight_codes)."""

    out_features: int
    # bits 32: float32 [blocks, in, 64] (pack_weight); 8: int8 codes as uint8 [blocks, in, 64];
    # 4: [blocks, in, 32] uint8, byte j holding column j's code low and column j + 32's high.
    values: torch.Tensor
    scale: torch.Tensor | None = None  # codes only: float32 [blocks, in / GROUP, 64]
    offset: torch.Tensor | None = None  # codes only: float32 [blocks, in / GROUP, 64]
    bits: int = 32

    @property
    def max_rows(self) -> int:
        """Most rows a product should run on this copy (more run faster on the original layout)."""
        return MAX_PACKED_ROWS if self.bits == 32 else MAX_CODED_ROWS

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.scale, self.offset) if t is not None)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] @ weight.T."""
        if self.bits == 32:
            return packed_kernel().packed_matmul(x, self.values, self.out_features)
        return packed_kernel().coded_matmul(x, self.values, self.scale, self.offset, self.out_features, self.bits)


def pack(weight: torch.Tensor, codes: bool = True) -> PackedWeight:
    """Pack an [out, in] float32 weight for the kernel: as exact 4- or 8-bit codes where the
    weight has them (and `codes`), else as float32 blocks. Same product bits either way."""
    found = find_codes(weight) if codes else None
    if found is None:
        return PackedWeight(weight.shape[0], pack_weight(weight))
    blocked = pack_weight(found.codes.to(torch.int8 if found.bits == 8 else torch.uint8)).view(torch.uint8)
    if found.bits == 4:
        half = PACK_COLUMNS // 2
        blocked = blocked[..., :half] | (blocked[..., half:] << 4)
    return PackedWeight(weight.shape[0], blocked.contiguous(), pack_weight(found.scale), pack_weight(found.offset),
                        found.bits)


def packed_product(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight.T (+ bias) with the weight as `pack` left it."""
    flat = x.reshape(-1, x.shape[-1])
    y = packed.product(flat).reshape(*x.shape[:-1], packed.out_features)
    return y if bias is None else y + bias


class DualLayoutLinear(nn.Module):
    """`nn.Linear` with an extra packed copy of its weight for forwards over few rows."""

    def __init__(self, linear: nn.Linear, codes: bool = True, packed: bool = True):
        super().__init__()
        # The original parameter is shared, not copied: a tied LM head stays tied to the
        # embedding, and code that reads `.weight` sees the model's own tensor.
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Derived state, rebuilt at conversion: not a parameter or buffer, never saved.
        # packed=False: a SiblingGroup is about to pack this weight with its siblings'.
        self.packed: PackedWeight | None = pack(linear.weight, codes) if packed else None
        self.siblings: SiblingGroup | None = None  # set by SiblingGroup
        self.sibling_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.siblings.packed if self.siblings is not None else self.packed
        if x.numel() > packed.max_rows * self.in_features or x.dtype != torch.float32:
            return nn.functional.linear(x, self.weight, self.bias)
        if self.siblings is not None:
            return self.siblings.output(self.sibling_index, x)
        return packed_product(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class SiblingGroup:
    """Linears applied to one input in turn, sharing one packed weight.

    The first member called with an input computes every member's output in one product;
    the others then take theirs. A member called with another input (or twice) computes
    afresh, so the result never depends on call order, only the speed does.
    """

    def __init__(self, members: list[DualLayoutLinear], codes: bool = True):
        self.packed = pack(torch.cat([m.weight.detach() for m in members]), codes)
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(m.out_features, dtype=torch.float32)
             for m, b in zip(members, biases)])
        self.sizes = [m.out_features for m in members]
        self._input: torch.Tensor | None = None  # the input the pending outputs belong to
        self._pending: dict[int, torch.Tensor] = {}
        for i, m in enumerate(members):
            m.packed = None  # the group's packed weight serves every member
            m.siblings, m.sibling_index = self, i

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output for input `x`."""
        if self._input is not x or index not in self._pending:
            y = packed_product(x, self.packed, self.bias)
            self._pending = dict(enumerate(y.split(self.sizes, dim=-1)))
            self._input = x
        out = self._pending.pop(index)
        if not self._pending:
            self._input = None  # holds no tensor once every member has taken its output
        return out


def _fastest_s(fn, reps: int) -> float:
    fn()  # warm: first calls page in and fill caches
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_layouts(weight: torch.Tensor, codes: bool = True, rows: tuple[int, ...] = CHECK_ROWS,
                 reps: int = CHECK_REPS) -> dict:
    """Seconds the kernel and torch's linear take to multiply `rows` rows by `weight` here
    (the fastest of `reps`, summed over the row counts), and the bits the kernel read."""
    packed = pack(weight.detach().float(), codes)
    inputs = [torch.randn(r, weight.shape[1], generator=torch.Generator().manual_seed(r)) for r in rows]
    with torch.inference_mode():
        kernel = sum(_fastest_s(lambda x=x: packed.product(x), reps) for x in inputs)
        stock = sum(_fastest_s(lambda x=x: nn.functional.linear(x, weight), reps) for x in inputs)
    return {"kernel_s": kernel, "stock_s": stock, "bits": packed.bits}


def dual_layout_pays(model: nn.Module, codes: bool = True, refresh: bool = False) -> bool:
    """Whether the packed kernel multiplies few rows faster than torch's linear layers on this
    CPU, timed on the model's largest layer weight (the LM head aside) once per kernel build,
    weight shape, code width and thread count, and cached. Its register blocking is sized for
    AVX-512's 32 vector registers: on a CPU with 16 (AVX2), it can run slower than torch."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or packed_kernel() is None:
        return False  # models use_dual_layout leaves alone: nothing to time
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    if not linears:
        return True
    weight = max(linears, key=lambda m: m.weight.numel()).weight
    bits = 32 if not codes or (found := find_codes(weight.detach())) is None else found.bits
    key = f"{kernel_tag()}|{tuple(weight.shape)}|bits{bits}|threads={torch.get_num_threads()}|rows{CHECK_ROWS}"
    path = cache_root() / "layout-check" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    first = refresh or not path.exists()
    times = cached_measurement(path, key, lambda: time_layouts(weight, codes), refresh)
    pays = times["kernel_s"] < times["stock_s"]
    if not pays:  # said once per machine, when measured; later loads read the verdict
        log.log(logging.WARNING if first else logging.INFO,
                "dresd: the packed CPU linear kernel is slower than torch's linear layers on this CPU (%.2f against "
                "%.2f ms on a %s weight): decoding uses torch's layers (model.dual_layout=true forces the kernel)",
                1e3 * times["kernel_s"], 1e3 * times["stock_s"], "x".join(map(str, weight.shape)))
    return pays


def use_dual_layout(model: nn.Module, codes: bool = True) -> int:
    """Replace every `nn.Linear` of a float32 CPU model by a `DualLayoutLinear`; returns how many.

    Models on other devices or in other dtypes are left alone (GPU kernels have no such
    gap), as are all models where the kernel cannot be built; 0 is returned. Convert a model
    where it will run, after any edit of its weights: the packed copies are taken now.
    `codes=False` packs every weight as float32 even where exact codes exist (for A/B runs).
    """
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or packed_kernel() is None:
        return 0
    converted = 0
    for module in list(model.modules()):
        children = dict(module.named_children())
        groups = [names for names in SIBLINGS if all(type(children.get(n)) is nn.Linear for n in names)
                  and len({children[n].in_features for n in names}) == 1]
        grouped = {n for names in groups for n in names}
        for name, child in children.items():
            if type(child) is nn.Linear:
                # Siblings are packed once, together, not each on its own first.
                setattr(module, name, DualLayoutLinear(child, codes, packed=name not in grouped))
                converted += 1
        for names in groups:
            SiblingGroup([getattr(module, n) for n in names], codes)
    return converted


def has_dual_layout(model: nn.Module) -> bool:
    """Whether `use_dual_layout` converted this model (forward costs differ, so cost caches key on it)."""
    return any(isinstance(m, DualLayoutLinear) for m in model.modules())


def _packed_copies(model: nn.Module) -> list[PackedWeight]:
    copies = {id(p): p for m in model.modules() if isinstance(m, DualLayoutLinear)
              for p in (m.packed, m.siblings.packed if m.siblings else None) if p is not None}
    return list(copies.values())


def packed_bytes(model: nn.Module) -> int:
    """Memory the packed copies of a converted model take (sibling groups included)."""
    return sum(p.nbytes for p in _packed_copies(model))


def packed_formats(model: nn.Module) -> str:
    """The bit widths the packed copies use, e.g. "4+8" (codes) or "32" (float32); "" if none."""
    return "+".join(str(b) for b in sorted({p.bits for p in _packed_copies(model)}))
