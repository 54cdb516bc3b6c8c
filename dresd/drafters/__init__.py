"""Draft proposers. Each turns decoding state into a ranked list of draft token lists."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Drafter(Protocol):
    """What the decoding loop asks of a drafter."""

    def propose(self, query: np.ndarray, last_token: int, max_len: int) -> list[list[int]]:
        """Ranked drafts to follow `last_token`, each at most `max_len` tokens.

        `query` is the target's last-layer hidden state that produced `last_token`.
        """
        ...
