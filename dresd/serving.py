"""Serving: Ray actors that each hold a model and an open datastore version, and a pool
that spreads requests over them.

- `Decoder` (plain class) / `DecoderActor` (its Ray actor form) answers `DecodeRequest`s
  with `DecodeResponse`s. Bad input gives `ok=False` and a message, never a dead actor.
  Before each request an actor reads the root's CURRENT pointer (one small file) and, when
  a new version was published, opens it: versions switch BETWEEN requests, never during
  one, and every response names the version it used. `pin(version)` freezes the version.
- `DecoderPool` starts named actors, routes each request to the least-loaded one, and
  re-runs a request whose actor died, so every submitted request gets a response.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError

from dresd.acceptance import SamplingParams
from dresd.config import ModelConfig, SpeculativeConfig
from dresd.datastore import Datastore, DatastoreError, read_current, set_current
from dresd.drafters.factory import available_methods
from dresd.engine import Engine
from dresd.models import load_model

log = logging.getLogger(__name__)

VERIFIERS = ("tree", "batch")
# Ray re-runs a task on the restarted actor this many times when its actor dies mid-task;
# the pool resubmits on top of that (DecoderPool.max_attempts). Finite on purpose: a request
# that itself kills its actor (e.g. out of memory) must not loop forever.
MAX_TASK_RETRIES = 2


@dataclass
class DecodeRequest:
    """One generation request. temperature 0 = greedy, > 0 = top-p sampling; with any
    method the output follows the model's own distribution exactly (speculative sampling)."""

    prompt: str
    max_new_tokens: int = 128
    method: str = "dresd"  # a registered method (dresd.drafters.factory.available_methods())
    verify: str = "tree"  # "tree" | "batch"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampling seed (None = random)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass
class DecodeResponse:
    """The answer to one request; `ok=False` carries `error` and no tokens."""

    request_id: str
    ok: bool
    error: str | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # DecodeMetrics.summary()
    datastore_version: str | None = None  # the version this request was decoded with
    actor: str = ""  # name of the actor that answered


def check_request(req) -> str | None:
    """The reason `req` cannot be served, or None (the context limit is checked later)."""
    if not isinstance(req, DecodeRequest):
        return f"expected a DecodeRequest, got {type(req).__name__}"
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        return "prompt is empty"
    if req.method not in available_methods():
        return f"unknown method {req.method!r}; expected one of {available_methods()}"
    if req.verify not in VERIFIERS:
        return f"unknown verify {req.verify!r}; expected one of {list(VERIFIERS)}"
    if not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
        return f"max_new_tokens must be an integer >= 1, got {req.max_new_tokens!r}"
    if not req.temperature >= 0:
        return f"temperature must be >= 0, got {req.temperature!r}"
    if not 0 < req.top_p <= 1:
        return f"top_p must be in (0, 1], got {req.top_p!r}"
    if req.temperature > 0 and req.verify != "tree" and req.method != "greedy":
        return "speculative sampling (temperature > 0) needs verify 'tree'"
    return None


