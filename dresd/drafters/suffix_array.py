"""The REST baseline as published: a suffix array over the corpus token streams.

REST (He et al., NAACL 2024; FasterDecoding/REST, `DraftRetriever/src/lib.rs` and
`rest/model/utils.py`) drafts like this at every decoding step: for n = 16 down to 2, look
up the context's last n tokens in a suffix array of the datastore (binary search) and stop
at the first n that occurs; take up to k = 5000 occurrences in suffix-array order and the
`long` = 10 tokens after each; count in a trie how many continuations pass through each
node and verify the 64 most frequent nodes with tree attention.

This module is our numpy implementation of that retriever (PyPI's `draftretriever` 0.1.1,
wrapped by dresd.drafters.rest, is ADED's trigram fork instead). The drafter returns every
distinct continuation weighted by its number of occurrences; dresd.decoding.tree.build_tree sums
those weights into the trie counts and the planner keeps the top nodes (REST's top-64).

Differences from the reference, all deliberate: records are joined with a separator token
(-1), so matches and continuations never cross a record boundary (REST concatenates its
corpus without one); occurrences whose continuation is empty (the match ends its record)
are skipped rather than counted; continuations are cut at EOS and at the request's
max_len. The longest matching n is found by a binary search over n instead of REST's
16 -> 2 loop: a suffix of an occurrence is an occurrence, so both give the same n.
"""

from __future__ import annotations

import bisect
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dresd.drafters import Candidates, DraftRequest

SEPARATOR = -1  # joins records in the index; real token ids are >= 0, so it never matches
FORMAT = 1  # version of the .npz layout written by SuffixArrayIndex.save

# Published REST defaults: suffixes of 16 -> 2 tokens, up to 5000 occurrences, 10 tokens each.
MAX_SUFFIX, MIN_SUFFIX, MAX_MATCHES, LONG = 16, 2, 5000, 10


