"""One decoding replica's work: continuous batching over the datastore version it serves.

`ReplicaEngine` owns one loaded model and a background thread. Requests (`Job`s) arrive in
an inbox; between decoding steps the thread admits them into a
dresd.decoding.batch_spec.BatchedSpeculativeDecoder (one per method and budget in use, up
to `max_batch` sequences each, the rest waiting for a slot), runs one draft -> verify ->
accept step of every busy batch, and tells each job what it emitted through `job.notify`
(called on the thread: the caller, dresd.serving.decode_server, hands events to its own
event loop).

Versions switch between requests, never during one: each admitted job is decoded entirely
by the batch set of the version that was current when it arrived (`VersionBatches`). When
a new version is followed (dresd.serving.versions), the old set keeps stepping its jobs to
their end and is dropped once idle, so no request mixes versions and none fails.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from dresd.config import SamplingParams, ServeConfig
from dresd.datastore.formatting import format_prompt_ids
from dresd.decoding.batch_spec import BatchRequest
from dresd.decoding.engine import Engine
from dresd.decoding.metrics import DecodeMetrics
from dresd.serving.metrics import ServeMetrics
from dresd.serving.versions import VersionFollower

log = logging.getLogger(__name__)

# How long the idle loop sleeps before looking at its deadlines and reporting metrics again.
IDLE_WAIT_S = 0.5


@dataclass
class Event:
    """What a job learns from the replica: "started" (admitted: prompt_tokens, version),
    "tokens" (every token emitted so far), "done" (finish, tokens, metrics) or "error"
    (status, message; no more events follow)."""

    kind: str
    tokens: list[int] = field(default_factory=list)
    version: str | None = None
    prompt_tokens: int = 0
    finish: str | None = None  # "stop" (EOS or a stop string) | "length"
    metrics: DecodeMetrics | None = None
    status: int = 0
    message: str = ""
    param: str | None = None  # the request field an error is about


class Refused(ValueError):
    """A job that cannot be decoded here, naming the request field at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class Job:
    """One request inside a replica. `prompt` (laid out in the version's prompt format) or
    `messages` (chat turns); `notify` receives its Events on the replica's thread."""

    notify: Callable[[Event], None]
    max_tokens: int
    method: str
    budget: str
    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: SamplingParams | None = None
    deadline: float = float("inf")  # time.monotonic() past which it is cancelled (504)
    # Least seconds between "tokens" events after the first: the stream's pace. Each event
    # carries every token so far, so a step left untold loses nothing.
    every: float = 0.0
    arrived: float = field(default_factory=time.monotonic)
    # Set by the replica.
    prompt_tokens: int = 0
    version: str | None = None
    sent: int = 0  # tokens already notified
    told_at: float = float("-inf")  # time.monotonic() of the last "tokens" event
    first_token_at: float | None = None


def tell(job: "Job", event: Event) -> None:
    """Hand `event` to the job's listener; a listener already gone (its event loop closed
    while the replica shuts down) must not stop the decoding thread."""
    try:
        job.notify(event)
    except RuntimeError:
        log.warning("a request's listener is gone; dropped its %s event", event.kind)


def chat_prompt_ids(tokenizer, messages: list[dict], prompt_format: str) -> list[int]:
    """Chat turns laid out for the model: one user turn exactly as `dresd generate` lays out
    a prompt; several turns through the chat template ("qa": the turns' text joined)."""
    if len(messages) == 1 and messages[0]["role"] == "user" or prompt_format == "qa":
        text = "\n".join(m["content"] for m in messages)
        return format_prompt_ids(tokenizer, text, prompt_format)
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    out = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return [int(t) for t in out]