class Decoder:
    """A model plus an open datastore version, answering requests one at a time.

    Use it directly in-process, or as `DecoderActor` under Ray. Thread-safe: requests,
    version switches and pins are serialised by one lock; `info()` never waits for it.
    """

    def __init__(self, name: str, model: ModelConfig, datastore_root: str | None = None,
                 speculative: SpeculativeConfig | None = None, prompt_format: str = "chat"):
        self.name = name
        self.root = str(datastore_root) if datastore_root else None
        self.spec = speculative or SpeculativeConfig()
        self.lm = load_model(model)
        self.engine = Engine(self.lm, Datastore(self.root) if self.root else None, prompt_format)
        self._lock = threading.Lock()
        self._pinned: str | None = None
        self._refused: dict[str, str] = {}  # version -> why it could not be opened
        self._served = 0
        self._busy: str | None = None  # request id being decoded

    @property
    def version(self) -> str | None:
        return self.engine.datastore.version if self.engine.datastore is not None else None

    def _open(self, version: str) -> None:
        # A fresh Engine over the same loaded model: only the datastore (and drafters) change.
        self.engine = Engine(self.lm, Datastore(self.root, version), self.engine.prompt_format)
        log.info("%s: now serving datastore version %s", self.name, version)

    def _follow(self) -> None:
        """Switch to the root's CURRENT version if it moved (call with the lock held)."""
        if self.root is None or self._pinned is not None:
            return
        want = read_current(self.root)  # None: a bare version folder, or a transient read failure
        if not want or want == self.version or want in self._refused:
            return
        try:
            self._open(want)
        except Exception as exc:  # incompatible or broken version: keep serving the old one
            self._refused[want] = str(exc)
            log.error("%s: cannot open datastore version %s, staying on %s: %s", self.name, want, self.version, exc)

    def _pin(self, version: str | None) -> None:
        if version is None:
            self._pinned = None
            self._follow()
            return
        if self.root is None:
            raise DatastoreError("this decoder has no datastore root to pin a version of")
        if version != self.version:
            self._open(version)  # raises DatastoreError for a missing or incomplete version
        self._pinned = version

    def pin(self, version: str | None) -> str | None:
        """Serve `version` until unpinned (None = follow CURRENT again); takes effect after
        the request in progress. Returns the version now open."""
        with self._lock:
            self._pin(version)
            return self.version

    def refresh(self) -> str | None:
        """Follow CURRENT now (after the request in progress) instead of at the next request."""
        with self._lock:
            self._follow()
            return self.version

    def info(self) -> dict:
        return {"actor": self.name, "version": self.version, "pinned": self._pinned,
                "requests_served": self._served, "busy": self._busy, "pid": os.getpid()}

    def serve(self, request: DecodeRequest, pin: str | None) -> DecodeResponse:
        """`generate` under the caller's pin state (a pool sends its own with every request,
        so a restarted actor, which starts unpinned, converges before decoding)."""
        with self._lock:
            if pin != self._pinned:
                try:
                    self._pin(pin)
                except Exception as exc:
                    return DecodeResponse(getattr(request, "request_id", ""), False, f"cannot pin {pin!r}: {exc}",
                                          datastore_version=self.version, actor=self.name)
            return self._generate(request)

    def generate(self, request: DecodeRequest) -> DecodeResponse:
        """Answer one request; errors come back as ok=False responses."""
        with self._lock:
            return self._generate(request)

    def _generate(self, req: DecodeRequest) -> DecodeResponse:
        rid = getattr(req, "request_id", "")
        error = check_request(req)
        if error is None:
            self._follow()
        version = self.version
        self._busy = rid
        try:
            if error is not None:
                return DecodeResponse(rid, False, error, datastore_version=version, actor=self.name)
            ids = self.engine.prompt_ids(req.prompt)
            if len(ids) >= self.lm.max_context:
                raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.lm.max_context}")
            spec = dataclasses.replace(self.spec, method=req.method, verify=req.verify)
            sampling = SamplingParams(req.temperature, req.top_p, req.seed) if req.temperature > 0 else None
            gen = self.engine.decoder(spec).generate_ids(ids, req.max_new_tokens, sampling)
            text = self.lm.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
            return DecodeResponse(rid, True, None, text, list(gen.token_ids), gen.metrics.summary(), version, self.name)
        except (ValueError, DatastoreError) as exc:
            return DecodeResponse(rid, False, str(exc), datastore_version=version, actor=self.name)
        except Exception as exc:  # a bug must not take the actor down with it
            log.exception("%s: request %s failed", self.name, rid)
            return DecodeResponse(rid, False, f"internal error: {type(exc).__name__}: {exc}",
                                  datastore_version=version, actor=self.name)
        finally:
            self._served += 1
            self._busy = None


# max_concurrency=2: `info`/`pin` calls are accepted while a request runs (requests
# themselves still run one at a time under the decoder's lock).
DecoderActor = ray.remote(max_restarts=-1, max_task_retries=MAX_TASK_RETRIES, max_concurrency=2)(Decoder)