def build_suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Start positions of the suffixes of `tokens`, in lexicographic order of the suffixes.

    Suffixes compare element by element on the token values; a suffix that is a proper
    prefix of another sorts first (the end of the array is smaller than any value). Prefix
    doubling (Manber-Myers, with Larsson-Sadakane's trick of re-sorting only the groups
    still tied): O(n log^2 n) worst case, and only the repeated parts are sorted again.
    Returns int32 when len(tokens) < 2**31, else int64.
    """
    t = np.asarray(tokens).ravel()
    n = len(t)
    out_dtype = np.int32 if n < 2**31 else np.int64
    if n == 0:
        return np.zeros(0, dtype=out_dtype)
    sa = np.argsort(t, kind="stable").astype(np.int64)
    vals = t[sa]
    # rank[i] = the head of suffix i's group: the number of suffixes whose first h tokens
    # are smaller. Suffixes tied on their first h tokens share a group (contiguous in sa).
    head = np.empty(n + 1, dtype=bool)
    head[0], head[n] = True, True
    np.not_equal(vals[1:], vals[:-1], out=head[1:n])
    rank = np.empty(n, dtype=np.int64)
    rank[sa] = np.maximum.accumulate(np.where(head[:n], np.arange(n), 0))
    # Slots of sa still in groups of two or more suffixes.
    active = np.flatnonzero(~(head[:n] & head[1:]))
    h = 1
    while len(active):
        s = sa[active]
        nxt = s + h
        # The rank of the suffix h tokens later; -1 past the end (smaller than every rank).
        second = np.where(nxt < n, rank[np.minimum(nxt, n - 1)], -1)
        first = rank[s]
        # Groups occupy contiguous slots and `first` is each group's head, so sorting the
        # active slots by (first, second) sorts every group within its own slots.
        key = first * (n + 1) + (second + 1)
        order = np.argsort(key, kind="stable")
        key = key[order]
        sa[active] = s[order]
        m = len(active)
        brk = np.empty(m + 1, dtype=bool)
        brk[0], brk[m] = True, True
        np.not_equal(key[1:], key[:-1], out=brk[1:m])
        # The new head of each slot: the slot of the first member of its (sub)group.
        new_rank = np.maximum.accumulate(np.where(brk[:m], active, -1))
        rank[sa[active]] = new_rank  # after every `second` above was read: h-ranks throughout
        active = active[~(brk[:m] & brk[1:])]
        h *= 2
    return sa.astype(out_dtype)


def _lower_bound(tok: memoryview, sa: memoryview, query: list[int], lo: int, hi: int) -> int:
    """First slot in [lo, hi) whose suffix is >= `query` (compared on len(query) tokens)."""
    m = len(query)
    return bisect.bisect_left(range(len(sa)), query, lo, hi, key=lambda x: tok[sa[x] : sa[x] + m].tolist())


def _upper_bound(tok: memoryview, sa: memoryview, query: list[int], lo: int, hi: int) -> int:
    """First slot in [lo, hi) whose suffix, cut to len(query) tokens, is > `query`."""
    m = len(query)
    return bisect.bisect_right(range(len(sa)), query, lo, hi, key=lambda x: tok[sa[x] : sa[x] + m].tolist())


def _views(tokens: np.ndarray, sa: np.ndarray) -> tuple[memoryview, memoryview]:
    """Memoryviews for fast scalar access (indexing one gives a Python int)."""
    return memoryview(np.ascontiguousarray(tokens)), memoryview(np.ascontiguousarray(sa))


def find_range(tokens: np.ndarray, sa: np.ndarray, query: Sequence[int]) -> tuple[int, int]:
    """The slots [lo, hi) of `sa` whose suffixes start with `query` (lo == hi when none).

    `sa` must be build_suffix_array(tokens). A suffix that ends before len(query) tokens
    never matches. Binary search: O(len(query) log n).
    """
    q = [int(x) for x in query]
    tok, sav = _views(tokens, sa)
    lo = _lower_bound(tok, sav, q, 0, len(sav))
    return lo, _upper_bound(tok, sav, q, lo, len(sav))


class SuffixArrayIndex:
    """A token corpus (records joined by SEPARATOR) and its suffix array."""

    def __init__(self, tokens: np.ndarray, sa: np.ndarray, n_records: int):
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        sa = np.ascontiguousarray(sa)
        if sa.dtype not in (np.int32, np.int64) or sa.shape != tokens.shape or tokens.ndim != 1:
            raise ValueError(f"suffix array {sa.dtype}{sa.shape} does not fit tokens {tokens.shape}")
        self.tokens, self.sa, self.n_records = tokens, sa, int(n_records)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_records(cls, records: Iterable[Sequence[int] | np.ndarray]) -> SuffixArrayIndex:
        """Index `records` (token id lists or arrays, ids in [0, 2**31)): each followed by SEPARATOR."""
        parts, sep, n = [], np.array([SEPARATOR], dtype=np.int32), 0
        for record in records:
            arr = np.asarray(record)
            if arr.size and (arr.min() < 0 or arr.max() >= 2**31):
                raise ValueError(f"token ids must lie in [0, 2**31); got {arr.min()}..{arr.max()}")
            parts += [arr.astype(np.int32, copy=False).ravel(), sep]
            n += 1
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return cls(tokens, build_suffix_array(tokens), n)

    @classmethod
    def from_datastore(cls, store: Any) -> SuffixArrayIndex:
        """Index a dresd Datastore's live records (the same token streams every method drafts
        from; records a delete reached are left out)."""
        return cls.from_records(store.live_records())

    def save(self, path: str | Path) -> Path:
        """Write the index to `path` (.npz) atomically: the file appears only when complete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:  # a file object: np.savez adds no suffix
                np.savez(f, format=np.int64(FORMAT), tokens=self.tokens, sa=self.sa,
                         n_records=np.int64(self.n_records))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> SuffixArrayIndex:
        """Read an index written by save()."""
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z or int(z["format"]) != FORMAT:
                raise ValueError(f"{path}: not a suffix-array index of format {FORMAT}")
            return cls(z["tokens"], z["sa"], int(z["n_records"]))

    @classmethod
    def cached(cls, path: str | Path, records: Any) -> SuffixArrayIndex:
        """load(path) if it exists, else built by `records()` (a callable) and saved there."""
        path = Path(path)
        if path.is_file():
            return cls.load(path)
        index = cls.from_records(records())
        index.save(path)
        return index


