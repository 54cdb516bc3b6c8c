"""A decoder that serves requests: one model, one open datastore version, and a request
check that names what is wrong instead of failing inside the model.

`Decoder` answers `DecodeRequest`s with `DecodeResponse`s. Bad input gives `ok=False` and a
message, never a dead decoder. Before each request it reads the root's CURRENT pointer (one
small file) and, when a new version was published, opens it: versions switch BETWEEN
requests, never during one, and every response names the version it used. `pin(version)`
freezes the version. A version is verified in full (every file's sha256, once per node:
dresd.datastore.integrity.verify_once) before it serves; one that fails is refused, the old
one keeps serving, and `info()["refused"]` says why (that bookkeeping is
dresd.serving.versions', shared with the HTTP replicas). It runs in-process or as a Ray
actor (dresd.serving.pool).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field

from dresd.config import ModelConfig, SpeculativeConfig
from dresd.config.schema import sampling_problems
from dresd.datastore.store import DatastoreError
from dresd.config import SamplingParams
from dresd.decoding.engine import Engine
from dresd.drafters.registry import available_methods
from dresd.model.loading import load_model
from dresd.serving.versions import VersionFollower

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
    method: str = "dresd"  # a registered method (dresd.drafters.registry.available_methods())
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
    problems = sampling_problems(req.temperature, req.top_p)
    if problems:
        return "; ".join(problems)
    if req.temperature > 0 and req.verify != "tree" and req.method != "greedy":
        return "speculative sampling (temperature > 0) needs verify 'tree'"
    return None


class Decoder:
    """A model plus an open datastore version, answering requests one at a time.

    Use it directly in-process, or as a Ray actor (dresd.serving.pool). Thread-safe: requests,
    version switches and pins are serialised by one lock; `info()` never waits for it.
    """

    def __init__(self, name: str, model: ModelConfig, datastore_root: str | None = None,
                 speculative: SpeculativeConfig | None = None, prompt_format: str = "chat"):
        self.name = name
        self.root = str(datastore_root) if datastore_root else None
        self.spec = speculative or SpeculativeConfig()
        self.lm = load_model(model)
        # The datastore version (followed, pinned, refused) and the Engine built over it.
        self._versions = VersionFollower(self.root, name, lambda store: Engine(self.lm, store, prompt_format))
        self._lock = threading.Lock()
        self._served = 0
        self._busy: str | None = None  # request id being decoded

    @property
    def engine(self) -> Engine:
        return self._versions.current

    @property
    def version(self) -> str | None:
        return self._versions.version

    @property
    def _pinned(self) -> str | None:
        return self._versions.pinned

    def _follow(self) -> None:
        """Switch to the root's CURRENT version if it moved (call with the lock held)."""
        self._versions.follow()

    def _pin(self, version: str | None) -> None:
        self._versions.pin(version)

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
                "requests_served": self._served, "busy": self._busy, "pid": os.getpid(),
                "refused": dict(self._versions.refused)}

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
