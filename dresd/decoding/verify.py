"""One verification step: a single target forward over the drafts, greedy acceptance,
and the KV cache cut back to the accepted path.

Two verifiers share one contract (`StepResult`):
- `verify_tree`: drafts merged into a trie, one row, tree attention mask + tree positions;
- `verify_batch`: the reference's batch of draft rows, KV cache copied per row.
Plain greedy decoding is `verify_tree` with no drafts: a one-token forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from dresd.model.fastpath import lean_forward
from dresd.model.fastpath.cpu_linear import ROWS_PER_PASS, DualLayoutLinear
from dresd.decoding.kv_cache import GrowingLayer, cached_forward
from dresd.decoding.tree import TokenTree, build_tree, greedy_accept, tree_attention_mask, tree_position_ids


@dataclass
class StepResult:
    """What one verification step produced."""

    new_tokens: list[int]  # accepted draft tokens followed by the target's bonus token
    accepted: int  # accepted draft tokens (len(new_tokens) - 1)
    verified: int  # positions the forward ran (root included)
    drafted: int  # draft positions verified (verified - rows' roots)
    offered_depth: int  # deepest draft position offered this step (0 = no drafts)
    # (m+1, D) last-layer hidden states of the root and the m accepted draft positions, in
    # order: the keys of the positions this step committed.
    keys: torch.Tensor
    path: list[int] = field(default_factory=lambda: [0])  # accepted tree nodes, root first (tree verify)

    @property
    def query(self) -> torch.Tensor:
        """(D,) the hidden state that produced the bonus token: the next step's query."""
        return self.keys[-1]