class RestSuffixDrafter:
    """REST drafts: continuations of the context's longest matching suffix in the corpus.

    propose() returns every distinct continuation (<= `long` tokens, cut at the record's
    end, EOS and request.max_len) weighted by how many of the gathered occurrences it
    follows; `total` is the number of occurrences gathered, so a trie node's support is
    the share of occurrences whose continuation passes through it (REST's trie counts).
    """

    def __init__(
        self,
        index: SuffixArrayIndex,
        eos_id: int | None,
        max_suffix: int = MAX_SUFFIX,
        min_suffix: int = MIN_SUFFIX,
        max_matches: int = MAX_MATCHES,
        long: int = LONG,
        name: str = "rest",
        max_nodes: int | None = None,
    ):
        if min_suffix < 1 or max_suffix < min_suffix:
            raise ValueError(f"need 1 <= min_suffix <= max_suffix, got {min_suffix}, {max_suffix}")
        if max_matches < 1 or long < 1:
            raise ValueError(f"max_matches and long must be >= 1, got {max_matches}, {long}")
        if max_nodes is not None and max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1 or None, got {max_nodes}")
        self.index = index
        self.eos_id = eos_id
        self.max_suffix, self.min_suffix = max_suffix, min_suffix
        self.max_matches, self.long = max_matches, long
        self.name = name
        # None: every distinct continuation (the planner picks the top nodes). An int: only
        # the paths to the max_nodes most supported trie nodes, each node with its full
        # count (the same top nodes for a count-ranked planner, far fewer paths to merge).
        self.max_nodes = max_nodes
        self._tok, self._sa = _views(index.tokens, index.sa)
        self.last_suffix = 0  # suffix length the last propose() matched (0 = none)

    def begin(self, prompt_ids: list[int]) -> None:
        """Nothing to do: the datastore is static."""

    def end(self, generated: list[int]) -> None:
        """Nothing to do: REST's datastore is built once, offline."""

    def _followed(self, query: list[int]) -> tuple[int, int]:
        """Slots whose suffix is `query` followed by a real token (not SEPARATOR or the end).

        Those come last among the suffixes starting with `query`: the separator is
        smaller than every token and the end is smaller still."""
        tok, sa, n = self._tok, self._sa, len(self._sa)
        lo = _lower_bound(tok, sa, query + [0], 0, n)
        return lo, _upper_bound(tok, sa, query, lo, n)

    def match(self, context: Sequence[int]) -> tuple[int, int, int]:
        """(n, lo, hi): the longest n in [min_suffix, max_suffix] whose last n context tokens
        occur followed by a real token, and those occurrences' slots; (0, 0, 0) if none.

        Equals REST's loop from max_suffix down (stop at the first hit): if the last n
        tokens occur at i with a continuation, the last n - 1 occur at i + 1 with the same
        one, so "has a hit" is monotone in n and a binary search finds the same n."""
        top = min(self.max_suffix, len(context))
        if top < self.min_suffix:
            return 0, 0, 0
        tail = [int(t) for t in context[-top:]]
        best = (0, 0, 0)
        lo_n, hi_n = self.min_suffix, top
        while lo_n <= hi_n:
            n = (lo_n + hi_n) // 2
            lo, hi = self._followed(tail[top - n :])
            if hi > lo:
                best = (n, lo, hi)
                lo_n = n + 1
            else:
                hi_n = n - 1
        return best

    def propose(self, request: DraftRequest) -> Candidates:
        """Distinct continuations after request.context[-1], weighted by their occurrences."""
        out = Candidates()
        width = min(self.long, request.max_len)
        n, lo, hi = self.match(request.context) if width > 0 else (0, 0, 0)
        self.last_suffix = n
        if n == 0:
            return out
        # REST keeps the first k occurrences in suffix-array order. The continuations of
        # consecutive slots are sorted rows, so equal rows stay adjacent through every cut.
        starts = self.index.sa[lo : min(hi, lo + self.max_matches)].astype(np.int64) + n
        tokens = self.index.tokens
        # Every index ends with SEPARATOR, and a row stops at its first one: clipping only
        # ever reads that final separator again.
        rows = tokens[np.minimum(starts[:, None] + np.arange(width), len(tokens) - 1)]
        dead = np.maximum.accumulate(rows < 0, axis=1)  # at or after the record's end
        if self.eos_id is not None and width > 1:
            eos = np.maximum.accumulate(rows == self.eos_id, axis=1)
            dead[:, 1:] |= eos[:, :-1]  # after the first EOS (the EOS itself is kept)
        rows[dead] = SEPARATOR
        new = np.ones(len(rows), dtype=bool)
        new[1:] = np.any(rows[1:] != rows[:-1], axis=1)
        first = np.flatnonzero(new)
        counts = np.diff(np.append(first, len(rows)))
        unique = rows[first]  # distinct continuations, still in sorted order
        if self.max_nodes is not None:
            unique, counts = _top_nodes(unique, counts, self.max_nodes)
        order = np.argsort(-counts, kind="stable")  # most frequent first; ties in corpus order
        unique, counts = unique[order], counts[order]
        lengths = (unique >= 0).sum(axis=1)  # real tokens form a prefix of each row
        paths = unique.tolist()
        for i in np.flatnonzero(lengths < unique.shape[1]).tolist():  # most rows are full
            paths[i] = paths[i][: lengths[i]]
        out.paths = paths
        out.weights = counts.astype(float).tolist()
        out.sources = [self.name] * len(out.paths)
        out.total = float(len(rows))
        return out


