"""The HTTP side of `dresd serve`: the OpenAI routes in front of the decoding replicas.

`DresdIngress` is the app's FastAPI ingress deployment. It checks the key and the body
(dresd.serving.openai_api), sends each generation to the decoding deployment
(dresd.serving.decode_server) through a streaming Serve handle, and formats what comes back
as an OpenAI response or server-sent events. It loads no model: a decoding replica that dies
takes no HTTP connection with it, so every request gets exactly one answer
(dresd.serving.failover decides between one retry and an error):

- died before any text reached the client: retried once on another or the restarted
  replica; a second death is a 503 JSON error saying the replica died;
- a stream that already sent text ends with a terminal error event and `data: [DONE]`.

Limits live on the decoding deployment (max_ongoing_requests per replica, and
max_queued_requests for the handle's queue): a request past them is refused by the handle
(BackPressureError) and answered 503 with Retry-After. Each request has request_timeout_s
from arrival to its last token, retries included (then 504, or an error event on a stream).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at
# runtime.
import asyncio
import hashlib
import hmac
import logging
import math
import threading
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from dresd.config import ServeConfig, from_dict
from dresd.datastore.errors import DatastoreError
from dresd.serving import openai_api as oa
from dresd.serving.failover import Attempts, ReplicaDied, within
from dresd.serving.hub import Reporter, live_decoders, main_version
from dresd.serving.metrics import ServeMetrics, render

log = logging.getLogger(__name__)

# Seconds the routes wait for the metrics hub before answering without it.
HUB_TIMEOUT_S = 10.0
# What a call to a decoding replica raises when that replica died (or is unreachable, which
# may mean the same): ActorDiedError and ActorUnavailableError are RayActorErrors.
REPLICA_DEATHS = (RayActorError, ReplicaUnavailableError, WorkerCrashedError)

api = FastAPI(title="dresd", docs_url=None, redoc_url=None)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_replica_death(exc: BaseException) -> bool:
    """Whether `exc`, raised by a decoding call, means the replica serving it died."""
    return isinstance(exc, REPLICA_DEATHS) or isinstance(getattr(exc, "cause", None), RayActorError)


def failure(exc: BaseException) -> oa.ApiError | None:
    """The answer to a decoding call that raised `exc` (None: an unexpected error, a 500)."""
    if isinstance(exc, ReplicaDied):
        return oa.ApiError(503, str(exc), None, "server_error")
    if isinstance(exc, asyncio.TimeoutError):
        return oa.ApiError(504, "no answer from the decoding replicas before the request deadline", None,
                           "server_error")
    if isinstance(exc, BackPressureError):
        headers = {"Retry-After": str(math.ceil(exc.retry_after_s))} if exc.retry_after_s is not None else None
        return oa.ApiError(exc.status_code, f"the server is at capacity: {exc.message}", None, "server_error",
                           headers)
    if isinstance(exc, DeploymentUnavailableError):
        return oa.ApiError(503, exc.message, None, "server_error")
    return None


def _error(exc: oa.ApiError) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers or None)


@api.exception_handler(oa.ApiError)
async def _api_error(request: Request, exc: oa.ApiError) -> JSONResponse:
    return _error(exc)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (before reading it when the
    client declares its length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise oa.ApiError(413, f"request body is {declared} bytes; the limit is {limit}", "body")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise oa.ApiError(413, f"request body is over the limit of {limit} bytes", "body")
        chunks.append(part)
    return b"".join(chunks)


@serve.deployment(name="DresdIngress")
@serve.ingress(api)
class DresdIngress:
    """The routes; generation is relayed to the decoding deployment `decoder`."""

    def __init__(self, config: dict, key_sha256: str | None, decoder, hub):
        self.cfg = from_dict(ServeConfig, config)
        self.key_sha256 = key_sha256
        self.decoder = decoder.options(stream=True)
        self.hub = hub
        context = serve.get_replica_context()
        self.name = f"ingress-{getattr(context, 'replica_tag', None) or 'local'}"
        self.metrics = ServeMetrics(self.name, decodes=False)  # what ends here: refusals, deaths
        self._lock = threading.Lock()  # the reporter thread reads the metrics
        self.reporter = Reporter(hub, self._snapshot, self.name)

    def __del__(self):
        self.reporter.stop()

    def _snapshot(self) -> dict:
        with self._lock:
            return self.metrics.snapshot()

    def _count(self, outcome: str | None = None, retried: bool = False) -> None:
        with self._lock:
            if outcome is not None:
                self.metrics.outcome(outcome)
            if retried:
                self.metrics.counters["dresd:requests_retried_total"] += 1

    def _auth(self, request: Request) -> None:
        if self.key_sha256 is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise oa.ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "authorization",
                              "authentication_error")
        if not hmac.compare_digest(key_digest(token.strip()), self.key_sha256):
            raise oa.ApiError(401, "wrong API key", "authorization", "authentication_error")

    # ------------------------------------------------------------------ generation

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, "completion")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, "chat")

    async def _generate(self, request: Request, kind: str):
        try:
            self._auth(request)
            req = oa.parse_request(await read_body(request, self.cfg.max_body_bytes), kind,
                                   self.cfg.default_max_tokens)
        except oa.ApiError:
            self._count("bad_request")
            raise
        run = Attempts(lambda timeout_s: self.decoder.generate.remote(req, timeout_s),
                       time.monotonic() + self.cfg.request_timeout_s, is_replica_death)
        events = run.events()
        handed_on = False
        try:
            first = await self._next(events)  # admitted (or refused) before the response's status is chosen
            if first["kind"] == "error":
                raise oa.ApiError(first["status"], first["message"], first.get("param"),
                                  "invalid_request_error" if first["status"] < 500 else "server_error")
            rid, model = oa.new_id(kind), self.cfg.served_model_name
            if req.stream:
                handed_on = True
                return StreamingResponse(self._stream(req, run, events, first, rid, model),
                                         media_type="text/event-stream")
            answer, done = [], None
            while done is None:
                event = await self._next(events)
                if event["kind"] == "error":
                    raise oa.ApiError(event["status"], event["message"], event.get("param"), "server_error")
                if event["kind"] == "started":
                    answer.clear()  # a retry's: the first attempt's text is not the answer
                    first = event
                else:
                    answer.append(event["text"])
                    done = event if event["kind"] == "done" else None
            use = oa.usage(first["prompt_tokens"], done["tokens"])
            return oa.response(req, rid, model, "".join(answer), done["finish"], use,
                               {**done["stats"], "attempts": run.attempts})
        finally:
            if not handed_on:
                await events.aclose()  # cancels a call still running (the client left, an error)

    async def _next(self, events: AsyncIterator[dict]) -> dict:
        """The next event that is not a retry marker; a failed call as its HTTP answer."""
        while True:
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                raise oa.ApiError(500, "the decoding replica ended the request without an answer", None,
                                  "server_error") from None
            except Exception as exc:  # noqa: BLE001 - every failure becomes one answer
                raise self._answer_for(exc) from exc
            if event["kind"] != "retry":
                return event
            self._count(retried=True)

    def _answer_for(self, exc: BaseException) -> oa.ApiError:
        err = failure(exc)
        if err is None:
            log.error("%s: decoding call failed", self.name, exc_info=exc)
            err = oa.ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error")
        if isinstance(exc, ReplicaDied):
            self._count("error")
        elif isinstance(exc, asyncio.TimeoutError):
            self._count("timeout")
        return err

    async def _stream(self, req, run: Attempts, events: AsyncIterator[dict], first: dict, rid: str, model: str):
        prompt_tokens = first["prompt_tokens"]
        try:
            yield oa.sse(oa.chunk(req, rid, model, "", first=True))
            while True:
                try:
                    event = await self._next(events)
                except oa.ApiError as err:  # the replica died twice, or once after text was sent; a deadline
                    yield oa.sse(err.body())
                    break
                if event["kind"] == "started":  # a retry's; nothing was sent, so nothing is repeated
                    prompt_tokens = event["prompt_tokens"]
                elif event["kind"] == "error":
                    yield oa.sse({"error": {"message": event["message"], "type": "server_error",
                                            "param": event.get("param"), "code": event["status"]}})
                    break
                elif event["kind"] == "text":
                    run.committed = True  # from here a replica's death ends the stream, no retry
                    yield oa.sse(oa.chunk(req, rid, model, event["text"]))
                else:
                    stats = {**event["stats"], "attempts": run.attempts}
                    yield oa.sse(oa.chunk(req, rid, model, event["text"], event["finish"], stats=stats))
                    if req.include_usage:
                        use = oa.usage(prompt_tokens, event["tokens"])
                        yield oa.sse(oa.chunk(req, rid, model, None, use=use, stats=stats, empty=True))
                    break
            yield oa.SSE_DONE
        finally:
            await events.aclose()  # a client that left (or any early end) frees its slot

    # ------------------------------------------------------------------ the rest

    async def _snapshots(self) -> list[dict] | None:
        """Every replica's latest metrics (this one's fresh); None when the hub is unreachable."""
        try:
            others = await within(self.hub.collect.remote(), HUB_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the hub restarting: the caller answers without it
            log.warning("%s: metrics hub unreachable", self.name, exc_info=True)
            return None
        return [s for s in others if s["replica"] != self.name] + [self._snapshot()]

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        version = main_version(live_decoders(await self._snapshots() or []))
        return {"object": "list", "data": [{"id": self.cfg.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "dresd", "datastore_version": version}]}

    @api.get("/health")
    async def health(self):
        """200 while a decoding replica reported lately (or the hub cannot tell), else 503."""
        snaps = await self._snapshots()
        if snaps is None:
            return {"status": "ok", "decoders": None, "datastore_version": None}
        live = live_decoders(snaps)
        body: dict[str, Any] = {"status": "ok" if live else "unavailable", "decoders": len(live),
                                "datastore_version": main_version(live)}
        return body if live else JSONResponse(body, status_code=503)

    @api.get("/metrics")
    async def metrics(self, request: Request):
        self._auth(request)
        snaps = await self._snapshots() or [self._snapshot()]
        return PlainTextResponse(render(snaps), media_type="text/plain; version=0.0.4")

    @api.get("/admin/versions")
    async def versions(self, request: Request):
        self._auth(request)
        from dresd.datastore.store import list_versions, read_current
        from dresd.serving.versions import read_pin

        root = self._root()
        return {"current": read_current(root), "pinned": read_pin(root), "versions": list_versions(root),
                "serving": live_decoders(await self._snapshots() or [])}

    @api.post("/admin/pin")
    async def pin(self, request: Request):
        self._auth(request)
        from dresd.serving.versions import write_pin

        body = oa.parse_json_object(await read_body(request, self.cfg.max_body_bytes))
        version = body.get("version")
        if not isinstance(version, str) or not version:
            raise oa.ApiError(400, "version is required (a version id)", "version")
        try:
            write_pin(self._root(), version)
        except DatastoreError as exc:
            raise oa.ApiError(404, f"cannot pin {version!r}: {exc}", "version") from None
        return {"pinned": version}

    @api.post("/admin/unpin")
    async def unpin(self, request: Request):
        self._auth(request)
        from dresd.serving.versions import write_pin

        write_pin(self._root(), None)
        return {"pinned": None}

    @api.post("/admin/rollback")
    async def rollback(self, request: Request):
        """CURRENT moves back to the version before it (every replica follows it, unless pinned)."""
        self._auth(request)
        from dresd.datastore.publish import set_current
        from dresd.datastore.store import list_versions, read_current

        root = self._root()
        current, versions = read_current(root), list_versions(root)
        if current not in versions or versions.index(current) == 0:
            raise oa.ApiError(409, f"no version before {current!r} to roll back to", "version")
        previous = versions[versions.index(current) - 1]
        set_current(root, previous, expect_current=current)
        return {"current": previous, "was": current}

    def _root(self) -> str:
        if not self.cfg.datastore:
            raise oa.ApiError(404, "this server has no datastore", "datastore")
        return self.cfg.datastore
