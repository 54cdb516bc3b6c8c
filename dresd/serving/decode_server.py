"""The decoding deployment: a ReplicaEngine (continuous batching) behind a streaming method.

The HTTP ingress (dresd.serving.ingress) calls `DecodeServer.generate` through a Serve
handle with `stream=True`; it yields small dicts, the events of one request:

    {"kind": "started", "prompt_tokens", "version", "replica"}   admitted into a batch
    {"kind": "text", "text", "tokens"}                            new text; tokens so far
    {"kind": "done", "text", "tokens", "finish", "stats"}         the last text, usage, report
    {"kind": "error", "status", "message", "param"}               nothing follows

One "text" event carries what every decoding step finished since the last one (the steps
that ran while the caller was busy are merged), so the handle carries a handful of small
objects per request, never one per token. Text is detokenized here, where the job lives: a
stop string cancels the job between steps and its counters still come back in "done",
which a caller that only saw text could not ask of the right replica.

Test hook: with DRESD_SERVE_CRASH_ON set (build_app passes it on to these replicas), a
replica ends its process at once when a request's prompt or messages contain that text: a
request that crashes its replica, as the fault tests need. Unset, it costs one comparison.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from typing import AsyncIterator, Callable

from ray import serve

from dresd.config import SamplingParams, ServeConfig, from_dict
from dresd.serving import openai_api as oa
from dresd.serving.failover import DEADLINE_SLACK_S
from dresd.serving.hub import Reporter
from dresd.serving.replica import Event, Job, ReplicaEngine

CRASH_ENV = "DRESD_SERVE_CRASH_ON"
CRASH_EXIT_CODE = 70  # as dresd.storage.faults' kill: a planned crash, told apart from others


class Relay:
    """A job's engine Events turned into the events `generate` yields, through the text of
    its tokens with the request's stop strings (`stop()` is called once one appears)."""

    def __init__(self, tokenizer, req: oa.GenerationRequest, method: str, stop: Callable[[], None]):
        self.text = oa.IncrementalText(tokenizer, req.stop)
        self.method, self.stop = method, stop
        self.stopped = False
        self.tokens: list[int] = []  # every token emitted so far (the text counted)

    def feed(self, events: list[Event]) -> list[dict]:
        """The events to yield for `events` (in order): text of consecutive token events merged."""
        out: list[dict] = []
        latest: list[int] | None = None
        for event in events:
            if event.kind == "tokens":
                latest = event.tokens
                continue
            if latest is not None:
                out += self._text(latest)
                latest = None
            if event.kind == "started":
                out.append({"kind": "started", "prompt_tokens": event.prompt_tokens, "version": event.version})
            elif event.kind == "done":
                out.append(self._done(event))
            elif event.kind == "error":
                out.append({"kind": "error", "status": event.status, "message": event.message, "param": event.param})
        if latest is not None:
            out += self._text(latest)
        return out

    def _text(self, tokens: list[int]) -> list[dict]:
        if self.stopped:
            return []  # past a stop string: the tokens decoded meanwhile are not the answer's
        self.tokens = tokens
        new, self.stopped = self.text.update(tokens)
        if self.stopped:
            self.stop()
        return [{"kind": "text", "text": new, "tokens": len(tokens)}] if new else []

    def _done(self, event: Event) -> dict:
        new = ""
        if event.tokens and not self.stopped:
            self.tokens = event.tokens
            new, _ = self.text.update(event.tokens, final=True)
        stats = oa.dresd_stats(event.version, self.method, event.metrics)
        return {"kind": "done", "text": new, "tokens": len(self.tokens), "finish": event.finish, "stats": stats}


def prompt_text(req: oa.GenerationRequest) -> str:
    return req.prompt if req.prompt is not None else "\n".join(m["content"] for m in req.messages or [])


@serve.deployment(name="DresdDecoder")
class DecodeServer:
    """One decoding replica: a loaded model, the datastore version it follows, its batches."""

    def __init__(self, config: dict, hub):
        self.cfg = from_dict(ServeConfig, config)
        context = serve.get_replica_context()
        self.name = str(getattr(context, "replica_tag", None) or f"decoder-{os.getpid()}")
        self.engine = ReplicaEngine(self.cfg, self.name)
        # Text is decoded on the event loop while the decoding thread encodes prompts: a copy
        # keeps the two threads off one Rust tokenizer ("Already borrowed").
        self.detokenizer = copy.deepcopy(self.engine.lm.tokenizer)
        self.crash_on = os.environ.get(CRASH_ENV) or None
        self.reporter = Reporter(hub, self.engine.snapshot, self.name)

    def __del__(self):
        self.reporter.stop()
        self.engine.close()

    def check_health(self) -> None:
        """Serve restarts a replica whose decoding thread is gone."""
        if not self.engine.alive:
            raise RuntimeError(f"{self.name}: the decoding thread has stopped")

    async def generate(self, req: oa.GenerationRequest, timeout_s: float) -> AsyncIterator[dict]:
        """The events of `req` (see the module docstring), decoded within `timeout_s`."""
        if self.crash_on is not None and self.crash_on in prompt_text(req):
            os._exit(CRASH_EXIT_CODE)
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()
        sampling = SamplingParams(req.temperature, req.top_p, req.seed) if req.temperature > 0 else None
        method = req.method or self.cfg.speculative.method
        job = Job(lambda e: loop.call_soon_threadsafe(inbox.put_nowait, e), req.max_tokens, method,
                  req.budget or self.cfg.speculative.budget, req.prompt, req.messages, sampling,
                  time.monotonic() + timeout_s)
        relay = Relay(self.detokenizer, req, method, lambda: self.engine.cancel(job, "stop"))
        self.engine.submit(job)
        try:
            while True:
                try:
                    events = [await asyncio.wait_for(inbox.get(), timeout_s + DEADLINE_SLACK_S)]
                except asyncio.TimeoutError:
                    yield {"kind": "error", "status": 504, "message": "no answer from the decoding loop",
                           "param": None}
                    return
                while not inbox.empty():  # steps that finished while we were away: one event
                    events.append(inbox.get_nowait())
                for out in relay.feed(events):
                    if out["kind"] == "started":
                        out["replica"] = self.name
                    yield out
                    if out["kind"] in ("done", "error"):
                        return
        finally:
            self.engine.cancel(job)  # a caller that left (or any early end) frees the slot
