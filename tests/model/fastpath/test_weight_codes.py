"""Tests for dresd.model.fastpath.weight_codes: GGUF-style weights give back their exact codes, anything
that is not exactly such a weight gets none."""

from __future__ import annotations

import pytest
import torch

from dresd.model.fastpath.weight_codes import CODE_RANGES, GROUP, SCREEN_ROWS, decode, find_codes
from tests_support import coded_weight


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (130, 576)])
def test_gguf_style_weights_give_back_exact_codes(bits, shape):
    weight = coded_weight(*shape, bits)
    codes = find_codes(weight)
    assert codes is not None and codes.bits == bits
    low, high = CODE_RANGES[bits]
    assert int(codes.codes.min()) >= low and int(codes.codes.max()) <= high
    assert torch.equal(codes.scale, codes.scale.half().float())  # float16 scales: code * scale is exact
    assert torch.equal(decode(codes).view(torch.int32), weight.view(torch.int32))


def test_other_weights_get_no_codes():
    torch.manual_seed(0)
    assert find_codes(torch.randn(8, 64)) is None  # an ordinary float weight
    assert find_codes(coded_weight(8, 64, 4)[:, :48]) is None  # inputs not whole groups
    assert find_codes(coded_weight(8, 64, 4).double()) is None
    assert find_codes(coded_weight(8, 64, 4)[0]) is None  # not a matrix
    nan = coded_weight(8, 64, 4)
    nan[3, 5] = float("nan")
    assert find_codes(nan) is None
    # One weight one ulp off its code: no width reproduces it, so none is claimed.
    nudged = coded_weight(8, 64, 4)
    nudged[2, 40] = torch.nextafter(nudged[2, 40], torch.tensor(1.0))
    assert find_codes(nudged) is None
    # ... also past the rows a width is screened on first.
    late = coded_weight(SCREEN_ROWS + 4, 64, 4)
    late[SCREEN_ROWS + 2, 7] = torch.nextafter(late[SCREEN_ROWS + 2, 7], torch.tensor(1.0))
    assert find_codes(late[: SCREEN_ROWS + 2]) is not None and find_codes(late) is None


def test_a_block_of_equal_weights_and_a_zero_block_are_exact():
    weight = coded_weight(4, 64, 4)
    weight[0, :GROUP] = 0.0  # scale 0, offset 0
    weight[1, GROUP:] = weight[1, GROUP]  # a constant block: scale 0, offset the value
    codes = find_codes(weight)
    assert codes is not None and codes.bits == 4
    assert torch.equal(decode(codes), weight)


def test_an_8_bit_weight_is_not_taken_for_a_4_bit_one():
    codes = find_codes(coded_weight(16, 96, 8))
    assert codes is not None and codes.bits == 8
