"""The ingress's retry policy with fake calls (no Ray): one retry while nothing reached the
client, an error after a second death or once text was sent, other errors and deadlines
passed through, and every call left early cancelled."""

from __future__ import annotations

import asyncio
import time

import pytest

from dresd.serving.failover import Attempts, ReplicaDied, within


class Died(Exception):
    """What a fake call raises when its fake replica dies."""


class FakeCall:
    """Yields `events`, then raises `fail` (if any) instead of ending; `delay` before each."""

    def __init__(self, events, fail=None, delay=0.0):
        self.events, self.fail, self.delay = list(events), fail, delay
        self.cancelled = False

    async def __anext__(self):
        await asyncio.sleep(self.delay)
        if self.events:
            return self.events.pop(0)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


def attempts(calls, deadline_s=30.0, slack_s=5.0):
    opened = []

    def open_call(timeout_s):
        assert timeout_s > 0
        opened.append(calls[len(opened)])
        return opened[-1]

    run = Attempts(open_call, time.monotonic() + deadline_s, lambda e: isinstance(e, Died), slack_s=slack_s)
    return run, opened


async def drain(run, commit_on_text=False):
    out = []
    async for event in run.events():
        out.append(event["kind"])
        if commit_on_text and event["kind"] == "text":
            run.committed = True
    return out


STARTED, TEXT, DONE = {"kind": "started"}, {"kind": "text"}, {"kind": "done"}


def test_a_death_before_anything_was_sent_is_retried_once():
    run, opened = attempts([FakeCall([STARTED, TEXT], Died()), FakeCall([STARTED, TEXT, DONE])])
    assert asyncio.run(drain(run)) == ["started", "text", "retry", "started", "text", "done"]
    assert run.attempts == 2 and len(opened) == 2 and not any(c.cancelled for c in opened)


def test_a_second_death_is_an_error_naming_the_dead_replica():
    run, opened = attempts([FakeCall([STARTED], Died()), FakeCall([], Died()), FakeCall([DONE])])
    with pytest.raises(ReplicaDied, match="replica .* died on each of 2 attempts") as err:
        asyncio.run(drain(run))
    assert err.value.attempts == 2 and len(opened) == 2  # the third call never opens


def test_a_death_after_text_reached_the_client_is_not_retried():
    run, opened = attempts([FakeCall([STARTED, TEXT], Died()), FakeCall([DONE])])
    with pytest.raises(ReplicaDied, match="after part of the answer was sent") as err:
        asyncio.run(drain(run, commit_on_text=True))
    assert err.value.committed and len(opened) == 1


def test_other_errors_pass_through_unretried():
    run, opened = attempts([FakeCall([STARTED], ValueError("bad")), FakeCall([DONE])])
    with pytest.raises(ValueError, match="bad"):
        asyncio.run(drain(run))
    assert len(opened) == 1 and opened[0].cancelled


def test_a_silent_replica_times_out_at_the_deadline_and_is_cancelled():
    run, opened = attempts([FakeCall([STARTED, DONE], delay=5.0)], deadline_s=0.05, slack_s=0.05)
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(drain(run))
    assert opened[0].cancelled


def test_a_consumer_that_leaves_early_cancels_the_call():
    run, opened = attempts([FakeCall([STARTED, TEXT, TEXT, DONE])])

    async def leave():
        events = run.events()
        assert (await events.__anext__())["kind"] == "started"
        await events.aclose()

    asyncio.run(leave())
    assert opened[0].cancelled


def test_a_cancel_that_lands_as_an_event_arrives_is_not_swallowed():
    """asyncio.wait_for (Python 3.11) returns the result when the cancel and the event land in
    one loop turn: a replica then decodes an abandoned request to its end."""

    async def race():
        inbox = asyncio.Queue()
        task = asyncio.create_task(within(inbox.get(), 10))
        await asyncio.sleep(0.01)
        inbox.put_nowait("event")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(race())


class QueueCall(FakeCall):
    """A call whose events arrive when the test puts them in `inbox`."""

    def __init__(self):
        super().__init__([])
        self.inbox = asyncio.Queue()

    async def __anext__(self):
        return await self.inbox.get()


def test_a_consumer_cancelled_as_the_next_event_arrives_cancels_the_call():
    call = QueueCall()
    run, opened = attempts([call])

    async def consume():
        task = asyncio.create_task(run.events().__anext__())
        await asyncio.sleep(0.01)
        call.inbox.put_nowait(STARTED)  # the event and the client's leaving, in one loop turn
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(consume())
    assert opened[0].cancelled