class VersionBatches:
    """An Engine over one datastore version and the batched decoders its jobs run in."""

    def __init__(self, engine: Engine, cfg: ServeConfig, previous: VersionBatches | None = None):
        self.engine, self.cfg = engine, cfg
        self.decoders: dict[tuple[str, str], object] = {}  # (method, budget) -> BatchedSpeculativeDecoder
        # What the set this one replaces (same model) learnt, per decoder: it seeds ours.
        self.seeds = {key: d.calibration() for key, d in previous.decoders.items()} if previous else {}
        self.jobs: dict[tuple[tuple[str, str], int], Job] = {}

    @property
    def version(self) -> str | None:
        return self.engine.datastore.version if self.engine.datastore is not None else None

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    def admit(self, job: Job) -> None:
        """Lay out the prompt and queue it in its method's batch; ValueError when it cannot be."""
        key = (job.method, job.budget)
        if key not in self.decoders:
            spec = dataclasses.replace(self.cfg.speculative, method=job.method, budget=job.budget, verify="tree")
            try:
                self.decoders[key] = self.engine.batched_decoder(spec, self.cfg.max_batch)
                if key in self.seeds:
                    self.decoders[key].inherit(self.seeds.pop(key))
            except ValueError as exc:  # e.g. a method that needs a datastore, on a server without one
                raise Refused("dresd.method", f"dresd.method {job.method!r}: {exc}") from None
        lm = self.engine.lm
        if job.messages is not None:
            ids = chat_prompt_ids(lm.tokenizer, job.messages, self.engine.prompt_format)
        else:
            ids = self.engine.prompt_ids(job.prompt)
        if len(ids) >= lm.max_context:
            raise Refused("messages" if job.messages is not None else "prompt",
                          f"the prompt has {len(ids)} tokens; the model's context is {lm.max_context}")
        rid = self.decoders[key].submit(BatchRequest(ids, job.max_tokens, job.sampling))
        job.prompt_tokens, job.version = len(ids), self.version
        self.jobs[(key, rid)] = job

    def cancel(self, job: Job) -> tuple[bool, DecodeMetrics | None]:
        """Stop `job` between steps: (whether it was here, its counters so far if decoding)."""
        for (key, rid), held in list(self.jobs.items()):
            if held is job:
                gen = self.decoders[key].cancel(rid)
                del self.jobs[(key, rid)]
                return True, (gen.metrics if gen is not None and gen.token_ids else None)
        return False, None

    @property
    def running(self) -> int:
        """Jobs decoding in a batch slot (the others wait for one)."""
        return sum(len(d.partial()) for d in self.decoders.values())

    def step(self) -> list[tuple[Job, list[int], DecodeMetrics]]:
        """One step of every busy batch: notifies new tokens; returns the jobs that finished."""
        done = []
        for key, decoder in self.decoders.items():
            if not decoder.busy:
                continue
            for rid, gen in decoder.step():
                job = self.jobs.pop((key, rid), None)
                if job is not None:
                    done.append((job, gen.token_ids, gen.metrics))
            now = time.monotonic()  # when this step's tokens exist: a first token's time, and the pace's
            for rid, tokens in decoder.partial().items():
                job = self.jobs.get((key, rid))
                if job is not None and len(tokens) > job.sent and now >= job.told_at + job.every:
                    # Paced here, not only where the stream is written: every event wakes the
                    # replica's event loop, whose Python competes with this thread's for the
                    # GIL and, on a small node, for the cores.
                    job.sent, job.told_at = len(tokens), now
                    job.first_token_at = job.first_token_at or now
                    tell(job, Event("tokens", tokens, job.version))
        return done


