"""A pool of Ray decoder actors behind one client: `DecoderPool` starts named actors (each a
dresd.serving.decoder.Decoder), routes each request to the least-loaded one, and re-runs a
request whose actor died, so every submitted request gets a response.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import uuid

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from dresd.config import ModelConfig, SpeculativeConfig
from dresd.datastore.store import DatastoreError
from dresd.datastore.publish import set_current
from dresd.serving.decoder import MAX_TASK_RETRIES, DecodeRequest, DecodeResponse, Decoder
from dresd.storage.eviction import cache_env
from dresd.storage.pins import pin as record_pin

log = logging.getLogger(__name__)

# How long the pool waits for its actors to start (be placed, load the model and datastore):
# a longer wait means a stuck load or a cluster without room for them, and failing says so
# where waiting would hang the caller.
START_TIMEOUT_S = 900.0
# How long a client waits with no request finishing (generate), or for every actor to answer
# a control call (infos, pin, refresh wait for the request in progress): above the slowest
# request a pool serves, so only a wedged actor hits it, and its clients fail instead of hanging.
REQUEST_TIMEOUT_S = 600.0


@functools.cache
def decoder_actor():
    """`Decoder` as a Ray actor class, made on first use so importing this module starts nothing.

    max_concurrency=2: `info`/`pin` calls are accepted while a request runs (requests
    themselves still run one at a time under the decoder's lock)."""
    return ray.remote(max_restarts=-1, max_task_retries=MAX_TASK_RETRIES, max_concurrency=2)(Decoder)


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
    Pins are remembered by the pool and re-applied to restarted actors, and recorded in the
    datastore root as `pins/pool-<pool id>` (dresd.storage.pins), so that pruning and every
    node's cache keep the pinned version; `unpin` and `shutdown` remove the record. Nothing waits
    forever: starting waits at most `start_timeout_s`, control calls `timeout_s` (then
    TimeoutError naming the silent actors), and `generate` answers ok=False for the requests
    still pending once none has finished for `timeout_s`.
    """

    def __init__(self, model: ModelConfig, datastore_root: str | None, size: int, num_cpus: float = 1.0,
                 threads: int = 1, speculative: SpeculativeConfig | None = None, num_gpus: float = 0.0,
                 max_attempts: int = 3, timeout_s: float = REQUEST_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            ray.init(address=address) if address else ray.init(include_dashboard=False)
        self.pool_id = uuid.uuid4().hex[:8]
        self.root = str(datastore_root) if datastore_root else None
        self._args = (dataclasses.replace(model, threads=threads), self.root, speculative)
        # One OpenBLAS thread in the decoders, set before their numpy loads (see dresd/cli/main.py).
        # The cache's bound too (dresd.storage.eviction): the actors fill this node's cache.
        self._options = dict(num_cpus=num_cpus, num_gpus=num_gpus,
                             runtime_env={"env_vars": {"OPENBLAS_NUM_THREADS": "1", **cache_env()}})
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.names = [f"dresd-decoder-{self.pool_id}-{i}" for i in range(size)]
        self.actors = [self._start(i) for i in range(size)]
        self._inflight: list[list[ray.ObjectRef]] = [[] for _ in range(size)]
        self._lock = threading.Lock()
        self._next = 0
        self._pinned: str | None = None
        try:  # wait for the models to load, so a bad model or datastore fails here
            self._get([a.info.remote() for a in self.actors], "start (load the model and datastore)", start_timeout_s)
        except Exception:
            self.shutdown()
            raise

    def _get(self, refs: list, what: str, timeout_s: float | None = None) -> list:
        """ray.get of one ref per actor, bounded: TimeoutError naming `what` and the silent actors."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            silent = [name for name, ref in zip(self.names, refs) if ref not in done]
            raise TimeoutError(f"decoder pool {self.pool_id}: {', '.join(silent)} did not {what} "
                               f"within {timeout:g} s") from None

    def _start(self, i: int):
        return decoder_actor().options(name=self.names[i], **self._options).remote(self.names[i], *self._args)

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
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout_s)
            if not ready:  # none finished for timeout_s: the rest fail rather than hang the client
                for ref, (k, i) in pending.items():
                    with contextlib.suppress(Exception):
                        ray.cancel(ref)  # drops it from the actor's queue if it has not started
                    out[k] = DecodeResponse(getattr(requests[k], "request_id", ""), False,
                                            f"timed out: no request finished within {self.timeout_s:g} s "
                                            f"(this one was on {self.names[i]})")
                break
            for ref in ready:
                k, i = pending.pop(ref)
                rid = getattr(requests[k], "request_id", "")
                try:
                    out[k] = ray.get(ref, timeout=self.timeout_s)  # ready: returns at once
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
        return self._get([a.info.remote() for a in self.actors], "answer info")

    def versions(self) -> dict[str, str | None]:
        """{actor name: datastore version it has open}."""
        return {d["actor"]: d["version"] for d in self.infos()}

    @property
    def pin_holder(self) -> str:
        """The name this pool's pin is recorded under in the datastore root."""
        return f"pool-{self.pool_id}"

    def pin(self, version: str | None) -> dict[str, str | None]:
        """Pin every actor to `version` (None = follow CURRENT); returns once all switched.
        The pin is recorded in the root before the actors switch (a prune meanwhile keeps the
        version) and removed after they unpinned."""
        if self.root is not None and version is not None:
            record_pin(self.root, self.pin_holder, version)
        self._pinned = version
        out = dict(zip(self.names, self._get([a.pin.remote(version) for a in self.actors], f"pin {version}")))
        if self.root is not None and version is None:
            record_pin(self.root, self.pin_holder, None)
        return out

    def unpin(self) -> dict[str, str | None]:
        return self.pin(None)

    def refresh(self) -> dict[str, str | None]:
        """Make unpinned actors follow CURRENT now (after their request in progress) rather
        than at their next request; returns {actor name: version}."""
        return dict(zip(self.names, self._get([a.refresh.remote() for a in self.actors], "refresh")))

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
        if self.root is not None and self._pinned is not None:
            with contextlib.suppress(OSError):  # an unreachable root must not fail the shutdown
                record_pin(self.root, self.pin_holder, None)

    def __enter__(self) -> "DecoderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
