"""Token trees: drafts merged into a trie, flattened for one verification forward.

Node 0 is the root: the token just emitted (not yet in the KV cache). Every other node is
a draft token; a parent always comes before its children, so the flat order is a valid
causal order and node i may attend to the prefix, its ancestors and itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenTree:
    """A flattened token trie."""

    tokens: list[int]  # token id of each node; tokens[0] is the root
    parents: list[int]  # parent node of each node; -1 for the root
    depths: list[int]  # 0 for the root, 1 for first draft tokens, ...
    children: list[dict[int, int]] = field(default_factory=list)  # token -> child node, per node
    # Evidence through each node: the summed weight of the draft paths passing through it
    # (the root holds the total), and the drafters that proposed it ("a+b" when several did).
    weight: list[float] = field(default_factory=list)
    source: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def add_child(self, node: int, token: int, source: str = "") -> int:
        """The child of `node` holding `token`, created if absent."""
        child = self.children[node].get(token)
        if child is None:
            child = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(node)
            self.depths.append(self.depths[node] + 1)
            self.children.append({})
            self.weight.append(0.0)
            self.source.append(source)
            self.children[node][token] = child
        elif source and source not in self.source[child].split("+"):
            # Drafters that agree on a node: the node is theirs together, and the budget
            # calibrates agreement apart from either drafter alone.
            self.source[child] = "+".join(sorted(self.source[child].split("+") + [source]))
        return child

    def support(self, node: int) -> float:
        """Share of the evidence that passes through `node` (1.0 at the root)."""
        return self.weight[node] / self.weight[0] if self.weight[0] > 0 else 0.0

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root down to `node`, inclusive."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def build_tree(root_token: int, drafts: list[list[int]], max_nodes: int | None = None,
               weights: list[float] | None = None, sources: list[str] | None = None,
               total: float | None = None) -> TokenTree:
    """Merge drafts (in rank order) into a trie under `root_token`.

    With `max_nodes`, insertion stops once the tree holds that many nodes (root included),
    so higher-ranked drafts keep their full length. `weights` (default 1 per draft) are
    summed into every node a draft passes through; the root holds `total` (default: the
    sum of the weights), so `tree.support(node)` is the share of evidence behind a node.
    """
    weights = [1.0] * len(drafts) if weights is None else weights
    tree = TokenTree([root_token], [-1], [0], [{}], [0.0], [""])
    for i, draft in enumerate(drafts):
        node = 0
        src = sources[i] if sources else ""
        for tok in draft:
            if max_nodes is not None and int(tok) not in tree.children[node] and len(tree) >= max_nodes:
                break
            node = tree.add_child(node, int(tok), src)
            tree.weight[node] += weights[i]
    tree.weight[0] = float(sum(weights) if total is None else total)
    return tree


def subtree(tree: TokenTree, keep: list[int]) -> TokenTree:
    """The tree restricted to the root and the nodes in `keep` (each node's parent must be kept).

    Nodes keep their relative order, so parents still come before children.
    """
    kept = sorted(set(keep) | {0})
    new_id = {old: i for i, old in enumerate(kept)}
    out = TokenTree([tree.tokens[0]], [-1], [0], [{}], [tree.weight[0]], [tree.source[0]])
    for old in kept[1:]:
        parent = tree.parents[old]
        if parent not in new_id:
            raise ValueError(f"node {old} kept without its parent {parent}")
        node = out.add_child(new_id[parent], tree.tokens[old], tree.source[old])
        out.weight[node] = tree.weight[old]
    return out


def ancestor_matrix(tree: TokenTree) -> torch.Tensor:
    """(n, n) bool: [i, j] is True when node j is node i or one of its ancestors."""
    n = len(tree)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        anc[i, i] = True
        p = tree.parents[i]
        if p >= 0:
            anc[i] |= anc[p]
    return anc


def tree_attention_mask(tree: TokenTree, prefix_len: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive 4-D mask (1, 1, n, prefix_len + n): 0 where a node may attend, dtype min elsewhere."""
    n = len(tree)
    allowed = torch.ones(n, prefix_len + n, dtype=torch.bool)
    allowed[:, prefix_len:] = ancestor_matrix(tree)
    mask = torch.zeros(n, prefix_len + n, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def tree_position_ids(tree: TokenTree, prefix_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, n) positions: prefix length + depth of each node."""
    return (torch.tensor(tree.depths, dtype=torch.long) + prefix_len)[None].to(device)


def greedy_accept(tree: TokenTree, predicted: list[int]) -> list[int]:
    """Longest root path whose every draft token equals the target's argmax before it.

    `predicted[i]` is the target's greedy next token after node i. Returns the accepted
    node path, root first; the bonus token is `predicted[path[-1]]`.
    """
    node = 0
    path = [0]
    while (child := tree.children[node].get(predicted[node])) is not None:
        node = child
        path.append(node)
    return path


def accepted_in(tree: TokenTree, true_tokens: list[int]) -> list[int]:
    """The node path greedy acceptance takes in `tree` when the target's tokens are `true_tokens`."""
    path = [0]
    for token in true_tokens:
        child = tree.children[path[-1]].get(token)
        if child is None:
            break
        path.append(child)
    return path


def settled_path(tree: TokenTree, tokens: list[int]) -> list[int] | None:
    """The node path `tokens` (the text emitted after the root) take in `tree`, once they
    settle it: the text has left the tree, or followed it to a leaf. None while the text
    could still go deeper."""
    path = accepted_in(tree, tokens)
    return path if len(path) <= len(tokens) or not tree.children[path[-1]] else None


class UnsettledTrees:
    """Drafted trees waiting for the emitted text that settles them (settled_path), each with
    a caller's tag (what it needs to score the tree then)."""

    def __init__(self):
        self._trees: list[tuple[TokenTree, object, list[int]]] = []  # (tree, tag, tokens emitted since)

    def add(self, tree: TokenTree, tag: object = None) -> None:
        self._trees.append((tree, tag, []))

    def emitted(self, tokens: list[int]) -> list[tuple[TokenTree, object, list[int]]]:
        """(tree, tag, path) of every tree these tokens settle; the others keep waiting."""
        settled, still = [], []
        for tree, tag, seen in self._trees:
            seen.extend(tokens)
            if (path := settled_path(tree, seen)) is not None:
                settled.append((tree, tag, path))
            else:
                still.append((tree, tag, seen))
        self._trees = still
        return settled

    def drain(self) -> list[tuple[TokenTree, object, list[int]]]:
        """(tree, tag, path) of the trees still waiting, the text having ended inside them
        (their paths' last nodes' children had no chance), and none kept."""
        out = [(tree, tag, accepted_in(tree, seen)) for tree, tag, seen in self._trees]
        self._trees = []
        return out


def offered_nodes(tree: TokenTree, path: list[int], open_end: bool = False) -> list[tuple[int, bool]]:
    """(node, accepted) for every node whose parent is on `path`: the nodes that had a chance
    (the others say nothing about acceptance). `open_end`: the text stopped at the path's last
    node, so its children had no chance either."""
    on_path = set(path)
    live = on_path - ({path[-1]} if open_end else set())
    return [(i, i in on_path) for i in range(1, len(tree)) if tree.parents[i] in live]
