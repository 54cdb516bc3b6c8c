"""The OpenAI-compatible Ray Serve app: `build_app(config)` for `dresd serve`, `serve run`
and `serve deploy` (jobs/configs/serve.yaml).

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent events when
asked), GET /v1/models, /health, /metrics (Prometheus text, summed over every replica), and
the admin routes GET /admin/versions, POST /admin/pin {"version"}, /admin/unpin,
/admin/rollback. Each replica decodes with continuous batching (dresd.serving.replica);
the wire format is dresd.serving.openai_api's. With an API key set (ServeConfig.api_key_env)
every route but /health needs `Authorization: Bearer <key>`; bound to anything but
loopback the app refuses to start without one. Serve answers requests beyond
max_ongoing_requests per replica plus max_queued_requests with 503 and Retry-After.
"""


import asyncio
import copy
import hashlib
import hmac
import logging
import os
import threading
import time
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.config import BackpressureConfig

from dresd.config import ConfigError, SamplingParams, ServeConfig, load_config, to_dict, from_dict
from dresd.config.commands import LOOPBACK_HOSTS
from dresd.datastore.errors import DatastoreError
from dresd.serving import openai_api as oa
from dresd.serving.metrics import render
from dresd.serving.replica import Event, Job, ReplicaEngine

log = logging.getLogger(__name__)

# Seconds between a replica's metric reports to the app's hub (what /metrics sums).
REPORT_EVERY_S = 1.0
# Slack past a request's deadline before its handler stops waiting for the replica's answer.
DEADLINE_SLACK_S = 10.0

api = FastAPI(title="dresd", docs_url=None, redoc_url=None)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def resolve_config(args: Any) -> ServeConfig:
    """The ServeConfig a builder's args name: a ServeConfig, or a mapping with an optional
    `config` (a YAML file), `set` (a list of KEY=VALUE overrides) and any ServeConfig keys
    (nested sections as mappings), loaded through dresd.config.loader."""
    if isinstance(args, ServeConfig):
        return args
    args = dict(args or {})
    path, overrides = args.pop("config", None), args.pop("set", [])
    if isinstance(overrides, str):
        overrides = [overrides]
    flags: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix.split(".")[-1] in ("model", "speculative"):
            for k, v in value.items():
                flatten(f"{prefix}.{k}", v)
        else:
            flags[prefix] = value

    for k, v in args.items():
        flatten(k, v)
    return load_config(ServeConfig, path, overrides, flags)


def api_key_for(cfg: ServeConfig) -> str | None:
    """The API key the app requires (None: none). ConfigError when it binds beyond loopback
    without one: an open endpoint on a network is never what a user meant."""
    key = os.environ.get(cfg.api_key_env) or None
    if key is None and cfg.host not in LOOPBACK_HOSTS:
        raise ConfigError(f"host {cfg.host!r} is not loopback: set an API key in ${cfg.api_key_env} "
                          f"(clients send it as 'Authorization: Bearer <key>'), or bind 127.0.0.1")
    return key


@ray.remote(num_cpus=0)
class MetricsHub:
    """The latest metrics snapshot of every replica of one app (GET /metrics sums them)."""

    def __init__(self):
        self.snapshots: dict[str, dict] = {}

    def report(self, snapshot: dict) -> None:
        self.snapshots[snapshot["replica"]] = snapshot

    def collect(self) -> list[dict]:
        return list(self.snapshots.values())


def hub_name(app_name: str) -> str:
    return f"dresd-metrics-{app_name}"


def metrics_hub(app_name: str):
    """The app's hub actor, started by the first replica that asks (detached: it outlives
    replica restarts, so counters survive them; `dresd serve` removes it on exit)."""
    return MetricsHub.options(name=hub_name(app_name), namespace="dresd", lifetime="detached",
                              get_if_exists=True).remote()


