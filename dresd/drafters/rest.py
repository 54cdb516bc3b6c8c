"""The REST baseline: drafts retrieved from a token datastore by the `draftretriever` library.

What PyPI's `draftretriever` 0.1.1 (the only release, cp311 wheel) really is, measured here:
it is ADED's fork of REST's Rust retriever, not REST's suffix array. `Writer(path,
vocab_size)` + `add_entry(list)` + `finalize()` write a *trigram table*: for every two
consecutive tokens (a, b) inside one record, the relative frequency of each next token.
File layout (little endian): u64 number of keys, then per key i32 a, i32 b, u64 m and m
pairs (i32 token, f32 probability). Nothing crosses a record boundary.
`Reader(path).search(query, k, choices, long)` returns a 5-tuple `(paths, draft_attn_mask,
tree_indices, draft_position_ids, retrieve_indices)`; only `paths` matters here: up to
~`choices` trie nodes as token lists (1 to 4 tokens, right-padded with -2, in random order,
found by a randomised tree search), or `[]` five times on a miss. Only the query's LAST TWO
tokens are used; `long` (and seemingly `k`) is ignored: drafts never exceed 4 tokens.
No frequencies are returned. Two inputs abort the whole Python process (a Rust panic):
a query of fewer than 2 tokens, and `choices` < 2; both are refused before the call.
So this baseline is REST's interface and datastore corpus with ADED's retrieval: drafts of
at most 4 tokens, keyed on two tokens; published REST numbers are not directly comparable.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dresd.drafters import Candidates, DraftRequest, truncate_at

# Defaults of the published REST set-up (FasterDecoding/REST): suffixes 16 -> 2 tokens,
# up to 5000 matches, a top-64 draft tree, continuations of up to 10 tokens.
MAX_SUFFIX, MIN_SUFFIX, CHOICES, TOP_K, LONG = 16, 2, 64, 5000, 10


def _as_ids(record: Sequence[int] | np.ndarray, vocab_size: int) -> list[int]:
    """`record` as a list of Python ints, each checked to lie in [0, vocab_size)."""
    ids = record.tolist() if isinstance(record, np.ndarray) else [int(t) for t in record]
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got {min(ids)}..{max(ids)} "
            "(vocab_size must count added tokens: pass len(tokenizer))"
        )
    return ids


def build_rest_index(path: str | Path, records: Iterable[Sequence[int]], vocab_size: int) -> dict[str, int]:
    """Write a draftretriever datastore of `records` (token streams) to `path` atomically.

    Returns {"records", "tokens", "bytes"}. `vocab_size` must include added tokens (pass
    len(tokenizer)); every id is checked against it. The file appears only when complete.
    """
    import draftretriever

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    n_records = n_tokens = 0
    # Records are validated in Python before add_entry, so the writer never raises and its
    # only reference is this local: `del writer` then really drops it. That matters because
    # the Rust writer's destructor finalizes again, re-creating the file at `tmp`.
    writer = draftretriever.Writer(str(tmp), vocab_size)
    try:
        for record in records:
            ids = _as_ids(record, vocab_size)
            writer.add_entry(ids)
            n_records += 1
            n_tokens += len(ids)
        writer.finalize()  # raises a Python error on I/O failure (the destructor would abort)
        del writer  # rewrites the same bytes; must happen before the rename, not after
        os.replace(tmp, path)
    except BaseException:
        writer = None  # noqa: F841 - drop it (and its final write) before removing the partial file
        tmp.unlink(missing_ok=True)
        raise
    return {"records": n_records, "tokens": n_tokens, "bytes": path.stat().st_size}


def rest_index_from_datastore(store: Any, path: str | Path, vocab_size: int) -> dict[str, int]:
    """Build the REST datastore from a dresd Datastore's own live records (the same token
    streams; records a delete reached are left out, as every drafter leaves them out)."""
    return build_rest_index(path, store.live_records(), vocab_size)


class TrigramTable:
    """The datastore file's trigram probabilities, read with numpy for path weights.

    The library keeps these probabilities to itself; reading them back gives each
    retrieved path a real probability instead of a guess (see RestDrafter.propose).
    """

    def __init__(self, path: str | Path):
        raw = np.fromfile(path, dtype=np.uint8)
        n_keys = int(raw[:8].view("<u8")[0]) if len(raw) >= 8 else -1
        if len(raw) % 4 or not 0 <= n_keys <= (len(raw) - 8) // 16:  # a key takes >= 16 bytes
            raise ValueError(f"{path}: not a draftretriever 0.1.1 datastore ({len(raw)} bytes)")
        self._words = raw[8:].view("<i4")
        words = memoryview(self._words).cast("B").cast("i")
        heads = np.empty(n_keys, dtype=np.int64)
        pos = 0
        for i in range(n_keys):  # variable-length entries: one sequential pass
            heads[i] = pos
            if pos + 4 > len(words) or words[pos + 3] != 0:
                raise ValueError(f"{path}: not a draftretriever 0.1.1 datastore (bad entry {i})")
            pos += 4 + 2 * words[pos + 2]
        if pos != len(words):
            raise ValueError(f"{path}: not a draftretriever 0.1.1 datastore (trailing bytes)")
        a = self._words[heads].astype(np.int64)
        b = self._words[heads + 1].astype(np.int64)
        keys = (a << 32) | (b & 0xFFFFFFFF)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._starts = heads[order] + 4
        self._counts = self._words[heads + 2][order].astype(np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    def _pairs(self, a: int, b: int) -> np.ndarray:
        """The (token, probability) words stored after the two tokens (a, b)."""
        key = (int(a) << 32) | (int(b) & 0xFFFFFFFF)
        i = int(np.searchsorted(self._keys, key))
        if i == len(self._keys) or self._keys[i] != key:
            return self._words[:0]
        return self._words[self._starts[i] : self._starts[i] + 2 * self._counts[i]]

    def next_probs(self, a: int, b: int) -> dict[int, float]:
        """{next token: probability} after the two tokens (a, b); {} when unseen."""
        pairs = self._pairs(a, b)
        return dict(zip(pairs[0::2].tolist(), pairs[1::2].view("<f4").tolist()))

    def prob(self, a: int, b: int, token: int) -> float:
        """P(token | a, b) in the datastore; 0 when unseen. A scan in numpy: frequent keys
        have thousands of successors, too many to turn into a dict per lookup."""
        pairs = self._pairs(a, b)
        hit = np.flatnonzero(pairs[0::2] == token)
        return float(pairs[1::2].view("<f4")[hit[0]]) if len(hit) else 0.0


class RestDrafter:
    """REST drafts: the continuation trie of the context's suffix in the token datastore."""

    def __init__(
        self,
        path: str | Path,
        eos_id: int | None,
        max_suffix: int = MAX_SUFFIX,
        min_suffix: int = MIN_SUFFIX,
        choices: int = CHOICES,
        k: int = TOP_K,
        long: int = LONG,
        name: str = "rest",
    ):
        import draftretriever

        if min_suffix < 2 or max_suffix < min_suffix:
            # A query shorter than 2 tokens kills the process inside draftretriever 0.1.1.
            raise ValueError(f"need 2 <= min_suffix <= max_suffix, got {min_suffix}, {max_suffix}")
        if choices < 2:
            raise ValueError(f"choices must be >= 2 (draftretriever 0.1.1 aborts below), got {choices}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"REST datastore {self.path} does not exist (build it with build_rest_index)")
        self.eos_id = eos_id
        self.max_suffix, self.min_suffix = max_suffix, min_suffix
        self.choices, self.k, self.long = choices, k, long
        self.name = name
        self.reader = draftretriever.Reader(str(self.path))
        self.table = TrigramTable(self.path)

    def begin(self, prompt_ids: list[int]) -> None:
        """Nothing to do: the datastore is static."""

    def end(self, generated: list[int]) -> None:
        """Nothing to do: draftretriever has no append API (a datastore is rebuilt whole)."""

    def search(self, query: list[int]) -> list[list[int]]:
        """The library's candidate paths for `query` (>= 2 tokens), padding removed."""
        if len(query) < 2:
            raise ValueError("draftretriever 0.1.1 crashes on queries shorter than 2 tokens")
        paths = self.reader.search(query, k=self.k, choices=self.choices, long=self.long)[0]
        out = []
        for p in paths:
            # Paths are right-padded with -2 (-1 appears only in the tree buffers).
            n = next((i for i, t in enumerate(p) if t < 0), len(p))
            if n:
                out.append(list(p[:n]))
        return out

    def path_prob(self, context_tail: Sequence[int], path: Sequence[int], cache: dict) -> float:
        """Trigram probability of `path` following the two tokens `context_tail`.

        `cache` maps (a, b, token) to its probability within one call: the leaves of a
        trie share their prefixes, so most lookups repeat."""
        a, b = int(context_tail[-2]), int(context_tail[-1])
        prob = 1.0
        for t in path:
            if (a, b, t) not in cache:
                cache[(a, b, t)] = self.table.prob(a, b, t)
            prob *= cache[(a, b, t)]
            a, b = b, t
        return prob

    def propose(self, request: DraftRequest) -> Candidates:
        """Candidate paths after request.context[-1], weighted by their trigram probability."""
        out = Candidates()
        context = request.context
        if request.max_len <= 0 or len(context) < self.min_suffix:
            return out  # never search with < 2 tokens: it would kill the process
        # REST tries suffixes from max_suffix down to min_suffix and keeps the first that
        # matches. draftretriever 0.1.1 keys on the last two tokens only, so every length
        # returns the same candidates: one search with the longest suffix is that loop
        # without its repeated misses.
        query = [int(t) for t in context[-self.max_suffix :]]
        paths = self.search(query)
        if not paths:
            return out
        # The library returns trie nodes (prefixes included); keep the leaves, whose
        # prefixes are implied. Weights: the library gives no frequencies and its order is
        # random, so rank means nothing; a leaf's trigram probability (the product of the
        # datastore's next-token frequencies along it) is the evidence REST's counts stand
        # for. A node's support is then the probability mass of the kept leaves below it.
        inner = {tuple(p[:i]) for p in paths for i in range(1, len(p))}
        merged: dict[tuple[int, ...], float] = {}
        cache: dict[tuple[int, int, int], float] = {}
        for p in paths:
            if tuple(p) in inner:
                continue
            # Floored so that a key missing from the table can never zero a whole call.
            weight = max(self.path_prob(query[-2:], p, cache), 1e-12)
            # Leaves equal after the cut (max_len, EOS) are one candidate with their mass.
            cut = tuple(truncate_at(p, request.max_len, self.eos_id))
            merged[cut] = merged.get(cut, 0.0) + weight
        # Most probable first; ties by tokens so the output does not depend on library order.
        for path, weight in sorted(merged.items(), key=lambda kv: (-kv[1], kv[0])):
            out.add(list(path), weight, self.name)
        # Weights are probabilities: support is measured against the whole mass (1), since
        # the continuations the tree left out back no path.
        out.total = max(1.0, sum(out.weights))
        return out
