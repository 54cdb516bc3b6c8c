"""A CPU decode-step speed-up: linear layers that also keep their weight input-major.

On CPU, torch's `nn.Linear` multiplies by a row-major [out, in] weight. For a forward over
one position (a plain decode step) MKL's matrix-vector path over that layout streams the
weights markedly slower than over the transposed, input-major [in, out] layout: measured
on this project's 2-core machine with SmolLM2-135M, a one-token forward takes 44 ms
instead of 55 ms (`benchmarks/cpu_linear_bench.py`). For 2 to 16 positions (draft trees)
MKL's small-M matrix product reaches about half its one-row bandwidth on either layout;
the same product as a batch over column blocks of the input-major copy runs near one-row
speed (`_product`), which makes a 4-16 position verification ~25% cheaper. From 17
positions on the original layout is used. The cost is one more copy of the linear weights
in memory (540 MB for the 135M model in fp32).

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

import torch
from torch import nn

# Forwards over at most this many positions use the input-major copy (measured: at 32
# positions the original layout is as fast).
MAX_MATVEC_ROWS = 16
# Output columns per block of a blocked product (see _product); the widest divisor of
# out_features up to this is used.
BLOCK_COLUMNS = 192


# Children of one module that consume the same input in this order (Llama, Mistral, Qwen2).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def block_width(out_features: int) -> int:
    """Columns per block: the widest divisor of out_features up to BLOCK_COLUMNS (0 = no blocking)."""
    width = next(w for w in range(min(BLOCK_COLUMNS, out_features), 0, -1) if out_features % w == 0)
    return width if width >= BLOCK_COLUMNS // 3 else 0


def _product(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, width: int) -> torch.Tensor:
    """x @ weight_t (+ bias); over 2+ rows as one batched product over column blocks.

    MKL multiplies a few rows by a whole [in, out] matrix at about half the bandwidth it
    reaches on one row; the same product as a batch of [in, width] column blocks (each a
    strided view, no copy) runs near one-row speed for 2-16 rows
    (benchmarks/cpu_linear_bench.py).
    """
    rows = x.numel() // weight_t.shape[0]
    if rows <= 1 or width == 0:
        y = torch.matmul(x, weight_t)
    else:
        d_in, d_out = weight_t.shape
        blocks = weight_t.view(d_in, d_out // width, width).transpose(0, 1)
        y = torch.matmul(x.reshape(rows, d_in), blocks).transpose(0, 1).reshape(*x.shape[:-1], d_out)
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
        self.block = block_width(self.out_features)
        self.siblings: SiblingGroup | None = None  # set by SiblingGroup
        self.sibling_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > MAX_MATVEC_ROWS * self.in_features:
            return nn.functional.linear(x, self.weight, self.bias)
        if self.siblings is not None:
            return self.siblings.output(self.sibling_index, x)
        return _product(x, self.weight_t, self.bias, self.block)

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
        self.block = block_width(sum(self.sizes))
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
            y = _product(x, self.weight_t, self.bias, self.block)
            self._pending = dict(enumerate(y.split(self.sizes, dim=-1)))
            self._input = x
        out = self._pending.pop(index)
        if not self._pending:
            self._input = None  # holds no tensor once every member has taken its output
        return out


def use_dual_layout(model: nn.Module) -> int:
    """Replace every `nn.Linear` of a CPU model by a `DualLayoutLinear`; returns how many.

    Models on other devices are left alone (GPU kernels have no such gap) and 0 is returned.
    Convert a model where it will run, after any edit of its weights: the copies are taken
    now, and the shared sibling copies do not follow `model.to()`.
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
    return converted


def has_dual_layout(model: nn.Module) -> bool:
    """Whether `use_dual_layout` converted this model (forward costs differ, so cost caches key on it)."""
    return any(isinstance(m, DualLayoutLinear) for m in model.modules())