def _error(exc: oa.ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


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


@serve.deployment(name="DresdServer")
@serve.ingress(api)
class DresdServer:
    """One replica: a ReplicaEngine behind the OpenAI routes."""

    def __init__(self, config: dict, key_sha256: str | None):
        self.cfg = from_dict(ServeConfig, config)
        self.key_sha256 = key_sha256
        context = serve.get_replica_context()
        self.name = str(getattr(context, "replica_tag", None) or f"replica-{os.getpid()}")
        self.engine = ReplicaEngine(self.cfg, self.name)
        # Streams detokenize on the event loop while the decoding thread encodes prompts: a
        # copy keeps the two threads off one Rust tokenizer ("Already borrowed").
        self.detokenizer = copy.deepcopy(self.engine.lm.tokenizer)
        self.hub = metrics_hub(self.cfg.app_name)
        self._stop = threading.Event()
        threading.Thread(target=self._report, name="metrics-report", daemon=True).start()

    def _report(self) -> None:
        while not self._stop.wait(REPORT_EVERY_S):
            try:
                self.hub.report.remote(self.engine.snapshot())
            except Exception:  # noqa: BLE001 - a hub restarting loses one report, not the replica
                log.warning("%s: metrics report failed", self.name, exc_info=True)

    def __del__(self):
        self._stop.set()
        self.engine.close()

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
            self.engine.count("bad_request")
            raise
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        sampling = SamplingParams(req.temperature, req.top_p, req.seed) if req.temperature > 0 else None
        job = Job(lambda e: loop.call_soon_threadsafe(events.put_nowait, e), req.max_tokens,
                  req.method or self.cfg.speculative.method, req.budget or self.cfg.speculative.budget,
                  req.prompt, req.messages, sampling, time.monotonic() + self.cfg.request_timeout_s)
        self.engine.submit(job)
        wait_s = self.cfg.request_timeout_s + DEADLINE_SLACK_S
        try:
            first = await asyncio.wait_for(events.get(), wait_s)
        except BaseException:
            self.engine.cancel(job)
            raise
        if first.kind == "error":
            raise oa.ApiError(first.status, first.message, first.param,
                              "invalid_request_error" if first.status < 500 else "server_error")
        rid, model = oa.new_id(kind), self.cfg.served_model_name
        text = oa.IncrementalText(self.detokenizer, req.stop)
        if req.stream:
            return StreamingResponse(self._stream(req, job, events, text, rid, model, first, wait_s),
                                     media_type="text/event-stream")
        answer, tokens, done = [], [], None
        try:
            async for event, new in self._follow(job, events, text, wait_s):
                if event.kind == "error":
                    raise oa.ApiError(event.status, event.message, None, "server_error")
                answer.append(new)
                tokens = event.tokens or tokens
                done = event if event.kind == "done" else None
        except BaseException:
            self.engine.cancel(job)
            raise
        use = oa.usage(first.prompt_tokens, len(tokens))
        stats = oa.dresd_stats(done.version, job.method, done.metrics)
        return oa.response(req, rid, model, "".join(answer), done.finish, use, stats)

    async def _follow(self, job: Job, events: asyncio.Queue, text: oa.IncrementalText, wait_s: float):
        """(event, new text) until the job's done or error event; a stop string cancels it."""
        stopped = False
        while True:
            event = await asyncio.wait_for(events.get(), wait_s)
            if event.kind == "error":
                yield event, ""
                return
            if event.kind == "done":
                new, _ = text.update(event.tokens, final=True) if event.tokens and not stopped else ("", False)
                yield event, new
                return
            if stopped:
                continue
            new, stopped = text.update(event.tokens)
            if stopped:
                self.engine.cancel(job, "stop")
            yield event, new

    async def _stream(self, req, job, events, text, rid, model, first: Event, wait_s: float):
        tokens: list[int] = []
        try:
            yield oa.sse(oa.chunk(req, rid, model, "", first=True))
            async for event, new in self._follow(job, events, text, wait_s):
                if event.kind == "error":
                    yield oa.sse({"error": {"message": event.message, "type": "server_error", "code": event.status}})
                    break
                tokens = event.tokens or tokens
                if event.kind == "done":
                    stats = oa.dresd_stats(event.version, job.method, event.metrics)
                    use = oa.usage(first.prompt_tokens, len(tokens))
                    yield oa.sse(oa.chunk(req, rid, model, new, event.finish, stats=stats))
                    if req.include_usage:
                        yield oa.sse(oa.chunk(req, rid, model, None, use=use, stats=stats, empty=True))
                elif new:
                    yield oa.sse(oa.chunk(req, rid, model, new))
            yield oa.SSE_DONE
        except asyncio.TimeoutError:
            yield oa.sse({"error": {"message": "no answer from the decoding loop", "type": "server_error",
                                    "code": 504}})
            yield oa.SSE_DONE
        finally:
            self.engine.cancel(job)  # a client that left (or any early end) frees its slot

    # ------------------------------------------------------------------ the rest

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{"id": self.cfg.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "dresd", "datastore_version": self.engine.version}]}

    @api.get("/health")
    async def health(self):
        return {"status": "ok", "replica": self.name, "datastore_version": self.engine.version}

    @api.get("/metrics")
    async def metrics(self, request: Request):
        self._auth(request)
        mine = self.engine.snapshot()
        try:
            others = await asyncio.wait_for(self.hub.collect.remote(), 10)
        except Exception:  # noqa: BLE001 - the hub unreachable: this replica's own counts
            log.warning("%s: metrics hub unreachable", self.name, exc_info=True)
            others = []
        snaps = [s for s in others if s["replica"] != self.name] + [mine]
        return PlainTextResponse(render(snaps), media_type="text/plain; version=0.0.4")

    @api.get("/admin/versions")
    async def versions(self, request: Request):
        self._auth(request)
        from dresd.datastore.store import list_versions, read_current
        from dresd.serving.versions import read_pin

        root = self._root()
        return {"current": read_current(root), "pinned": read_pin(root), "versions": list_versions(root),
                "replica": self.name, "serving": self.engine.version}

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


