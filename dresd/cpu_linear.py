"""A CPU decode-step speed-up: linear layers that also keep their weight input-major.

On CPU, torch's `nn.Linear` multiplies by a row-major [out, in] weight. For a forward over
one position (a plain decode step) MKL's matrix-vector path over that layout streams the
weights markedly slower than over the transposed, input-major [in, out] layout: measured
on this project's 2-core machine with SmolLM2-135M, a one-token forward takes 44 ms
instead of 55 ms (`benchmarks/cpu_linear_bench.py`). For 2 to 16 positions (draft trees)
MKL's small-M matrix product reaches about half its one-row bandwidth on either layout;
the same product as a batch over column blocks of the input-major copy runs near one-row
speed (`_product`). From 17 positions on the original layout is used. The cost is one more
copy of the linear weights in memory (540 MB for the 135M model in fp32).

Two more measured effects shape the small products (`tune_products` picks per machine):
- the best block width depends on the weight's shape and the row count (a 3072-column
  weight streams fastest in 1536-column blocks for one row, in 96-column blocks for four);
- MKL's kernels for 4, 8 and 16 rows beat those for 2-3, 5-7 and 9-15 rows, so a product
  over r rows runs over the next row bucket, padded with zero rows (a 3-position
  verification costs what a 4-position one does, ~13% less than unpadded).

Sibling projections, the linears a block applies to one input one after the other (q, k, v
in attention; gate and up in the MLP), share one concatenated input-major copy: the first
sibling called runs one wider product and hands the others their slices. Fewer, larger
products stream the weights faster (7 -> 4 per layer; ~5 ms of a 50 ms step here).

Both layouts compute the same products in a different summation order, so results agree to
float rounding, as any two matrix kernels do; every decoding loop here (plain greedy
included) runs on the same converted model, which is what keeps speculative output
token-identical to greedy.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time

import torch
from torch import nn

# A product over r rows runs over the smallest bucket >= r rows (zero rows added); the
# last bucket is the most rows the input-major copy serves (at 32 rows the original layout
# is as fast).
ROW_BUCKETS = (1, 4, 8, 16)
MAX_MATVEC_ROWS = ROW_BUCKETS[-1]
# Default block width (before tuning) of multi-row products: the widest divisor of
# out_features up to this.
BLOCK_COLUMNS = 192
# Children of one module that consume the same input in this order (Llama, Mistral, Qwen2).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def block_width(out_features: int) -> int:
    """Columns per block: the widest divisor of out_features up to BLOCK_COLUMNS (0 = no blocking)."""
    width = next(w for w in range(min(BLOCK_COLUMNS, out_features), 0, -1) if out_features % w == 0)
    return width if width >= BLOCK_COLUMNS // 3 else 0


def default_widths(out_features: int) -> dict[int, int]:
    """Block width per row bucket before tuning: one plain product for one row, blocks above."""
    return {b: 0 if b == 1 else block_width(out_features) for b in ROW_BUCKETS}


def row_bucket(rows: int) -> int:
    """The row count a product over `rows` rows runs at (rows <= MAX_MATVEC_ROWS)."""
    return next(b for b in ROW_BUCKETS if b >= rows)


def blocked_matmul(x: torch.Tensor, weight_t: torch.Tensor, width: int) -> torch.Tensor:
    """x [rows, in] @ weight_t [in, out] as one batched product over [in, width] column
    blocks of weight_t (strided views, no copy); width 0 = one plain product."""
    if width == 0 or width >= weight_t.shape[1]:
        return x @ weight_t
    d_in, d_out = weight_t.shape
    blocks = weight_t.view(d_in, d_out // width, width).transpose(0, 1)
    return torch.matmul(x, blocks).transpose(0, 1).reshape(len(x), d_out)


def _product(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
             widths: dict[int, int]) -> torch.Tensor:
    """x @ weight_t (+ bias) over x's rows padded to their bucket, with the bucket's block width."""
    d_in, d_out = weight_t.shape
    rows = x.numel() // d_in
    bucket = row_bucket(rows)
    flat = x.reshape(rows, d_in)
    if bucket > rows:
        flat = torch.cat([flat, flat.new_zeros(bucket - rows, d_in)])
    y = blocked_matmul(flat, weight_t, widths.get(bucket, 0))[:rows].reshape(*x.shape[:-1], d_out)
    return y if bias is None else y + bias


class DualLayoutLinear(nn.Module):
    """`nn.Linear` with an extra input-major copy of its weight for forwards over few rows."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        # The original parameter is shared, not copied: a tied LM head stays tied to the
        # embedding, and code that reads `.weight` sees the model's own tensor.
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)
        self.widths = default_widths(self.out_features)  # block width per row bucket (tune_products)
        self.siblings: SiblingGroup | None = None  # set by SiblingGroup
        self.sibling_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > MAX_MATVEC_ROWS * self.in_features:
            return nn.functional.linear(x, self.weight, self.bias)
        if self.siblings is not None:
            return self.siblings.output(self.sibling_index, x)
        return _product(x, self.weight_t, self.bias, self.widths)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class SiblingGroup:
    """Linears applied to one input in turn, sharing one concatenated input-major weight.

    The first member called with an input computes every member's output in one product;
    the others then take theirs. A member called with another input (or twice) computes
    afresh, so the result never depends on call order, only the speed does.
    """

    def __init__(self, members: list[DualLayoutLinear]):
        self.weight_t = torch.cat([m.weight_t for m in members], dim=1)
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(m.out_features, dtype=self.weight_t.dtype)
             for m, b in zip(members, biases)])
        self.sizes = [m.out_features for m in members]
        self.widths = default_widths(sum(self.sizes))
        self._input: torch.Tensor | None = None  # the input the pending outputs belong to
        self._pending: dict[int, torch.Tensor] = {}
        start = 0
        for i, m in enumerate(members):
            # A view into the shared copy: no second input-major copy per member.
            m.weight_t = self.weight_t[:, start:start + m.out_features]
            m.siblings, m.sibling_index = self, i
            start += m.out_features

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output for input `x`."""
        if self._input is not x or index not in self._pending:
            y = _product(x, self.weight_t, self.bias, self.widths)
            self._pending = dict(enumerate(y.split(self.sizes, dim=-1)))
            self._input = x
        out = self._pending.pop(index)
        if not self._pending:
            self._input = None  # holds no tensor once every member has taken its output
        return out


def use_dual_layout(model: nn.Module, tune: bool = True) -> int:
    """Replace every `nn.Linear` of a CPU model by a `DualLayoutLinear`; returns how many.

    With `tune` the small products then get the block widths measured fastest here
    (`tune_products`, cached). Models on other devices are left alone (GPU kernels have no
    such gap) and 0 is returned. Convert a model where it will run, after any edit of its
    weights: the copies are taken now, and the shared sibling copies do not follow `model.to()`.
    """
    if next(model.parameters()).device.type != "cpu":
        return 0
    converted = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, DualLayoutLinear(child))
                converted += 1
        for names in SIBLINGS:
            members = [getattr(module, n, None) for n in names]
            if (all(isinstance(m, DualLayoutLinear) and m.siblings is None for m in members)
                    and len({m.in_features for m in members}) == 1):
                SiblingGroup(members)
    if converted and tune:
        tune_products(model)
    return converted


def has_dual_layout(model: nn.Module) -> bool:
    """Whether `use_dual_layout` converted this model (forward costs differ, so cost caches key on it)."""
    return any(isinstance(m, DualLayoutLinear) for m in model.modules())


# ----------------------------------------------------------------------------- tuning


def candidate_widths(out_features: int, most: int = 8) -> list[int]:
    """0 (one plain product) and at most `most` - 1 divisors of out_features from 32 to
    out_features / 2, spread over that range; multiples of 16 (whole SIMD registers) if any."""
    divisors = [w for w in range(32, out_features // 2 + 1) if out_features % w == 0]
    divisors = [w for w in divisors if w % 16 == 0] or divisors
    if len(divisors) > most - 1:
        picks = sorted({round(i * (len(divisors) - 1) / (most - 2)) for i in range(most - 1)})
        divisors = [divisors[i] for i in picks]
    return [0] + divisors


def _median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def fastest_widths(weights: list[torch.Tensor], reps: int = 3) -> dict[int, int]:
    """Per row bucket, the block width whose products with every one of `weights` (input-major,
    one shape) run fastest here: all of them, so they stream from memory as in a forward."""
    d_in, d_out = weights[0].shape
    best = {}
    for bucket in ROW_BUCKETS:
        x = torch.randn(bucket, d_in, dtype=weights[0].dtype)
        seconds = {w: _median_seconds(lambda: [blocked_matmul(x, wt, w) for wt in weights], reps)
                   for w in candidate_widths(d_out)}
        best[bucket] = min(seconds, key=seconds.get)
    return best


def _product_owners(model: nn.Module) -> list:
    """What runs the model's small products: sibling groups and the linears outside one."""
    owners: dict[int, object] = {}
    for m in model.modules():
        if isinstance(m, DualLayoutLinear):
            owner = m.siblings if m.siblings is not None else m
            owners.setdefault(id(owner), owner)
    return list(owners.values())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "cpu")
    except OSError:
        return os.uname().machine