class DecoderPool:
    """`size` named decoder actors ("dresd-decoder-<pool id>-<i>") behind one client.

    Guarantees: every request passed to `generate` gets exactly one response back. An actor
    that dies mid-request is restarted by Ray (max_restarts=-1), which re-runs the request
    on it (up to MAX_TASK_RETRIES times); if that fails too, the pool resubmits the request
    to the least-loaded actor (recreating any actor that is gone for good), up to
    `max_attempts` submissions in all, and after that answers ok=False. A re-run decodes
    from scratch (greedy output is deterministic, so the text is the same; a re-run may
    use a newer datastore version, and its response says which). `submit` alone only has
    Ray's re-runs: its ref raises RayActorError once those are exhausted.
    Pins are remembered by the pool and re-applied to restarted actors.
    """

    def __init__(self, model: ModelConfig, datastore_root: str | None, size: int, num_cpus: float = 1.0,
                 threads: int = 1, speculative: SpeculativeConfig | None = None, num_gpus: float = 0.0,
                 max_attempts: int = 3):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            ray.init(address=address) if address else ray.init(include_dashboard=False)
        self.pool_id = uuid.uuid4().hex[:8]
        self.root = str(datastore_root) if datastore_root else None
        self._args = (dataclasses.replace(model, threads=threads), self.root, speculative)
        # One OpenBLAS thread in the decoders, set before their numpy loads (see dresd/cli.py).
        self._options = dict(num_cpus=num_cpus, num_gpus=num_gpus,
                             runtime_env={"env_vars": {"OPENBLAS_NUM_THREADS": "1"}})
        self.max_attempts = max_attempts
        self.names = [f"dresd-decoder-{self.pool_id}-{i}" for i in range(size)]
        self.actors = [self._start(i) for i in range(size)]
        self._inflight: list[list[ray.ObjectRef]] = [[] for _ in range(size)]
        self._lock = threading.Lock()
        self._next = 0
        self._pinned: str | None = None
        try:  # wait for the models to load, so a bad model or datastore fails here
            ray.get([a.info.remote() for a in self.actors])
        except Exception:
            self.shutdown()
            raise

    def _start(self, i: int):
        return DecoderActor.options(name=self.names[i], **self._options).remote(self.names[i], *self._args)

    def _pick(self) -> int:
        """Least in-flight requests; ties go round-robin."""
        with self._lock:
            for refs in self._inflight:
                if refs:
                    _, refs[:] = ray.wait(refs, num_returns=len(refs), timeout=0)
            n = len(self.actors)
            i = min(range(n), key=lambda j: (len(self._inflight[j]), (j - self._next) % n))
            self._next = (i + 1) % n
            return i

    def _submit(self, request: DecodeRequest) -> tuple[ray.ObjectRef, int]:
        i = self._pick()
        ref = self.actors[i].serve.remote(request, self._pinned)
        with self._lock:
            self._inflight[i].append(ref)
        return ref, i

    def submit(self, request: DecodeRequest) -> ray.ObjectRef:
        """Send one request to the least-loaded actor; `ray.get` gives its DecodeResponse."""
        return self._submit(request)[0]

    def _recover(self, i: int) -> None:
        """Recreate actor i if it is gone for good (a restarting actor keeps its name)."""
        try:
            ray.get_actor(self.names[i])
        except ValueError:
            log.warning("decoder %s is dead; starting a new one", self.names[i])
            try:
                self.actors[i] = self._start(i)
            except ValueError:  # the name is still held: someone else recreated it
                self.actors[i] = ray.get_actor(self.names[i])

    def generate(self, requests: list[DecodeRequest]) -> list[DecodeResponse]:
        """Decode `requests` concurrently over the pool; responses in request order."""
        out: list[DecodeResponse | None] = [None] * len(requests)
        attempts = [1] * len(requests)
        pending = {}
        for k, req in enumerate(requests):
            ref, i = self._submit(req)
            pending[ref] = (k, i)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                k, i = pending.pop(ref)
                rid = getattr(requests[k], "request_id", "")
                try:
                    out[k] = ray.get(ref)
                except RayActorError as exc:
                    if attempts[k] >= self.max_attempts:
                        out[k] = DecodeResponse(rid, False, f"gave up after {attempts[k]} attempts: {exc}")
                        continue
                    log.warning("request %s lost its actor %s; resubmitting", rid, self.names[i])
                    self._recover(i)
                    attempts[k] += 1
                    ref2, i2 = self._submit(requests[k])
                    pending[ref2] = (k, i2)
                except Exception as exc:  # e.g. a request that cannot be serialised
                    out[k] = DecodeResponse(rid, False, f"{type(exc).__name__}: {exc}")
        return out  # type: ignore[return-value]

    def infos(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors])

    def versions(self) -> dict[str, str | None]:
        """{actor name: datastore version it has open}."""
        return {d["actor"]: d["version"] for d in self.infos()}

    def pin(self, version: str | None) -> dict[str, str | None]:
        """Pin every actor to `version` (None = follow CURRENT); returns once all switched."""
        self._pinned = version
        return dict(zip(self.names, ray.get([a.pin.remote(version) for a in self.actors])))

    def unpin(self) -> dict[str, str | None]:
        return self.pin(None)

    def refresh(self) -> dict[str, str | None]:
        """Make unpinned actors follow CURRENT now (after their request in progress) rather
        than at their next request; returns {actor name: version}."""
        return dict(zip(self.names, ray.get([a.refresh.remote() for a in self.actors])))

    def rollback(self, version: str) -> dict[str, str | None]:
        """Point the root's CURRENT at an older `version` and make unpinned actors follow now
        (pinned ones stay pinned). Every client of the root follows, not only this pool."""
        if self.root is None:
            raise DatastoreError("this pool has no datastore root")
        set_current(self.root, version)
        return self.refresh()

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors, self._inflight = [], []

    def __enter__(self) -> "DecoderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
