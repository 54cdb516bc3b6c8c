"""The one fake drafter of the tests: the Drafter protocol (dresd.drafters.Drafter) around a
function that maps each DraftRequest to its drafts, with every call recorded.

A test that needs special drafting behaviour passes its own `draft` function (or a fixed
Candidates); the protocol, the recording and the turning of plain paths into Candidates
live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dresd.drafters import Candidates, DraftRequest

# What a draft function may return: Candidates as they are, or plain paths (weight 1 each).
Drafts = Candidates | Sequence[Sequence[int]]


def candidates(paths: Sequence[Sequence[int]] = (), weights: Sequence[float] | None = None,
               sources: Sequence[str] | str = "fake", total: float | None = None) -> Candidates:
    """Candidates built as given, empty paths included (Candidates.add would drop them)."""
    paths = [[int(t) for t in p] for p in paths]
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    sources = [sources] * len(paths) if isinstance(sources, str) else list(sources)
    return Candidates(paths, weights, sources, total)


class FakeDrafter:
    """A drafter whose proposals come from `draft` (a function of the request, or fixed
    Candidates / paths returned at every call). It keeps what it was told and what it
    answered: `begun` (prompts), `ended` (generated tokens), `requests` (as handed over),
    `contexts` (each request's context when it came: the decoding loop extends that list
    in place afterwards) and `proposed`."""

    def __init__(self, draft: Callable[[DraftRequest], Drafts] | Drafts = (), name: str = "fake"):
        self.name = name
        self.draft = draft
        self.begun: list[list[int]] = []
        self.ended: list[list[int]] = []
        self.requests: list[DraftRequest] = []
        self.contexts: list[list[int]] = []
        self.proposed: list[Candidates] = []

    def begin(self, prompt_ids: list[int]) -> None:
        self.begun.append(list(prompt_ids))

    def end(self, generated: list[int]) -> None:
        self.ended.append(list(generated))

    def propose(self, request: DraftRequest) -> Candidates:
        drafts = self.draft(request) if callable(self.draft) else self.draft
        if not isinstance(drafts, Candidates):
            drafts = candidates([p for p in drafts if len(p)], sources=self.name)
        self.requests.append(request)
        self.contexts.append(list(request.context))
        self.proposed.append(drafts)
        return drafts


def continuation(text: Sequence[int], length: int, strict: bool = True) -> Callable[[DraftRequest], list[list[int]]]:
    """A draft function proposing the next `length` tokens of `text` (at most max_len) after
    a context that `text` starts with. `strict`: a context that leaves `text` fails the test
    (the decoder diverged from it); otherwise it gets no drafts."""
    text = list(text)

    def draft(request: DraftRequest) -> list[list[int]]:
        n = len(request.context)
        if list(request.context) != text[:n]:
            assert not strict, f"the context left the expected text at position {n}"
            return []
        return [text[n : n + min(length, request.max_len)]]

    return draft