def tune_products(model: nn.Module, refresh: bool = False, reps: int = 3) -> dict[str, dict[int, int]]:
    """Give every small product of a converted model the block widths measured fastest on
    this machine (per weight shape and row bucket); returns the plan {"<in>x<out>": widths}.

    The plan is cached per CPU model, torch version, thread count, dtype and weight shapes
    (about 4 s to measure for a 135M model), under dresd's cache root.
    """
    from dresd.models import cache_root, cached_measurement  # dresd.models imports this module

    by_shape: dict[str, list] = {}
    for owner in _product_owners(model):
        d_in, d_out = owner.weight_t.shape
        by_shape.setdefault(f"{d_in}x{d_out}", []).append(owner)
    if not by_shape:
        return {}
    dtype = next(iter(by_shape.values()))[0].weight_t.dtype
    key = json.dumps([_cpu_name(), torch.__version__, torch.get_num_threads(), str(dtype),
                      sorted((shape, len(group)) for shape, group in by_shape.items())])
    path = cache_root() / "cpu_linear" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    stored = cached_measurement(
        path, key, lambda: {shape: fastest_widths([o.weight_t for o in group], reps) for shape, group in by_shape.items()},
        refresh)
    # JSON keys are strings: the row buckets come back as ints.
    plan = {shape: {int(b): w for b, w in widths.items()} for shape, widths in stored.items()}
    for shape, group in by_shape.items():
        for owner in group:
            owner.widths = dict(plan[shape])
    return plan


def product_plan_tag(model: nn.Module) -> str:
    """A short digest of the block widths a converted model runs with ("" if not converted):
    forward costs depend on them, so cached cost models key on it."""
    plans = sorted(json.dumps([list(o.weight_t.shape), sorted(o.widths.items())]) for o in _product_owners(model))
    return hashlib.sha256("".join(plans).encode()).hexdigest()[:12] if plans else ""