def check_method(cfg: ServeConfig) -> None:
    """ConfigError when the replicas' default method is unknown or needs a datastore that is
    not given: otherwise every request without its own `dresd.method` would be refused."""
    from dresd.drafters.registry import method_entry

    try:
        entry = method_entry(cfg.speculative.method)
    except ValueError as err:
        raise ConfigError(f"speculative.method (--method): {err}") from None
    if entry.needs_datastore and not cfg.datastore:
        raise ConfigError(f"speculative.method {cfg.speculative.method!r} needs a datastore: give --datastore ROOT, "
                          f"or --method greedy / pld for a server without one")


def build_app(args: Any = None):
    """The Serve application for a ServeConfig (or builder args: see resolve_config)."""
    cfg = resolve_config(args)
    check_method(cfg)
    key = api_key_for(cfg)
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    options: dict[str, Any] = {"num_cpus": cfg.replica_cpus, "runtime_env": {"env_vars": env}}
    if cfg.replica_gpus:
        options["num_gpus"] = cfg.replica_gpus
    deployment = DresdServer.options(num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
                                     max_queued_requests=cfg.max_queued_requests, ray_actor_options=options,
                                     backpressure_config=BackpressureConfig(status_code=503,
                                                                            retry_after_s=cfg.retry_after_s))
    return deployment.bind(to_dict(cfg), key_digest(key) if key else None)


def start(cfg: ServeConfig) -> str:
    """Run the app on the connected Ray (else `cfg.ray_address`, RAY_ADDRESS or a new local
    one) with Serve's HTTP proxy on cfg.host:cfg.port; returns the base URL once every replica
    is up. ConfigError before anything starts when an API key is required and missing."""
    check_method(cfg)
    api_key_for(cfg)
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address) if address else ray.init(include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def stop(cfg: ServeConfig) -> None:
    """Delete the app and its metrics hub (Serve itself keeps running for other apps)."""
    serve.delete(cfg.app_name)
    try:
        ray.kill(ray.get_actor(hub_name(cfg.app_name), namespace="dresd"))
    except ValueError:  # no hub: no replica started
        pass
