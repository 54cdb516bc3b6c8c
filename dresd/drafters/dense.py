"""The DReSD dense drafter: nearest neighbours of the target's own hidden state."""

from __future__ import annotations

import numpy as np

from dresd.compression import compress
from dresd.config import SpeculativeConfig
from dresd.datastore import Datastore
from dresd.drafters import Candidates, DraftRequest, truncate_at
from dresd.index import search, set_search_params, IndexParams


def drafts_from_values(values: np.ndarray, last_token: int, num_drafts: int, len_drafts: int, eos_id: int,
                       source: str = "dense") -> Candidates:
    """Filter neighbour values on the token just emitted and cut them into weighted drafts.

    `values[r]` are the tokens after neighbour r (rank order); `values[r, 0]` is the token
    that neighbour predicted, so only rows whose first value equals `last_token` continue
    the current text. Each draft is values[r, 1 : 1 + len_drafts], cut after its first EOS;
    a draft's weight counts the neighbours that give exactly it, at most `num_drafts`
    distinct drafts are kept in rank order, and the evidence total is every neighbour
    retrieved, so a node's support is the share of all neighbours that lead through it.
    """
    out = Candidates()
    index: dict[tuple[int, ...], int] = {}
    for row in values[values[:, 0] == last_token]:
        draft = truncate_at(row[1 : 1 + len_drafts].tolist(), len_drafts, eos_id)
        key = tuple(draft)
        if not draft:
            continue
        if key in index:
            out.weights[index[key]] += 1.0
        elif len(out) < num_drafts:
            index[key] = len(out)
            out.add(draft, 1.0, source)
    out.total = float(len(values))
    return out


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

    def neighbours(self, key: np.ndarray) -> np.ndarray:
        """Ids of the top-k neighbours of a compressed query, deleted keys left out."""
        _, ids = search(self.store.index, key, self.spec.top_k)
        ids = ids[0][ids[0] >= 0]
        if self.store.deleted is not None:
            ids = ids[~self.store.deleted[ids]]
        return ids

    def begin(self, prompt_ids: list[int]) -> None:
        """Stateless across steps: nothing to reset."""

    def end(self, generated: list[int]) -> None:
        """The datastore is static at decode time: nothing to learn."""

    def propose(self, request: DraftRequest) -> Candidates:
        """Weighted drafts of at most min(len_drafts, max_len) tokens."""
        length = min(self.spec.len_drafts, request.max_len)
        if length <= 0 or request.query is None:
            return Candidates()
        ids = self.neighbours(compress(self.store.compressor, request.query))
        if len(ids) == 0:
            return Candidates()
        values = self.store.values(ids, length + 1)
        return drafts_from_values(values, request.context[-1], self.spec.num_drafts, length, self.store.eos_id)
