"""Prompt lookup decoding (PLD): drafts copied from the request's own context.

The last n tokens of the context (n = max_ngram down to min_ngram) are looked up earlier
in the context; the tokens that followed a match are the draft. With `max_matches=1` this
is Hugging Face's `prompt_lookup_num_tokens` (first occurrence, one draft of up to
`num_tokens`); more matches give several weighted candidates for a tree.
"""

from __future__ import annotations

import numpy as np

from dresd.drafters import Candidates, DraftRequest, truncate_at


def lookup_drafts(context: np.ndarray, max_ngram: int, min_ngram: int, num_tokens: int,
                  max_matches: int) -> list[tuple[list[int], int]]:
    """(draft, n-gram length) for the matches of the context's last n-gram, longest n first.

    Matches are taken in order of occurrence (as HF does); a draft is the up to
    `num_tokens` tokens after the match, never reaching into the n-gram itself.
    """
    out: list[tuple[list[int], int]] = []
    seen: set[tuple[int, ...]] = set()
    length = len(context)
    for n in range(max_ngram, min_ngram - 1, -1):
        if length <= n:
            continue
        gram = context[-n:]
        # Candidate starts: every position where the gram's first token occurs, before the tail.
        starts = np.flatnonzero(context[: length - n] == gram[0])
        for s in starts:
            if not np.array_equal(context[s : s + n], gram):
                continue
            draft = context[s + n : min(s + n + num_tokens, length)].tolist()
            if draft and tuple(draft) not in seen:
                seen.add(tuple(draft))
                out.append((draft, n))
                if len(out) >= max_matches:
                    return out
        if out:
            return out  # longer n-grams win: shorter ones only when these found nothing
    return out


class PromptLookupDrafter:
    """Drafts from n-gram matches in the prompt and the text generated so far."""

    def __init__(self, max_ngram: int = 2, min_ngram: int = 1, num_tokens: int = 10, max_matches: int = 1,
                 eos_id: int | None = None, name: str = "pld"):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.num_tokens, self.max_matches = num_tokens, max_matches
        self.eos_id = eos_id
        self.name = name

    def begin(self, prompt_ids: list[int]) -> None:
        """Per-request state lives in the request's context: nothing to reset."""

    def sibling(self) -> "PromptLookupDrafter":
        """Itself: it holds no per-request state, so concurrent requests share it."""
        return self

    def end(self, generated: list[int]) -> None:
        """Nothing carries over between requests."""

    def propose(self, request: DraftRequest) -> Candidates:
        """Up to `max_matches` drafts, weighted by the matched n-gram's length.

        The source names the n-gram length ("pld:2"), so the draft budget calibrates
        2-gram and 1-gram matches apart: they are not equally reliable.
        """
        out = Candidates()
        length = min(self.num_tokens, request.max_len)
        if length <= 0:
            return out
        context = np.asarray(request.context, dtype=np.int64)
        for draft, n in lookup_drafts(context, self.max_ngram, self.min_ngram, length, self.max_matches):
            out.add(truncate_at(draft, length, self.eos_id), float(n), f"{self.name}:{n}")
        return out
