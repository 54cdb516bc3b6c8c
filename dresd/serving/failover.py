"""One request's events from the decoding deployment, retried once when its replica dies.

The HTTP ingress (dresd.serving.ingress) opens a call to a decoding replica and relays the
events it yields. A replica can die mid-request (killed, out of memory, a crash in native
code, or the request itself crashing it). `Attempts.events()` then decides:

- nothing of the answer reached the client yet (`committed` is still False): the request is
  sent again, once, to whichever replica Serve picks (another one, or the restarted one),
  with the time left before its deadline; a `{"kind": "retry"}` event tells the consumer to
  forget what it gathered of the first attempt;
- text already reached the client, or the retry's replica died too: `ReplicaDied` is raised,
  and the consumer answers one error (a JSON 503, or a stream's terminal error event).

Nothing here knows Ray: the caller gives the call factory and the exception types that mean
"the replica died", so the policy is tested with fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable, Protocol

log = logging.getLogger(__name__)

# Attempts after the first when a replica dies before any text reached the client: one, so
# a request that itself crashes replicas takes down two at most, never the whole app.
RETRIES = 1
# Seconds past a request's deadline before the ingress stops waiting for the next event (the
# decoding replica answers 504 itself at the deadline; this covers a silent one).
DEADLINE_SLACK_S = 10.0


async def within(awaitable: Any, seconds: float) -> Any:
    """`await awaitable`, or TimeoutError after `seconds`. Unlike `asyncio.wait_for` on Python
    3.11, a cancellation that lands in the loop turn where the awaitable completes is never
    swallowed: wait_for returns the result instead, and a replica or ingress whose client
    has left keeps decoding the abandoned request to its end."""
    async with asyncio.timeout(seconds):
        return await awaitable


class Call(Protocol):
    """One streaming call to a decoding replica (Serve's DeploymentResponseGenerator)."""

    def __anext__(self) -> Any: ...

    def cancel(self) -> None: ...


class ReplicaDied(Exception):
    """The decoding replica serving the request died and no retry is left (or allowed)."""

    def __init__(self, attempts: int, committed: bool, cause: BaseException):
        self.attempts, self.committed = attempts, committed
        if committed:
            why = "after part of the answer was sent (a stream is not restarted)"
        else:
            why = f"on each of {attempts} attempts" if attempts > 1 else "and the request cannot be retried"
        super().__init__(f"the decoding replica serving this request died {why}: "
                         f"{type(cause).__name__}")


class Attempts:
    """The events of one request, over at most 1 + RETRIES calls.

    `open(timeout_s)` starts a call that should finish within `timeout_s`; `is_death(exc)`
    says whether an exception from it means its replica died. The consumer sets `committed`
    once any text of the answer reached its client: from then on a death is not retried.
    """

    def __init__(self, open: Callable[[float], Call], deadline: float, is_death: Callable[[BaseException], bool],
                 retries: int = RETRIES, slack_s: float = DEADLINE_SLACK_S):
        self.open, self.deadline, self.is_death = open, deadline, is_death
        self.retries, self.slack_s = retries, slack_s
        self.committed = False
        self.attempts = 0

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    async def events(self) -> AsyncIterator[dict]:
        """The events of the call in progress; `{"kind": "retry"}` before a retry's events.
        Raises ReplicaDied, asyncio.TimeoutError (no event by the deadline plus slack), or
        whatever else the call raised (BackPressureError and the like: not a death)."""
        while True:
            self.attempts += 1
            call = self.open(max(self._left(), 0.001))
            finished = False
            try:
                while True:
                    try:
                        event = await within(call.__anext__(), max(self._left(), 0.0) + self.slack_s)
                    except StopAsyncIteration:
                        finished = True
                        return
                    except Exception as exc:
                        if not self.is_death(exc):
                            raise
                        finished = True  # a dead replica's call needs no cancelling
                        if self.committed or self.attempts > self.retries:
                            raise ReplicaDied(self.attempts, self.committed, exc) from exc
                        log.warning("decoding replica died before answering (attempt %d: %s); retrying once",
                                    self.attempts, type(exc).__name__)
                        break
                    yield event
            finally:
                if not finished:  # the consumer left early, timed out, or failed: free the slot
                    call.cancel()
            yield {"kind": "retry", "attempt": self.attempts + 1}
