"""The DReSD dense drafter: nearest neighbours of the target's own hidden state."""

from __future__ import annotations

import numpy as np

from dresd.compression import compress
from dresd.config import SpeculativeConfig
from dresd.datastore import Datastore
from dresd.index import search, set_search_params, IndexParams


def drafts_from_values(values: np.ndarray, last_token: int, num_drafts: int, len_drafts: int, eos_id: int) -> list[list[int]]:
    """Filter neighbour values on the token just emitted and cut them into drafts.

    `values[r]` are the tokens after neighbour r (rank order); `values[r, 0]` is the token
    that neighbour predicted, so only rows whose first value equals `last_token` continue
    the current text. Each draft is values[r, 1 : 1 + len_drafts], cut after its first EOS;
    exact duplicates are dropped and at most `num_drafts` are kept.
    """
    drafts: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for row in values[values[:, 0] == last_token]:
        draft = row[1 : 1 + len_drafts].tolist()
        if eos_id in draft:
            draft = draft[: draft.index(eos_id) + 1]
        key = tuple(draft)
        if not draft or key in seen:
            continue
        seen.add(key)
        drafts.append(draft)
        if len(drafts) >= num_drafts:
            break
    return drafts


class DenseDrafter:
    """Compress the query, search the datastore, filter and cut drafts."""

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

    def propose(self, query: np.ndarray, last_token: int, max_len: int) -> list[list[int]]:
        """Ranked drafts of at most min(len_drafts, max_len) tokens."""
        length = min(self.spec.len_drafts, max_len)
        if length <= 0:
            return []
        ids = self.neighbours(compress(self.store.compressor, query))
        if len(ids) == 0:
            return []
        values = self.store.values(ids, length + 1)
        return drafts_from_values(values, last_token, self.spec.num_drafts, length, self.store.eos_id)
