"""The SuffixDecoding baseline (Snowflake ArcticInference), run without vLLM.

arctic-inference 0.3.0's `SuffixDecodingCache` keeps one suffix tree per active request
(its prompt plus its response so far) and one global tree over past responses (FIFO
eviction when `max_cached_requests` > 0). Facts of that API, read from its source:
- `add_active_response(id, tokens)` extends BOTH the request's local tree and the global
  tree at once (the global one only while `id` holds a slot there); `stop_request(id)` only
  drops the local tree (the response stays cached); `evict_cached_response(id)` drops the
  response from the global tree.
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

The library's FIFO would evict the warmed corpus along with served responses, so it is off
(`max_cached_requests=-1`) and this drafter decides what the global tree keeps: the corpus
it was warmed with, plus at most `cached_responses` served responses when
`share_responses` is on. Off (the default), a request's response slot in the global tree is
dropped as the request starts, so its text lives only in its local tree, drafts only for
itself and is gone at its end.
"""

from __future__ import annotations

import copy
import itertools
from collections import deque
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
        cached_responses: int = 0,
        share_responses: bool = False,
    ):
        """`max_spec_tokens`: draft-tree node budget (None: `max_tree_depth`); `eos_id`
        (optional): paths are cut after it; `share_responses`: a served response drafts for
        later requests too; `cached_responses`: how many served responses the global tree
        keeps for them, oldest dropped first (the warmed corpus is never dropped)."""
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        if cached_responses < 0:
            raise ValueError(f"cached_responses must be >= 0, got {cached_responses}")
        self.cache = SuffixDecodingCache(max_tree_depth=max_tree_depth, max_cached_requests=-1)
        self.cached_responses = cached_responses
        self.share_responses = share_responses and cached_responses > 0
        self._served: deque[int] = deque()  # served responses in the global tree, oldest first
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

    def sibling(self) -> "SuffixDrafter":
        """A drafter for a request decoding beside this one's: the same cache (one warmed global
        tree, one id sequence, one record of served responses), its own active request. The
        library keeps a local tree per active request, so concurrent requests do not mix."""
        twin = copy.copy(self)
        twin._active, twin._prompt_len, twin._added = None, 0, 0
        return twin

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
            self.end([])  # a request left open: close it (kept for later requests only when shared)
        self._active = next(self._ids)
        self.cache.start_request(self._active, [int(t) for t in prompt_ids])
        if self.share_responses:
            # Room for this response first: the global tree never holds more served ones.
            self._keep_served(self.cached_responses - 1)
        else:
            # Its global slot is still empty: dropped now, the response reaches the local tree only.
            self.cache.evict_cached_response(self._active)
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
        # the prompt, and the local tree (and the global one when shared) learns it first.
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
        """Finish the request: the local tree is dropped. Shared: tokens not yet seen join its
        response in the global tree (add_active_response put the rest there), which keeps it
        for later requests until `cached_responses` newer ones push it out."""
        if self._active is None:
            return
        if self.share_responses:
            self._feed(list(generated))
            self._served.append(self._active)
        self.cache.stop_request(self._active)
        self._active = None

    def _keep_served(self, n: int) -> None:
        """Drop the oldest served responses from the global tree until at most `n` remain."""
        while len(self._served) > max(n, 0):
            oldest = self._served.popleft()
            if oldest in self.cache.cached_requests:  # a seq-id wrap-around may have dropped it
                self.cache.evict_cached_response(oldest)

    @property
    def served_cached(self) -> int:
        """How many served responses the global tree holds for later requests."""
        return len(self._served)


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
