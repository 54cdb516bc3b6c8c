"""The decoding deployment: a ReplicaEngine (continuous batching) behind a streaming method.

The HTTP ingress (dresd.serving.ingress) calls `DecodeServer.generate` through a Serve
handle with `stream=True`; it yields small dicts, the events of one request:

    {"kind": "started", "prompt_tokens", "version", "replica"}   admitted into a batch
    {"kind": "text", "text", "tokens"}                            new text; tokens so far
    {"kind": "done", "text", "tokens", "finish", "stats"}         the last text, usage, report
    {"kind": "error", "status", "message", "param"}               nothing follows

One "text" event carries what every decoding step finished since the last one: the steps
that ran while the caller was busy are merged, and after the first text (sent at once) text
leaves at most every STREAM_INTERVAL_S (`Pacer`), so the handle carries a handful of small
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
import dataclasses
import os
import time
from typing import AsyncIterator, Callable

from ray import serve

from dresd.config import ModelConfig, SamplingParams, ServeConfig, from_dict
from dresd.serving import openai_api as oa
from dresd.model.loading import node_threads
from dresd.serving.failover import DEADLINE_SLACK_S, within
from dresd.serving.hub import Reporter
from dresd.serving.replica import Event, Job, ReplicaEngine

CRASH_ENV = "DRESD_SERVE_CRASH_ON"
CRASH_EXIT_CODE = 70  # as dresd.storage.faults' kill: a planned crash, told apart from others
# Seconds a stream's text is gathered before it is sent on (the first text and every other
# event go at once). Each event crosses the Serve handle to the ingress and then the HTTP
# proxy, about 5 ms of CPU over the three processes, competing with the decoding step on a
# small node; sent at every step (~25 ms for the packaged model on 2 cores) that took about a
# tenth of a concurrency-1 stream's throughput (issue 22). 10 text events a second at most,
# several tokens each on a fast model (Ray Serve LLM batches its streams every 50 ms). The
# decoding thread tells a job its tokens at the same pace (Job.every): each event it tells
# wakes this replica's event loop, whose Python competes with decoding for the GIL.
STREAM_INTERVAL_S = 0.1


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
        new, finish = "", event.finish
        if event.tokens and not self.stopped:
            self.tokens = event.tokens
            # A stop string can first show in the last tokens: those a paced stream had not
            # been told yet, or the last step's.
            new, self.stopped = self.text.update(event.tokens, final=True)
        if self.stopped:
            finish = "stop"
        stats = oa.dresd_stats(event.version, self.method, event.metrics)
        return {"kind": "done", "text": new, "tokens": len(self.tokens), "finish": finish, "stats": stats}


class Pacer:
    """The events `generate` yields, text merged so that after the first text at most one text
    event leaves every `interval` seconds; any other event leaves at once, after the text held
    before it."""

    def __init__(self, interval: float):
        self.interval = interval
        self.held: dict | None = None  # text gathered, not sent yet
        self.last: float | None = None  # when the last text left

    def due(self) -> float | None:
        """When the held text must leave (None: none is held)."""
        return None if self.held is None else (self.last or 0.0) + self.interval

    def push(self, outs: list[dict], now: float) -> list[dict]:
        """What to yield now of `outs` (Relay.feed's, in order) and the text held before them."""
        ready: list[dict] = []
        for out in outs:
            if out["kind"] == "text":
                self.held = out if self.held is None else {**out, "text": self.held["text"] + out["text"]}
            else:
                ready += self._flush(now)
                ready.append(out)
        if self.held is not None and (self.last is None or now >= self.last + self.interval):
            ready += self._flush(now)
        return ready

    def _flush(self, now: float) -> list[dict]:
        if self.held is None:
            return []
        out, self.held, self.last = self.held, None, now
        return [out]


def replica_model(model: ModelConfig) -> ModelConfig:
    """The model config a decoding replica loads: with `threads` 0, the thread count
    `dresd generate` gets on this node, not the one Ray leaves. Ray sets OMP_NUM_THREADS to
    an actor's CPUs (replica_cpus: 1 by default) and torch follows it; one thread made every
    prefill and decoding step of a replica slower than the same request in-process (issue 22:
    about 0.3 s a request at concurrency 1 on 2 cores). Set model.threads to share a node's
    cores among several replicas."""
    return model if model.threads > 0 else dataclasses.replace(model, threads=node_threads())


def prompt_text(req: oa.GenerationRequest) -> str:
    return req.prompt if req.prompt is not None else "\n".join(m["content"] for m in req.messages or [])


@serve.deployment(name="DresdDecoder")
class DecodeServer:
    """One decoding replica: a loaded model, the datastore version it follows, its batches."""

    def __init__(self, config: dict, hub):
        cfg = from_dict(ServeConfig, config)
        self.cfg = dataclasses.replace(cfg, model=replica_model(cfg.model))
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
                  time.monotonic() + timeout_s, every=STREAM_INTERVAL_S)
        relay = Relay(self.detokenizer, req, method, lambda: self.engine.cancel(job, "stop"))
        pacer = Pacer(STREAM_INTERVAL_S)
        self.engine.submit(job)
        try:
            while True:
                due = pacer.due()
                wait = timeout_s + DEADLINE_SLACK_S if due is None else max(0.0, due - loop.time())
                try:
                    events = [await within(inbox.get(), wait)]
                except asyncio.TimeoutError:
                    if due is None:
                        yield {"kind": "error", "status": 504, "message": "no answer from the decoding loop",
                               "param": None}
                        return
                    events = []  # the held text is due
                while not inbox.empty():  # steps that finished while we were away: one event
                    events.append(inbox.get_nowait())
                for out in pacer.push(relay.feed(events), loop.time()):
                    if out["kind"] == "started":
                        out["replica"] = self.name
                    yield out
                    if out["kind"] in ("done", "error"):
                        return
        finally:
            self.engine.cancel(job)  # a caller that left (or any early end) frees the slot
