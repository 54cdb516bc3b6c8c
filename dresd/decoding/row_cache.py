"""The batch's KV cache and the inputs of one batched verification.

The cache is laid out so that column j of a row holds that row's position j: a row's
committed entries fill columns [0, committed) and anything after them in the view is masked.
A step writes each row's tree right after the row's own entries (node j at column
committed + j: `RowCache.target`), so a path accepted in node order, a lone root above all,
is already in place; only an accepted node that sat elsewhere in its tree is moved down
(`RowLayer.settle`). Rows advance by different amounts without padding that grows, a
compaction pass, or a copy of every row's new entry at every step.
"""

from __future__ import annotations

import torch

from dresd.decoding.kv_cache import GrowingCache, GrowingLayer
from dresd.decoding.tree import TokenTree, ancestor_matrix
from dresd.decoding.verify import forward


class RowLayer(GrowingLayer):
    """A growing layer whose rows hold sequences of different lengths (see the module docstring)."""

    _zero_room = True
    # Set by RowCache.target for one forward: (B, k) cache columns of each row's new entries,
    # the matching (B, k) row numbers, and 1 + the largest column.
    targets: torch.Tensor | None = None
    target_rows: torch.Tensor | None = None
    target_end: int = 0
    writes: int = 0  # forwards that wrote into this layer (dresd.decoding.kv_cache.cached_forward checks it)

    @torch.inference_mode()
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new entries at their target columns (after the filled part when none are
        set); returns the viewed keys and values."""
        self.writes += 1
        if self.targets is None:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        width = max(self.get_seq_length(), self.target_end)
        self._room_for(width, key_states, value_states)
        self._key_buf[self.target_rows, :, self.targets] = key_states.transpose(1, 2)
        self._value_buf[self.target_rows, :, self.targets] = value_states.transpose(1, 2)
        self._view(width)
        return self.keys, self.values

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
        if len(rows):
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
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, positions, the additive 4-D mask and the cache columns of one batched verification.

    Row `slot` holds `trees[slot]` after its `committed[slot]` cache entries: node j goes to
    column committed + j; rows without a tree (idle), and every row past its tree's end,
    hold padding nodes that see only themselves (an idle row's from column 0). `width` is
    the cache's view before the step; the mask spans the view after it.
    """
    k = max(len(t) for t in trees.values())
    start = torch.tensor([committed[slot] if slot in trees else 0 for slot in range(batch)])
    columns = start[:, None] + torch.arange(k)
    after = max(width, int(start.max()) + k)
    ids = torch.full((batch, k), pad_id, dtype=torch.long)  # padding: any valid id, masked
    positions = start[:, None].expand(batch, k).clone()
    allowed = torch.zeros((batch, 1, k, after), dtype=torch.bool)
    allowed[torch.arange(batch)[:, None], 0, torch.arange(k), columns] = True  # padding nodes see themselves
    for slot, tree in trees.items():
        n, c = len(tree), committed[slot]
        ids[slot, :n] = torch.tensor(tree.tokens)
        positions[slot, :n] += torch.tensor(tree.depths)
        allowed[slot, 0, :n, :c] = True
        allowed[slot, 0, :n, c:c + n] = ancestor_matrix(tree)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, positions, mask, columns


def padded_prefill(model, seqs: list[list[int]], pad_id: int) -> tuple[GrowingCache, torch.Tensor]:
    """One forward over `seqs` right-padded to the longest (a cache of its own, and the
    last-layer states (len(seqs), width, D)): each row attends to its own tokens only, so its
    first len(seq) entries and states are what it computes alone."""
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(q) for q in seqs])
    for j, q in enumerate(seqs):
        ids[j, : len(q)] = torch.tensor(q)
    cols = torch.arange(width)
    allowed = (cols[None, :] <= cols[:, None])[None] & (cols[None, None, :] < lengths[:, None, None])
    mask = torch.zeros(len(seqs), 1, width, width, dtype=model.dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(model.dtype).min)
    own = GrowingCache()
    device = model.device
    hidden, _ = forward(model, ids.to(device), own, cols.expand(len(seqs), width).to(device), mask.to(device),
                        logits=False)
    return own, hidden


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

    @property
    def writes(self) -> int:
        """Forwards that wrote into the cache (a forward that ignored it leaves this unchanged)."""
        return self.layers[0].writes

    def target(self, columns: torch.Tensor | None) -> None:
        """Write the next forward's entries at `columns` ((B, k): row b's position j at column
        columns[b, j]), or after the view again (None)."""
        # Derived once here, not in each layer's update.
        rows = None
        if columns is not None:
            rows = torch.arange(len(columns), device=columns.device)[:, None].expand_as(columns)
        end = int(columns.max()) + 1 if columns is not None else 0
        for layer in self.layers:
            layer.targets, layer.target_rows, layer.target_end = columns, rows, end
