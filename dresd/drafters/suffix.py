"""The SuffixDecoding baseline (Snowflake ArcticInference), run without vLLM.

arctic-inference 0.3.0's `SuffixDecodingCache` keeps one suffix tree per active request
(its prompt plus its response so far) and one global tree over past responses (FIFO
eviction when `max_cached_requests` > 0). Facts of that API, read from its source:
- `add_active_response(id, tokens)` extends BOTH the request's local tree and the global
  tree at once; `stop_request(id)` only drops the local tree (the response stays cached).
- `speculate(id, context, max_spec_tokens, max_spec_factor, max_spec_offset,
  min_token_prob, use_tree_spec)` matches the context's suffixes (up to `max_tree_depth`
  tokens) in both trees and returns the better-scoring `SuffixDecodingDraft`: `token_ids`,
  `parents` (parents[i] < i, -1 for a child of the root), `probs` (each node's estimated
  probability: the product of the branch frequencies from the root down to it), `score`
  (sum of probs) and `match_len`. `max_spec_tokens` caps the number of draft NODES, and
  also `max_spec_factor * match_len + max_spec_offset` does. `max_spec_tokens=None`
  crashes in 0.3.0 (it reads a missing `max_depth` attribute), so a number is always passed.
The C++ tree builds from the sdist (see scripts/setup.sh); importing
`arctic_inference.suffix_decoding` loads neither torch nor vLLM.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from dresd.drafters import Candidates, DraftRequest, truncate_at


class SuffixDrafter:
    """SuffixDecoding drafts: suffix-tree continuations from the prompt, the response so far
    and past responses. One request at a time (begin -> propose* -> end)."""

    def __init__(
        self,
        max_tree_depth: int = 64,
        max_spec_factor: float = 1.0,
        max_spec_offset: float = 0.0,
        min_token_prob: float = 0.1,
        use_tree_spec: bool = True,
        max_spec_tokens: int | None = None,
        name: str = "suffix",
        eos_id: int | None = None,
        max_cached_requests: int = -1,
    ):
        """`max_spec_tokens`: draft-tree node budget (None: `max_tree_depth`); `eos_id`
        (optional): paths are cut after it; `max_cached_requests`: global-tree FIFO size
        (-1: unbounded, as in the paper's default)."""
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        self.cache = SuffixDecodingCache(max_tree_depth=max_tree_depth, max_cached_requests=max_cached_requests)
        self.max_tree_depth = max_tree_depth
        self.max_spec_factor = max_spec_factor
        self.max_spec_offset = max_spec_offset
        self.min_token_prob = min_token_prob
        self.use_tree_spec = use_tree_spec
        self.max_spec_tokens = max_spec_tokens if max_spec_tokens is not None else max_tree_depth
        self.name = name
        self.eos_id = eos_id
        self._ids = itertools.count()
        self._active: int | None = None  # request id inside the cache
        self._prompt_len = 0
        self._added = 0  # generated tokens already given to add_active_response

    def warm(self, pairs: Iterable[tuple[list[int], list[int]]]) -> int:
        """Put corpus responses into the global tree; returns how many pairs were replayed.

        Each pair goes through start_request / add_active_response / stop_request, exactly
        as a served request would. The prompt is not passed: it would only fill a local tree
        that stop_request throws away (the global tree holds responses only), and skipping
        it makes warming a large corpus cheaper.
        """
        n = 0
        for _prompt, response in pairs:
            rid = next(self._ids)
            self.cache.start_request(rid, [])
            if len(response):
                self.cache.add_active_response(rid, [int(t) for t in response])
            self.cache.stop_request(rid)
            n += 1
        return n

    def begin(self, prompt_ids: list[int]) -> None:
        """Start a request: its prompt becomes the local suffix tree."""
        if self._active is not None:
            self.end([])  # a request left open: close it (its response so far stays cached)
        self._active = next(self._ids)
        self.cache.start_request(self._active, [int(t) for t in prompt_ids])
        self._prompt_len = len(prompt_ids)
        self._added = 0

    def _feed(self, generated: list[int]) -> None:
        """Give the cache the generated tokens it has not seen yet."""
        new = generated[self._added :]
        if new:
            self.cache.add_active_response(self._active, [int(t) for t in new])
            self._added += len(new)

    def propose(self, request: DraftRequest) -> Candidates:
        """Root-to-leaf paths of the speculated tree, weighted by each leaf's probability."""
        out = Candidates()
        if self._active is None:
            raise RuntimeError("SuffixDrafter.propose before begin()")
        context = request.context
        if len(context) < self._prompt_len + self._added:
            raise ValueError("the context shrank: it must be the prompt plus all generated tokens")
        # context[-1] was just emitted: it is part of the response, like every token after
        # the prompt, and both trees learn it before speculating.
        self._feed(context[self._prompt_len :])
        # A node budget no larger than max_len keeps every path within max_len tokens.
        budget = min(request.max_len, self.max_spec_tokens)
        if budget <= 0:
            return out  # 0 would mean "the tree depth" to the library
        draft = self.cache.speculate(
            self._active,
            [int(t) for t in context[-self.max_tree_depth :]],
            max_spec_tokens=budget,
            max_spec_factor=self.max_spec_factor,
            max_spec_offset=self.max_spec_offset,
            min_token_prob=self.min_token_prob,
            use_tree_spec=self.use_tree_spec,
        )
        probs = list(draft.probs) if getattr(draft, "probs", None) else None
        return tree_to_candidates(
            list(draft.token_ids), list(draft.parents), probs, float(draft.score),
            request.max_len, self.eos_id, self.name,
        )

    def end(self, generated: list[int]) -> None:
        """Finish the request: tokens not yet seen join its cached response in the global
        tree (add_active_response already put the rest there), the local tree is dropped."""
        if self._active is None:
            return
        self._feed(list(generated))
        self.cache.stop_request(self._active)
        self._active = None


def tree_to_candidates(
    token_ids: list[int],
    parents: list[int],
    probs: list[float] | None,
    score: float,
    max_len: int,
    eos_id: int | None,
    source: str,
) -> Candidates:
    """A (token_ids, parents) draft tree as its root-to-leaf paths.

    A leaf's weight is its probability (the product of branch frequencies down to it), so a
    node's support is the probability mass of the leaves below it (total = 1). Without
    per-token probabilities every path gets the draft's score (total left to the sum).
    Paths equal after the cut at max_len and EOS merge, adding their weights; the most
    probable path comes first.
    """
    out = Candidates()
    n = len(token_ids)
    if n == 0:
        return out
    has_child = [False] * n
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"draft node {i} has parent {p}: not a tree in emission order")
        if p >= 0:
            has_child[p] = True
    merged: dict[tuple[int, ...], float] = {}
    for leaf in (i for i in range(n) if not has_child[i]):
        path, node = [], leaf
        while node >= 0:
            path.append(int(token_ids[node]))
            node = parents[node]
        path.reverse()
        weight = float(probs[leaf]) if probs is not None else score
        cut = tuple(truncate_at(path, max_len, eos_id))
        if cut:
            merged[cut] = merged.get(cut, 0.0) + weight
    for path, weight in sorted(merged.items(), key=lambda kv: (-kv[1], kv[0])):
        out.add(list(path), weight, source)
    if probs is not None:
        # Probabilities: support is measured against the whole mass (1); continuations
        # below min_token_prob or past the node budget back no path.
        out.total = max(1.0, sum(out.weights))
    return out