@torch.inference_mode()
def forward(model, input_ids: torch.Tensor, cache: DynamicCache, position_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the target over new tokens with the cache; returns (hidden, logits) for every position.

    hidden is the decoder's last-layer output after its final norm: exactly what the
    datastore's keys are made of, so the query needs no extra forward. A model on the CPU
    fast path runs dresd.model.fastpath.lean_forward (the same outputs, less overhead). With logits=False
    the LM head is skipped (a prefill needs only the cache and the last hidden state; the
    head over a 49k vocabulary costs as much as several layers per position).
    """
    if lean_forward.applies(model):
        hidden = lean_forward.decoder_forward(model, input_ids, cache, position_ids, attention_mask)
    else:
        hidden = cached_forward(model.base_model, cache, input_ids=input_ids, position_ids=position_ids,
                                attention_mask=attention_mask).last_hidden_state
    return hidden, (model.get_output_embeddings()(hidden) if logits else None)


class LazyGreedyTokens:
    """The target's greedy next token after each tree node, computed when first asked for.

    On a CPU the LM head over a 49k vocabulary costs about as much per position as several
    decoder layers, and greedy acceptance reads only the accepted path's positions plus the
    one that yields the bonus token: usually a few of a tree's k positions. A packed head
    (dresd.model.fastpath.cpu_linear) serves up to ROWS_PER_PASS rows in one pass over its weight and gives each
    row the same bits whatever rows share its product, so a node asked for is computed
    with the next nodes below it, the ones acceptance may ask for next.
    """

    def __init__(self, head, hidden: torch.Tensor, tree: TokenTree):
        self.head, self.hidden, self.tree = head, hidden, tree  # hidden: (positions, D)
        self.rows = ROWS_PER_PASS if isinstance(head, DualLayoutLinear) else 1
        self.computed: dict[int, int] = {}

    def _rows_from(self, node: int) -> list[int]:
        """`node` and then its descendants breadth-first, up to self.rows not yet computed."""
        rows, frontier = [node], [node]
        while frontier and len(rows) < self.rows:
            frontier = [c for n in frontier for c in self.tree.children[n].values()]
            rows += [c for c in frontier if c not in self.computed][: self.rows - len(rows)]
        return rows

    @torch.inference_mode()
    def __getitem__(self, node: int) -> int:
        if node not in self.computed:
            rows = self._rows_from(node)
            self.computed.update(zip(rows, self.head(self.hidden[rows]).argmax(-1).tolist()))
        return self.computed[node]


def keep_cache_positions(cache: DynamicCache, prefix_len: int, kept: list[int]) -> None:
    """Cut the cache to its first `prefix_len` entries plus entries prefix_len + kept[i]."""
    total = cache.get_seq_length()
    if kept == list(range(len(kept))):
        # The accepted path is a contiguous run: a crop avoids copying the prefix.
        drop = total - prefix_len - len(kept)
        if drop:
            cache.crop(-drop)
        return
    device = cache.layers[0].keys.device
    moved = torch.tensor(kept, dtype=torch.long, device=device)
    index = None
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer.keep(prefix_len, moved)
            continue
        if index is None:
            index = torch.cat([torch.arange(prefix_len, device=device), moved + prefix_len])
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


def verify_token_tree(model, cache: DynamicCache, tree: TokenTree,
                      accept: Callable[[TokenTree, torch.Tensor], tuple[list[int], int]] | None = None) -> StepResult:
    """Verify a token tree rooted at the pending token in one forward; cut the cache to the accepted path.

    `accept(tree, logits)` returns the accepted node path and the bonus token; the default
    is greedy acceptance (speculative sampling passes its own, see dresd.decoding.acceptance), which
    on a CPU runs the LM head only at the positions it reads (LazyGreedyTokens).
    """
    device = model.device
    prefix = cache.get_seq_length()
    ids = torch.tensor([tree.tokens], dtype=torch.long, device=device)
    positions = tree_position_ids(tree, prefix, device)
    # A chain (including the lone root) is causal already: let the model build its own mask.
    is_chain = all(p == i - 1 for i, p in enumerate(tree.parents))
    mask = None if is_chain else tree_attention_mask(tree, prefix, model.dtype, device)
    # On a GPU the head over every position is one cheap kernel: no reason to split it.
    lazy_head = accept is None and device.type == "cpu"
    hidden, logits = forward(model, ids, cache, positions, mask, logits=not lazy_head)
    if accept is None:
        predicted = (LazyGreedyTokens(model.get_output_embeddings(), hidden[0], tree) if lazy_head
                     else logits[0].argmax(-1).tolist())
        path = greedy_accept(tree, predicted)
        bonus = predicted[path[-1]]
    else:
        path, bonus = accept(tree, logits[0])
    keep_cache_positions(cache, prefix, path)
    accepted = len(path) - 1
    return StepResult(
        new_tokens=[tree.tokens[n] for n in path[1:]] + [bonus],
        accepted=accepted,
        verified=len(tree),
        drafted=len(tree) - 1,
        offered_depth=tree.max_depth,
        keys=hidden[0, path],
        path=path,
    )


def verify_tree(model, cache: DynamicCache, root_token: int, drafts: list[list[int]],
                max_nodes: int | None = None) -> StepResult:
    """Verify `drafts` (rank order) as one token tree rooted at the pending token (greedy)."""
    return verify_token_tree(model, cache, build_tree(root_token, drafts, max_nodes))


def verify_batch(model, cache: DynamicCache, root_token: int, drafts: list[list[int]]) -> StepResult:
    """Verify each draft as its own row [root, d1..dL] over a per-row copy of the cache.

    The row with the longest accepted prefix wins (first row on ties); its cache is kept.
    """
    if not drafts:
        return verify_tree(model, cache, root_token, [])
    device = model.device
    prefix = cache.get_seq_length()
    width = max(len(d) for d in drafts)
    # Rows shorter than the widest are padded after their end; causal attention means the
    # padding never influences the real positions before it.
    rows = [[root_token] + list(d) + [root_token] * (width - len(d)) for d in drafts]
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    positions = torch.arange(prefix, prefix + width + 1, device=device)[None].expand(len(rows), -1)
    cache.batch_repeat_interleave(len(rows))
    hidden, logits = forward(model, ids, cache, positions)
    predicted = logits.argmax(-1).tolist()
    best_row, best_m = 0, -1
    for r, draft in enumerate(drafts):
        m = 0
        while m < len(draft) and draft[m] == predicted[r][m]:
            m += 1
        if m > best_m:
            best_row, best_m = r, m
    cache.batch_select_indices(torch.tensor([best_row], device=device))
    cache.crop(-(width - best_m))
    win = drafts[best_row]
    return StepResult(
        new_tokens=list(win[:best_m]) + [predicted[best_row][best_m]],
        accepted=best_m,
        verified=len(rows) * (width + 1),
        drafted=sum(len(d) for d in drafts),
        offered_depth=width,
        keys=hidden[best_row, : best_m + 1],
    )
