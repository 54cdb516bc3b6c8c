"""Tests for dresd.decoding.row_cache: one batched verification's inputs (each row's tree
after its own committed entries, padding that sees only itself) and the row-aligned cache
moves that let rows advance by different amounts."""

from __future__ import annotations

import torch

from dresd.decoding.row_cache import RowLayer, batch_inputs
from dresd.decoding.tree import build_tree


def test_each_row_sees_its_own_entries_and_tree_ancestors_only():
    trees = {0: build_tree(7, [[8, 9], [5]]), 2: build_tree(4, [])}  # row 1 is idle
    ids, positions, mask, columns = batch_inputs(trees, {0: 3, 2: 1}, batch=3, width=5, pad_id=0,
                                                 dtype=torch.float32)
    assert ids.tolist() == [[7, 8, 9, 5], [0, 0, 0, 0], [4, 0, 0, 0]]
    assert positions[0].tolist() == [3, 4, 5, 4] and positions[2].tolist() == [1, 1, 1, 1]
    # Each row's nodes go right after its own entries (an idle row's padding from column 0).
    assert columns.tolist() == [[3, 4, 5, 6], [0, 1, 2, 3], [1, 2, 3, 4]]
    seen = mask == 0
    assert mask.shape == (3, 1, 4, 7)  # the view after the step: row 0's tree ends at column 7
    # Row 0: its 3 committed columns, then the tree's ancestor pattern from column 3.
    assert seen[0, 0, 2].tolist() == [True] * 3 + [True, True, True, False]
    assert seen[0, 0, 3].tolist() == [True] * 3 + [True, False, False, True]
    # Row 2 (one committed entry): its root sees that entry and itself; padding sees only itself.
    assert seen[2, 0, 0].tolist() == [True, True] + [False] * 5
    assert seen[2, 0, 3].tolist() == [False] * 4 + [True, False, False]
    assert seen[1, 0, 1].tolist() == [False, True] + [False] * 5  # an idle row: padding only


def test_a_targeted_write_puts_each_rows_entries_after_its_own_and_counts_the_write():
    layer = RowLayer()
    base = torch.zeros(2, 1, 5, 1)
    layer.update(base, base.clone())
    new = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 1, 2, 1)
    layer.targets, layer.target_rows = torch.tensor([[2, 3], [5, 6]]), torch.tensor([[0, 0], [1, 1]])
    layer.target_end = 7
    keys, _ = layer.update(new, new.clone())
    assert keys.shape[-2] == 7 and layer.writes == 2
    assert keys[0, 0, :, 0].tolist() == [0, 0, 1, 2, 0, 0, 0]
    assert keys[1, 0, :, 0].tolist() == [0, 0, 0, 0, 0, 3, 4]


def test_settle_moves_each_rows_accepted_entries_to_its_end():
    layer = RowLayer()
    keys = torch.arange(2 * 1 * 6 * 1, dtype=torch.float32).reshape(2, 1, 6, 1)
    layer.update(keys, keys.clone())
    # Row 0 accepted the entries at columns 4 and 5 after 2 committed ones; row 1 the one at 4 after 3.
    rows, src, dst = torch.tensor([0, 0, 1]), torch.tensor([4, 5, 4]), torch.tensor([2, 3, 3])
    layer.settle(rows, src, dst, width=4)
    assert layer.keys.shape[-2] == 4
    assert layer.keys[0, 0, :, 0].tolist() == [0, 1, 4, 5]
    assert layer.keys[1, 0, :, 0].tolist() == [6, 7, 8, 10]
