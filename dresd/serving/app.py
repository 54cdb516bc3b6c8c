"""The OpenAI-compatible Ray Serve app: `build_app(config)` for `dresd serve`, `serve run`
and `serve deploy` (jobs/configs/serve.yaml).

Three deployments, all deleted with the app:

- `DresdIngress` (dresd.serving.ingress): the HTTP routes: POST /v1/completions and
  /v1/chat/completions (streamed as server-sent events when asked), GET /v1/models,
  /health, /metrics (Prometheus text, summed over every replica), and the admin routes
  GET /admin/versions, POST /admin/pin {"version"}, /admin/unpin, /admin/rollback. One
  light replica (INGRESS_CPUS, no model); it retries a request once when its decoding
  replica dies before any text was sent (dresd.serving.failover).
- `DresdDecoder` (dresd.serving.decode_server): `replicas` replicas, each a model decoding
  with continuous batching (dresd.serving.replica), called through a streaming handle. It
  carries the limits: max_ongoing_requests per replica plus max_queued_requests in the
  ingress's handle queue; the excess is answered 503 with Retry-After.
- `MetricsHub` (dresd.serving.hub): every replica's latest metrics snapshot.

With an API key set (ServeConfig.api_key_env) every route but /health needs
`Authorization: Bearer <key>`; bound to anything but loopback the app refuses to start
without one.
"""


import os
from typing import Any

import ray
from ray import serve
from ray.serve.config import BackpressureConfig

from dresd.config import ConfigError, ServeConfig, load_config, to_dict
from dresd.config.commands import LOOPBACK_HOSTS
from dresd.serving.decode_server import CRASH_ENV, DecodeServer
from dresd.serving.hub import MetricsHub
from dresd.serving.ingress import DresdIngress, key_digest
from dresd.storage.eviction import ENV as CACHE_ENV

# CPUs the ingress replica reserves: it parses, relays and formats, and decodes nothing.
INGRESS_CPUS = 0.1
# Requests the ingress holds beyond what the decoders may hold and queue: refusals, health
# checks, scrapes and admin calls must reach it while the decoders are full.
INGRESS_HEADROOM = 64
# The ingress's hold when the decoders' queue is unbounded (max_queued_requests = -1).
INGRESS_UNBOUNDED = 10_000


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


def ingress_limit(cfg: ServeConfig) -> int:
    """max_ongoing_requests of the ingress: never the limit that refuses a generation (the
    decoders' limits do, with Retry-After), yet bounded."""
    queued = cfg.max_queued_requests if cfg.max_queued_requests >= 0 else INGRESS_UNBOUNDED
    return cfg.replicas * cfg.max_ongoing_requests + queued + INGRESS_HEADROOM


def build_app(args: Any = None):
    """The Serve application for a ServeConfig (or builder args: see resolve_config)."""
    cfg = resolve_config(args)
    check_method(cfg)
    key = api_key_for(cfg)
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if cfg.cache.max_gb is not None:  # the replicas' bound; else their node's own
        env[CACHE_ENV] = repr(float(cfg.cache.max_gb))
    if os.environ.get(CRASH_ENV):  # the fault tests' hook (dresd.serving.decode_server)
        env[CRASH_ENV] = os.environ[CRASH_ENV]
    options: dict[str, Any] = {"num_cpus": cfg.replica_cpus, "runtime_env": {"env_vars": env}}
    if cfg.replica_gpus:
        options["num_gpus"] = cfg.replica_gpus
    hub = MetricsHub.bind()
    decoder = DecodeServer.options(num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
                                   max_queued_requests=cfg.max_queued_requests, ray_actor_options=options,
                                   backpressure_config=BackpressureConfig(status_code=503,
                                                                          retry_after_s=cfg.retry_after_s))
    ingress = DresdIngress.options(num_replicas=1, max_ongoing_requests=ingress_limit(cfg),
                                   ray_actor_options={"num_cpus": INGRESS_CPUS})
    config = to_dict(cfg)
    return ingress.bind(config, key_digest(key) if key else None, decoder.bind(config, hub), hub)


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
    """Delete the app: its ingress, decoding replicas and metrics hub (Serve itself keeps
    running for other apps)."""
    serve.delete(cfg.app_name)