class ReplicaEngine:
    """A model, the version it follows, and the thread that decodes its jobs in batches."""

    def __init__(self, cfg: ServeConfig, name: str, lm=None):
        from dresd.model.loading import load_model

        self.cfg, self.name = cfg, name
        self.lm = lm if lm is not None else load_model(cfg.model)
        self.metrics = ServeMetrics(name)
        self._versions = VersionFollower(cfg.datastore, name, self._batches, pin_file=True)
        self.metrics.version = self._versions.version
        self._draining: list[VersionBatches] = []  # older versions finishing their jobs
        self._inbox: deque[tuple[str, Job, str]] = deque()
        self._wake = threading.Condition()
        self._stop = False
        self._lock = threading.Lock()  # metrics snapshots read from other threads
        self._thread = threading.Thread(target=self._run, name=f"{name}-decode", daemon=True)
        self._thread.start()

    def _batches(self, store) -> VersionBatches:
        versions = getattr(self, "_versions", None)  # None while the first version opens
        previous = versions.current if versions is not None else None
        return VersionBatches(Engine(self.lm, store, self.cfg.prompt_format), self.cfg, previous)

    @property
    def version(self) -> str | None:
        return self._versions.version

    @property
    def alive(self) -> bool:
        """Whether the decoding thread runs (it stops only on close())."""
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self._post("submit", job, "")

    def cancel(self, job: Job, reason: str = "aborted") -> None:
        """Stop `job` ("aborted": its client left, no event; "stop": a stop string ended it,
        a done event with its counters follows)."""
        self._post("cancel", job, reason)

    def _post(self, what: str, job: Job, reason: str) -> None:
        with self._wake:
            self._inbox.append((what, job, reason))
            self._wake.notify()

    def count(self, outcome: str) -> None:
        """Count a request that ended before reaching the decoding thread (refused at the door)."""
        with self._lock:
            self.metrics.outcome(outcome)

    def snapshot(self) -> dict:
        with self._lock:
            return self.metrics.snapshot()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the decoding thread

    def _sets(self) -> list[VersionBatches]:
        return [*self._draining, self._versions.current]

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._inbox and not any(s.busy for s in self._sets()) and not self._stop:
                    self._wake.wait(IDLE_WAIT_S)
                if self._stop:
                    break
                inbox, self._inbox = list(self._inbox), deque()
            try:
                if not inbox and not any(s.busy for s in self._sets()):
                    self._follow()  # idle: a new version is opened (and verified) before it is asked for
                self._handle(inbox)
                self._step()
            except Exception as exc:  # a bug must not leave requests waiting forever
                log.exception("%s: decoding step failed", self.name)
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}")
        self._fail_all("the replica is shutting down", status=503)

    def _handle(self, inbox: list[tuple[str, Job, str]]) -> None:
        for what, job, reason in inbox:
            if what == "cancel":
                self._cancel(job, reason)
                continue
            self._follow()
            batches = self._versions.current
            try:
                batches.admit(job)
            except ValueError as exc:
                param = getattr(exc, "param", "messages" if job.messages is not None else "prompt")
                self._end(job, "bad_request", Event("error", status=400, message=str(exc), param=param))
                continue
            tell(job, Event("started", version=job.version, prompt_tokens=job.prompt_tokens))

    def _follow(self) -> None:
        old = self._versions.current
        if self._versions.follow() and old.busy:  # between requests: the old set drains
            self._draining.append(old)

    def _cancel(self, job: Job, reason: str) -> None:
        for batches in self._sets():
            found, metrics = batches.cancel(job)
            if found:
                break
        else:
            return  # it ended already (its last event is out)
        if reason == "stop":
            self._end(job, "success", Event("done", finish="stop", metrics=metrics or DecodeMetrics(),
                                            version=job.version, prompt_tokens=job.prompt_tokens))
        elif reason == "timeout":
            self._end(job, "timeout", Event("error", status=504,
                                            message=f"request deadline of {self.cfg.request_timeout_s}s passed"))
        else:
            self._end(job, "aborted", None)

    def _step(self) -> None:
        now = time.monotonic()
        for batches in self._sets():
            for job in [j for j in batches.jobs.values() if j.deadline < now]:
                self._cancel(job, "timeout")
            for job, tokens, metrics in batches.step():
                finish = "stop" if tokens and tokens[-1] == self.lm.eos_token_id else "length"
                self._end(job, "success", Event("done", tokens, job.version, job.prompt_tokens, finish, metrics))
        self._draining = [s for s in self._draining if s.busy]
        with self._lock:
            m = self.metrics
            running = sum(s.running for s in self._sets())
            m.gauges["dresd:num_requests_running"] = running
            m.gauges["dresd:num_requests_waiting"] = sum(len(s.jobs) for s in self._sets()) - running + len(self._inbox)
            m.version = self.version

    def _end(self, job: Job, outcome: str, event: Event | None) -> None:
        now = time.monotonic()
        metrics = event.metrics if event is not None else None
        with self._lock:
            m = self.metrics
            m.outcome(outcome)
            if metrics is not None:
                m.finished(metrics, job.prompt_tokens)
                m.observe("dresd:e2e_request_latency_seconds", now - job.arrived)
                if job.first_token_at is not None:
                    m.observe("dresd:time_to_first_token_seconds", job.first_token_at - job.arrived)
                    if metrics.new_tokens > 1:
                        m.observe("dresd:time_per_output_token_seconds",
                                  (now - job.first_token_at) / (metrics.new_tokens - 1))
        if event is not None:
            tell(job, event)

    def _fail_all(self, message: str, status: int = 500) -> None:
        """Answer every job held with an error (the loop is broken or stopping)."""
        jobs = [j for s in self._sets() for j in s.jobs.values()]
        for s in self._sets():
            s.jobs.clear()
            s.decoders.clear()
        self._draining = []
        with self._wake:
            jobs += [job for what, job, _ in self._inbox if what == "submit"]
            self._inbox.clear()
        for job in jobs:
            self._end(job, "error", Event("error", status=status, message=message))
