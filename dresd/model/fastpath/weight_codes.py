"""Exact integer codes of a float weight: the math behind the packed kernel's 4- and 8-bit layouts.

Our models come from GGUF files: SmolLM2-135M's linears are Q4_1 (each run of 32 weights
along an input row is `d * q + m`, q in 0..15, d and m float16) and its embedding, the tied
LM head, is Q8_0 (`d * q`, q in -127..127). Dequantized to float32 they are 4.5 and 8.5
bit weights stored in 32 bits, and a CPU decode step spends most of its time streaming
those bits from memory.

`find_codes` recovers such codes from the float32 weight itself, not from the GGUF file
(any model whose weights have this form qualifies, however it was loaded), and keeps them
only when `decode` gives back every weight bit for bit: a code times a float16 scale is
exact in float32, so `code * scale + offset` rounds once, the same way in torch as in the
kernel's fused multiply-add. A weight that does not decode exactly gets no codes and stays
float32; there is no approximation anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Inputs that share one scale and offset: the block size of GGUF's Q4_0/Q4_1/Q5_x/Q8_0.
GROUP = 32
# Code width -> the code range it holds, tried narrowest first.
CODE_RANGES = {4: (0, 15), 8: (-127, 127)}
# Rows screened first; trades a wasted screen against coding a failing weight; docs/cpu-fast-path.md#exact-integer-codes.
SCREEN_ROWS = 16


@dataclass(frozen=True)
class WeightCodes:
    """weight[o, i] == codes[o, i] * scale[o, i // GROUP] + offset[o, i // GROUP], exactly."""

    codes: torch.Tensor  # int16 [out, in], within CODE_RANGES[bits]
    scale: torch.Tensor  # float32 [out, in / GROUP], each a float16 value
    offset: torch.Tensor  # float32 [out, in / GROUP]
    bits: int  # 4 or 8


def decode(codes: WeightCodes) -> torch.Tensor:
    """The float32 weight the codes stand for (what the kernel computes per chunk)."""
    out, groups = codes.scale.shape
    grouped = codes.codes.view(out, groups, GROUP).float() * codes.scale[..., None] + codes.offset[..., None]
    return grouped.view(out, groups * GROUP)


def _candidate(grouped: torch.Tensor, bits: int) -> WeightCodes:
    """The codes GGUF's quantizer would have written for weights of this width: for 4 bits
    the group's minimum is the offset and its range / 15 the scale (Q4_1); for 8 bits the
    offset is zero and the largest magnitude / 127 the scale (Q8_0)."""
    low, high = CODE_RANGES[bits]
    if bits == 4:
        offset = grouped.amin(-1)
        scale = (grouped.amax(-1) - offset) / high
    else:
        offset = torch.zeros(grouped.shape[:-1])
        scale = grouped.abs().amax(-1) / 127
    scale = scale.half().float()  # the GGUF scale is a float16; keeps code * scale exact
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round((grouped - offset[..., None]) / safe[..., None]).clamp(low, high).to(torch.int16)
    out = grouped.shape[0]
    return WeightCodes(codes.view(out, -1), scale, offset, bits)


def find_codes(weight: torch.Tensor) -> WeightCodes | None:
    """The narrowest exact codes of a float32 [out, in] weight, or None when it has none
    (in_features not a multiple of GROUP, or no code width reproduces every weight's bits)."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % GROUP:
        return None
    weight = weight.detach()
    grouped = weight.reshape(weight.shape[0], -1, GROUP)
    if not torch.isfinite(grouped).all():
        return None
    for bits in CODE_RANGES:
        # The first rows rule a width out cheaply (an 8-bit LM head fails 4 bits on row 0)
        # before the whole weight is coded.
        if not _exact(_candidate(grouped[:SCREEN_ROWS], bits), weight[:SCREEN_ROWS]):
            continue
        codes = _candidate(grouped, bits)
        if _exact(codes, weight):
            return codes
    return None


def _exact(codes: WeightCodes, weight: torch.Tensor) -> bool:
    # Bit patterns, not values: -0.0 == 0.0 would hide a differing weight.
    return torch.equal(decode(codes).view(torch.int32), weight.view(torch.int32))
