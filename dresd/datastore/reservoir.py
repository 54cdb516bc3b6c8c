"""A streaming reservoir: a uniform sample of fixed size from a stream of vectors."""

from __future__ import annotations

import numpy as np


class Reservoir:
    """Algorithm R over row batches: after any prefix of the stream, `sample` is a uniform
    random subset of min(size, seen) rows. Deterministic for a seed and a stream order."""

    def __init__(self, size: int, dim: int, seed: int = 0, dtype=np.float32):
        self.size = size
        self.seen = 0
        self._rows = np.empty((size, dim), dtype=dtype)
        self._rng = np.random.default_rng(seed)

    def add(self, batch: np.ndarray) -> None:
        """Offer every row of `batch` to the reservoir, in order."""
        batch = np.asarray(batch)
        n = len(batch)
        fill = max(0, min(self.size - self.seen, n))
        if fill:
            self._rows[self.seen : self.seen + fill] = batch[:fill]
        if n > fill:
            # Row t (0-based over the whole stream) replaces slot j ~ U[0, t] when j < size.
            t = self.seen + np.arange(fill, n)
            j = (self._rng.random(len(t)) * (t + 1)).astype(np.int64)
            for src, slot in zip(np.nonzero(j < self.size)[0] + fill, j[j < self.size]):
                self._rows[slot] = batch[src]
        self.seen += n

    @property
    def sample(self) -> np.ndarray:
        """The current sample (a view; copy it to keep it past further `add` calls)."""
        return self._rows[: min(self.size, self.seen)]