def _top_nodes(rows: np.ndarray, counts: np.ndarray, max_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Paths and weights whose trie holds exactly the `max_nodes` most supported nodes.

    `rows`: distinct continuations in sorted order (SEPARATOR-padded), `counts`: their
    occurrences. A trie node's count is the summed count of the rows through it. The
    nodes kept are the first `max_nodes` by (count desc, depth asc), a subtree since a
    child never outcounts its parent (REST's top-`choices` selection). Each kept node is
    returned as a path weighted by its count minus its kept children's, so build_tree
    gives every kept node its full count. Ties at the cut are broken by corpus order.
    """
    n_rows, width = rows.shape
    changed = np.ones((n_rows, width), dtype=bool)
    changed[1:] = rows[1:] != rows[:-1]
    changed = np.logical_or.accumulate(changed, axis=1)  # row i starts a new prefix at depth d
    cum = np.concatenate([[0], np.cumsum(counts)])
    starts, node_row, node_depth, node_count = [], [], [], []
    for d in range(width):
        first = np.flatnonzero(changed[:, d])  # the runs of rows sharing their first d + 1 tokens
        count = cum[np.append(first[1:], n_rows)] - cum[first]
        real = rows[first, d] >= 0
        starts.append(first)
        node_row.append(first[real])
        node_depth.append(np.full(int(real.sum()), d))
        node_count.append(count[real])
    node_row, node_depth = np.concatenate(node_row), np.concatenate(node_depth)
    node_count = np.concatenate(node_count)
    if len(node_row) <= max_nodes:
        return rows, counts
    keep = np.lexsort((node_depth, -node_count))[:max_nodes]
    row, depth, count = node_row[keep], node_depth[keep], node_count[keep]
    residual = {(r, d): c for r, d, c in zip(row.tolist(), depth.tolist(), count.tolist())}
    for r, d, c in zip(row.tolist(), depth.tolist(), count.tolist()):
        if d:  # the parent: the depth d - 1 run holding row r (kept, as the set is a subtree)
            parent = int(starts[d - 1][np.searchsorted(starts[d - 1], r, side="right") - 1])
            residual[(parent, d - 1)] -= c
    out = np.full((len(keep), width), SEPARATOR, dtype=rows.dtype)
    weights = np.zeros(len(keep), dtype=np.int64)
    for i, (r, d) in enumerate(zip(row.tolist(), depth.tolist())):
        out[i, : d + 1] = rows[r, : d + 1]
        weights[i] = residual[(r, d)]
    live = weights > 0  # a node whose count its children account for comes with them
    return out[live], weights[live]
