"""DReSD's dense drafters: nearest neighbours of the target's own hidden state.

`DenseDrafter` searches the datastore (other texts); `ContextDenseDrafter` searches the
keys of the request's own text, which the decoding loop hands over as verification
produces them, so a continuation the model already wrote in a similar state is drafted
again (prompt lookup, matched on the whole hidden state instead of the last n tokens).
"""

from __future__ import annotations

import numpy as np

from dresd.datastore.compression import Compressor
from dresd.config import SpeculativeConfig
from dresd.datastore.store import Datastore
from dresd.drafters import Candidates, DraftRequest, truncate_at
from dresd.datastore.index import search, set_search_params, IndexParams


def drafts_from_values(values: np.ndarray, last_token: int, num_drafts: int, len_drafts: int, eos_id: int,
                       source: str = "dense", weights: np.ndarray | None = None,
                       pad: int | None = None) -> Candidates:
    """Filter neighbour values on the token just emitted and cut them into weighted drafts.

    `values[r]` are the tokens after neighbour r (rank order); `values[r, 0]` is the token
    that neighbour predicted, so only rows whose first value equals `last_token` continue
    the current text. Each draft is values[r, 1 : 1 + len_drafts], cut after its first EOS;
    a draft's weight sums the weights of the neighbours that give exactly it (1 each by
    default), at most `num_drafts` distinct drafts are kept in rank order, and the evidence
    total is every neighbour retrieved, so a node's support is the share of all neighbours'
    weight that leads through it. `pad` marks the end of a value row shorter than the rest.
    """
    out = Candidates()
    index: dict[tuple[int, ...], int] = {}
    weights = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = values[:, 0] == last_token
    for row, w in zip(values[keep], weights[keep]):
        draft = row[1 : 1 + len_drafts].tolist()
        if pad is not None and pad in draft:
            draft = draft[: draft.index(pad)]
        draft = truncate_at(draft, len_drafts, eos_id)
        key = tuple(draft)
        if not draft:
            continue
        if key in index:
            out.weights[index[key]] += float(w)
        elif len(out) < num_drafts:
            index[key] = len(out)
            out.add(draft, float(w), source)
    out.total = float(weights.sum())
    return out


def similarity_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Neighbour weights exp((score - best) / temperature); all ones when temperature is 0.

    Scores are cosine similarities of compressed keys: the closest neighbours of a query
    continue its text far more often than the 50th, so they should carry more evidence.
    """
    if temperature <= 0 or len(scores) == 0:
        return np.ones(len(scores))
    return np.exp((scores - scores.max()) / temperature)


class DenseDrafter:
    """Compress the query, search the datastore, filter and cut drafts."""

    name = "dense"

    def __init__(self, store: Datastore, spec: SpeculativeConfig):
        if spec.len_drafts + 1 > store.value_len:
            raise ValueError(
                f"len_drafts={spec.len_drafts} needs values of {spec.len_drafts + 1} tokens; "
                f"the datastore stores {store.value_len}"
            )
        self.store = store
        self.spec = spec
        set_search_params(store.index, IndexParams(**store.manifest["index"]["params"]), spec.nprobe)

    def neighbours(self, key: np.ndarray, with_scores: bool = False):
        """Ids of the top-k neighbours of a compressed query (and their scores), deleted keys left out."""
        scores, ids = search(self.store.index, key, self.spec.top_k)
        keep = ids[0] >= 0
        if self.store.deleted is not None:
            keep &= ~self.store.deleted[np.maximum(ids[0], 0)]
        return (ids[0][keep], scores[0][keep]) if with_scores else ids[0][keep]

    def begin(self, prompt_ids: list[int]) -> None:
        """Stateless across steps: nothing to reset."""

    def sibling(self) -> "DenseDrafter":
        """Itself: it holds no per-request state, so concurrent requests share it."""
        return self

    def end(self, generated: list[int]) -> None:
        """The datastore is static at decode time: nothing to learn."""

    def propose(self, request: DraftRequest) -> Candidates:
        """Weighted drafts of at most min(len_drafts, max_len) tokens."""
        length = min(self.spec.len_drafts, request.max_len)
        if length <= 0 or request.query is None:
            return Candidates()
        ids, scores = self.neighbours(request.compressed(self.store.compressor)[-1:], with_scores=True)
        if len(ids) == 0:
            return Candidates()
        values = self.store.values(ids, length + 1)
        weights = similarity_weights(scores, self.spec.sim_temperature)
        return drafts_from_values(values, request.context[-1], self.spec.num_drafts, length, self.store.eos_id,
                                  weights=weights)


class ContextDenseDrafter:
    """Dense retrieval over the request's own positions: their keys, the text after them as values.

    Keys are compressed with the datastore's compressor (the same space as the store's
    keys). Position i's key predicts context[i + 1]; neighbours of the query whose
    predicted token equals the token just emitted continue with context[i + 2 :].
    """

    name = "dense-ctx"

    def __init__(self, compressor: Compressor, spec: SpeculativeConfig, eos_id: int):
        self.compressor = compressor
        self.spec = spec
        self.eos_id = eos_id
        self._keys = np.empty((0, compressor.components.shape[1]), dtype=np.float32)

    def sibling(self) -> "ContextDenseDrafter":
        """A drafter with its own request keys over the same compressor."""
        return ContextDenseDrafter(self.compressor, self.spec, self.eos_id)

    def begin(self, prompt_ids: list[int]) -> None:
        """A new request: forget the previous request's keys."""
        self._keys = self._keys[:0]

    def end(self, generated: list[int]) -> None:
        """Keys are per request: nothing carries over."""

    def propose(self, request: DraftRequest) -> Candidates:
        """Drafts copied from after the request's positions closest to the query."""
        if request.new_keys is not None and len(request.new_keys):
            self._keys = np.concatenate([self._keys, request.compressed(self.compressor)])
        length = min(self.spec.len_drafts, request.max_len)
        context = request.context
        # Keys cover positions 0 .. len(context) - 2; the last one is the query itself.
        n = len(self._keys)
        if length <= 0 or n != len(context) - 1 or n < 2:
            return Candidates()
        scores = self._keys[: n - 1] @ self._keys[n - 1]
        top = np.argsort(-scores, kind="stable")[: self.spec.top_k]
        ids = np.asarray(context, dtype=np.int64)
        # Value rows: the predicted token then the draft, -1 past the end of the text.
        values = np.full((len(top), length + 1), -1, dtype=np.int64)
        for r, i in enumerate(top):
            tail = ids[i + 1 : i + 2 + length]
            values[r, : len(tail)] = tail
        weights = similarity_weights(scores[top], self.spec.sim_temperature)
        return drafts_from_values(values, context[-1], self.spec.num_drafts, length, self.eos_id,
                                  source=self.name, weights=weights, pad=-1)
