"""The batch's KV cache and the inputs of one batched verification.

The cache is laid out so that column j of a row holds that row's position j: a row's
committed entries fill columns [0, committed) and anything after them in the view is masked.
A step appends the trees' entries after the widest row, then moves each row's accepted path
down to its own end (`RowLayer.settle`, only the accepted entries are copied), so rows
advance by different amounts without padding that grows or a compaction pass.
"""

from __future__ import annotations

import torch

from dresd.decoding.kv_cache import GrowingCache, GrowingLayer
from dresd.decoding.tree import TokenTree, ancestor_matrix


class RowLayer(GrowingLayer):
    """A growing layer whose rows hold sequences of different lengths (see the module docstring)."""

    _zero_room = True

    @torch.inference_mode()
    def write_row(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put one sequence's (1, H, n, D) entries at columns [0, n) of `row`."""
        n = keys.shape[-2]
        width = max(self.get_seq_length(), n)
        self._room_for(width, self.keys, self.values)
        self._key_buf[row, :, :n].copy_(keys[0])
        self._value_buf[row, :, :n].copy_(values[0])
        self._view(width)

    @torch.inference_mode()
    def settle(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, width: int) -> None:
        """Move entry (rows[i], src[i]) to (rows[i], dst[i]); then view `width` columns."""
        self._room_for(self.get_seq_length(), self.keys, self.values)
        moved_k = self._key_buf[rows, :, src]  # advanced indexing copies: safe to write back
        moved_v = self._value_buf[rows, :, src]
        self._key_buf[rows, :, dst] = moved_k
        self._value_buf[rows, :, dst] = moved_v
        self._view(width)


    @torch.inference_mode()
    def resize_rows(self, keep: torch.Tensor, extra: int = 0) -> None:
        """Keep rows `keep` (in that order), then add `extra` empty rows; the view keeps its width."""
        width = self.get_seq_length()
        self._room_for(width, self.keys, self.values)
        k, v = self._key_buf[keep], self._value_buf[keep]  # advanced indexing copies
        if extra:
            k = torch.cat([k, k.new_zeros(extra, *k.shape[1:])])
            v = torch.cat([v, v.new_zeros(extra, *v.shape[1:])])
        self._key_buf, self._value_buf = k, v
        self._view(width)


def batch_inputs(trees: dict[int, TokenTree], committed: dict[int, int], batch: int, width: int, pad_id: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, positions and the additive 4-D mask of one batched verification.

    Row `slot` holds `trees[slot]` after its `committed[slot]` cache entries (columns
    [0, committed)); rows without a tree, and every row past its tree's end, hold padding
    nodes that see only themselves. `width` is the cache's current view.
    """
    k = max(len(t) for t in trees.values())
    ids = torch.full((batch, k), pad_id, dtype=torch.long)  # padding: any valid id, masked
    positions = torch.zeros((batch, k), dtype=torch.long)
    allowed = torch.zeros((batch, 1, k, width + k), dtype=torch.bool)
    allowed[:, 0, torch.arange(k), width + torch.arange(k)] = True  # padding nodes see themselves
    for slot, tree in trees.items():
        n, c = len(tree), committed[slot]
        ids[slot, :n] = torch.tensor(tree.tokens)
        positions[slot, :n] = torch.tensor(tree.depths) + c
        positions[slot, n:] = c
        allowed[slot, 0, :n, :c] = True
        allowed[slot, 0, :n, width:width + n] = ancestor_matrix(tree)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, positions, mask


class RowCache(GrowingCache):
    """The batch's KV cache: one RowLayer per decoder layer, `slots` rows."""

    def __init__(self, model, slots: int):
        super().__init__()
        self.layer_class_to_replicate = RowLayer
        config = model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        empty = torch.zeros(slots, heads, 0, head_dim, dtype=model.dtype, device=model.device)
        for index in range(config.num_hidden_layers):
            self.update(empty, empty, index)
