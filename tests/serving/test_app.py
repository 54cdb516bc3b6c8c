"""`dresd serve`'s app over real HTTP on loopback: one Ray Serve app per module (a tiny
random Llama and a small published datastore), driven by the official `openai` client
(max_retries=0, so no retry hides a failure) and by raw http.client requests. Every test
that uses the server is in the `ray` tier (through the ray_session fixture)."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from dresd.config import ConfigError, ModelConfig, ServeConfig, SpeculativeConfig
from dresd.decoding.engine import Engine
from tests_support import publish_for_model

KEY = "test-key-123"
SPEC = SpeculativeConfig(len_drafts=4, top_k=8, num_drafts=4)  # the test stores keep 12-token values
PROMPT = "question 1?"
CRASH = "CRASH-THIS-REPLICA"  # dresd.serving.decode_server's test hook, armed for this app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests_support import TINY_VOCAB
    from tiny_models import make_tiny_llama

    # tiny_lm's recipe (init_std 0.5: clear argmax margins), saved where the replicas load it.
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", vocab_size=TINY_VOCAB, init_std=0.5)


@pytest.fixture(scope="module")
def lm(model_dir):
    from dresd.model.loading import load_model

    return load_model(ModelConfig(path=str(model_dir), device="cpu"))


@pytest.fixture(scope="module")
def served(ray_session, lm, model_dir, tmp_path_factory):
    """The app on 127.0.0.1 (an API key set), its datastore root and the config it runs."""
    import os

    from ray import serve

    from dresd.serving.app import start, stop
    from dresd.serving.decode_server import CRASH_ENV

    root = tmp_path_factory.mktemp("serve") / "store"
    publish_for_model(root, lm, "v1")
    cfg = ServeConfig(model=ModelConfig(path=str(model_dir), device="cpu", threads=1),
                      speculative=SPEC, datastore=str(root), port=free_port(), replica_cpus=0.5, max_batch=4,
                      replicas=2,  # /metrics must sum them; versions must switch on both
                      # Small: the overload test reaches them; the queue holds the fault tests' retries.
                      max_ongoing_requests=2, max_queued_requests=4,
                      # A deadline past the fault tests' replica restarts on a busy machine.
                      default_max_tokens=8, max_body_bytes=4096, request_timeout_s=150.0, app_name="dresd-test")
    os.environ[cfg.api_key_env] = KEY
    os.environ[CRASH_ENV] = CRASH  # a prompt holding it crashes its decoding replica
    try:
        url = start(cfg)
        yield {"url": url, "root": root, "cfg": cfg}
        stop(cfg)
        assert not app_actors(), "stop() left actors of the app running"  # the metrics hub included
        serve.shutdown()
    finally:
        os.environ.pop(cfg.api_key_env, None)
        os.environ.pop(CRASH_ENV, None)


def app_actors() -> list[str]:
    """Named actors of the test app: its Serve replicas, and any hub of an older layout."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(("SERVE_REPLICA::dresd-test#", "dresd-metrics-"))]


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(lm, served):
    """In-process decoding of the same model and datastore: what the server must answer."""
    from dresd.datastore.store import Datastore

    engine = Engine(lm, Datastore(str(served["root"]), "v1"))
    return lambda prompt, method, n: engine.generate(prompt, SpeculativeConfig(**{**SPEC.__dict__, "method": method}),
                                                     n).text


def raw(served, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, headers, body bytes) of one plain HTTP request."""
    host, port = served["url"].split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port.split("/")[0]), timeout=timeout)
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=body, headers={k: v for k, v in hdrs.items() if v is not None})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def test_completions_are_greedy_outputs_of_in_process_decoding(client, reference):
    for method in ("dresd", "greedy"):
        resp = client.completions.create(model="dresd", prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body={"dresd": {"method": method}})
        assert resp.choices[0].text == reference(PROMPT, method, 12)
        stats = resp.model_extra["dresd"]
        assert stats["datastore_version"] == "v1" and stats["method"] == method
        assert resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 0
        assert stats["target_calls"] >= 1 and stats["mean_accepted_tokens"] >= 1.0
        if method == "greedy":
            assert stats["drafted_tokens"] == 0


def test_chat_and_its_stream_say_the_same(client, served):
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model="dresd", messages=messages, max_tokens=10, temperature=0)
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and text and whole.model_extra["dresd"]["datastore_version"] == "v1"
    chunks = list(client.chat.completions.create(model="dresd", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].model_extra["dresd"]["datastore_version"] == "v1"
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}).encode()
    status, headers, data = raw(served, "POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert data.decode().rstrip().endswith("data: [DONE]")


BAD = [
    (b"{not json", "body", 400),
    (b"\xff\xfe{}", "body", 400),
    (json.dumps({"max_tokens": 3}).encode(), "prompt", 400),
    (json.dumps({"prompt": "hi", "max_tokens": 0}).encode(), "max_tokens", 400),
    (json.dumps({"prompt": "hi", "max_tokens": -2}).encode(), "max_tokens", 400),
    (json.dumps({"prompt": "hi", "temperature": -0.5}).encode(), "temperature", 400),
    (json.dumps({"prompt": "hi", "top_p": 0}).encode(), "top_p", 400),
    (json.dumps({"prompt": "hi", "top_p": 1.5}).encode(), "top_p", 400),
    (json.dumps({"prompt": "hi", "dresd": {"method": "medusa"}}).encode(), "dresd.method", 400),
    (json.dumps({"prompt": "x" * 3000}).encode(), "prompt", 400),  # within the body limit, past the context
    (json.dumps({"prompt": "x" * 5000}).encode(), "body", 413),
]


@pytest.mark.parametrize("body, param, status", BAD, ids=[f"{p}-{s}-{i}" for i, (_, p, s) in enumerate(BAD)])
def test_bad_requests_name_the_field_and_the_server_keeps_serving(served, body, param, status):
    got, _, data = raw(served, "POST", "/v1/completions", body)
    error = json.loads(data)["error"]
    assert (got, error["param"]) == (status, param), error
    assert param.split(".")[-1] in error["message"] or status == 413 or param == "body"


def test_chat_without_messages_and_auth_failures(served):
    got, _, data = raw(served, "POST", "/v1/chat/completions", json.dumps({"prompt": "hi"}).encode())
    assert got == 400 and json.loads(data)["error"]["param"] == "messages"
    for auth in (None, "Bearer wrong"):
        got, _, data = raw(served, "POST", "/v1/completions", json.dumps({"prompt": "hi"}).encode(),
                                 {"Authorization": auth})
        assert got == 401 and json.loads(data)["error"]["type"] == "authentication_error"
    assert raw(served, "GET", "/health", headers={"Authorization": None})[0] == 200
    got, _, data = raw(served, "GET", "/v1/models")
    assert got == 200 and json.loads(data)["data"][0]["id"] == "dresd"


def test_a_stop_string_ends_the_text_before_it(client, reference):
    full = reference(PROMPT, "greedy", 12)
    stop = full[3:5]
    resp = client.completions.create(model="dresd", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert resp.choices[0].text == full[: full.index(stop)] and resp.choices[0].finish_reason == "stop"


def test_a_published_version_is_served_from_the_next_request_and_pins_hold(client, served, lm):
    ask = lambda: client.completions.create(model="dresd", prompt=PROMPT, max_tokens=6, temperature=0)  # noqa: E731
    first = ask()
    publish_for_model(served["root"], lm, "v2", seed=1)
    second = ask()
    assert second.model_extra["dresd"]["datastore_version"] == "v2"
    assert second.choices[0].text == first.choices[0].text  # greedy: drafts change no token
    assert raw(served, "POST", "/admin/pin", json.dumps({"version": "v1"}).encode())[0] == 200
    assert ask().model_extra["dresd"]["datastore_version"] == "v1"
    status, _, data = raw(served, "POST", "/admin/pin", json.dumps({"version": "v9"}).encode())
    assert status == 404 and "v9" in json.loads(data)["error"]["message"]
    assert raw(served, "POST", "/admin/unpin", b"")[0] == 200
    assert ask().model_extra["dresd"]["datastore_version"] == "v2"
    status, _, data = raw(served, "POST", "/admin/rollback", b"")
    assert status == 200 and json.loads(data) == {"current": "v1", "was": "v2"}
    assert ask().model_extra["dresd"]["datastore_version"] == "v1"


def test_beyond_the_ongoing_and_queued_limits_requests_get_503_with_retry_after(served, client):
    from concurrent.futures import ThreadPoolExecutor

    # A prompt that decodes past max_tokens: every admitted request holds its slot for the whole burst
    # (a prompt that meets EOS early frees slots before a busy machine has sent the burst's tail).
    body = json.dumps({"prompt": LONG_PROMPT, "max_tokens": 400, "temperature": 0,
                       "dresd": {"method": "greedy"}}).encode()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: raw(served, "POST", "/v1/completions", body), range(16)))
    statuses = sorted(status for status, _, _ in answers)
    # Serve counts a request as queued until a replica takes it: a burst fills the queue at once.
    assert set(statuses) == {200, 503}, statuses
    headers = [{k.lower(): v for k, v in h.items()} for s, h, _ in answers if s == 503]
    assert all(h.get("retry-after") == "1" for h in headers), headers
    # Every request got exactly one answer, and the server still serves.
    assert client.completions.create(model="dresd", prompt=PROMPT, max_tokens=3, temperature=0).choices[0].text


def scrape(served) -> dict[str, float]:
    status, headers, data = raw(served, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in data.decode().splitlines() if line and not line.startswith("#")}


def test_one_scrape_of_metrics_sums_what_every_replica_served(served, client):
    ok = 'dresd:requests_total{outcome="success"}'
    time.sleep(1.5)  # the replicas' last reports
    before = scrape(served)
    for _ in range(4):
        client.completions.create(model="dresd", prompt=PROMPT, max_tokens=6, temperature=0)
    deadline = time.monotonic() + 15
    while (values := scrape(served))[ok] < before[ok] + 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert values[ok] == before[ok] + 4
    assert values["dresd:generation_tokens_total"] >= before["dresd:generation_tokens_total"] + 4
    assert values['dresd:requests_total{outcome="bad_request"}'] >= len(BAD)
    assert values["dresd:spec_decode_num_draft_tokens_total"] >= values["dresd:spec_decode_num_accepted_tokens_total"]
    assert values["dresd:e2e_request_latency_seconds_count"] >= 4
    assert 'dresd:spec_decode_num_accepted_tokens_per_pos_total{position="0"}' in values
    assert len([k for k in values if k.startswith("dresd:datastore_version_info{")]) == 2


def test_a_client_that_leaves_a_stream_frees_its_slot(served):
    host, port = served["url"].split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port.split("/")[0]), timeout=60)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "stream": True,
                       "dresd": {"method": "greedy"}})
    conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.close()  # gone mid-stream
    conn.close()
    deadline = time.monotonic() + 30
    while scrape(served)['dresd:requests_total{outcome="aborted"}'] < 1:
        assert time.monotonic() < deadline, "the abandoned request was never cancelled"
        time.sleep(0.5)


# A prompt whose greedy answer runs 1154 tokens before EOS: still decoding when its replica dies.
LONG_PROMPT, LONG = "question 53?", 1500
# Seconds a fault test waits for one answer: replicas restart meanwhile (slow on a busy machine).
RESTART_WAIT_S = 180


def kill_decoders() -> set[str]:
    """ray.kill every decoding replica of the test app (Serve starts new ones); their ids."""
    import ray

    killed = set()
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::dresd-test#DresdDecoder#"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            killed.add(actor["name"].rsplit("#", 1)[1])
    return killed


def raw_stream(served, body: dict, first_text) -> tuple[int, list[bytes]]:
    """A streamed request over http.client: (status, every `data:` payload in order); sets
    `first_text` once a chunk carrying text arrived."""
    host, port = served["url"].split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port.split("/")[0]), timeout=RESTART_WAIT_S)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp, payloads = conn.getresponse(), []
    for line in resp:
        if line.startswith(b"data: "):
            payloads.append(line[6:].strip())
            if payloads[-1] != b"[DONE]" and (json.loads(payloads[-1]).get("choices") or [{}])[0].get("text"):
                first_text.set()
    conn.close()
    return resp.status, payloads


def test_killed_decoders_answer_each_request_once_retry_the_unsent_and_restart_pinned(served, client, reference):
    """Two whole and two streamed requests decoding when every decoding replica is killed:
    the whole ones are retried on the restarted replicas and answered in full, the streams
    that sent text end with one error event and [DONE]; the restarted replicas keep the pin."""
    import threading

    versions = json.loads(raw(served, "GET", "/admin/versions")[2])
    pinned = versions["versions"][0]
    assert raw(served, "POST", "/admin/pin", json.dumps({"version": pinned}).encode())[0] == 200
    full = reference(LONG_PROMPT, "greedy", LONG)
    body = {"prompt": LONG_PROMPT, "max_tokens": LONG, "temperature": 0, "dresd": {"method": "greedy"}}
    retried_before = scrape(served)["dresd:requests_retried_total"]
    got: dict = {}
    client = client.with_options(timeout=RESTART_WAIT_S)

    def whole_openai():
        resp = client.completions.create(model="dresd", prompt=LONG_PROMPT, max_tokens=LONG, temperature=0,
                                         extra_body={"dresd": {"method": "greedy"}})
        got["openai"] = (resp.choices[0].text, resp.model_extra["dresd"])

    def whole_raw():
        status, _, data = raw(served, "POST", "/v1/completions", json.dumps(body).encode(), timeout=RESTART_WAIT_S)
        got["raw"] = (status, json.loads(data))

    def stream_openai():
        text = []
        try:
            for c in client.completions.create(model="dresd", prompt=LONG_PROMPT, max_tokens=LONG, temperature=0,
                                               stream=True, extra_body={"dresd": {"method": "greedy"}}):
                text.append(c.choices[0].text if c.choices else "")
                if text[-1]:
                    firsts[0].set()
            got["stream_openai"] = ("finished", "".join(text))
        except Exception as exc:  # noqa: BLE001 - the error event is the expected answer
            got["stream_openai"] = (exc, "".join(text))

    def stream_raw():
        got["stream_raw"] = raw_stream(served, body, firsts[1])

    firsts = [threading.Event(), threading.Event()]
    workers = [threading.Thread(target=f) for f in (whole_openai, whole_raw, stream_openai, stream_raw)]
    for w in workers:  # one by one: Serve's handle queue refuses a burst beyond max_queued_requests at once
        w.start()
        time.sleep(0.3)
    assert all(f.wait(60) for f in firsts), "the streams sent no text"
    assert len(kill_decoders()) == 2
    for w in workers:
        w.join(RESTART_WAIT_S + 10)
    assert set(got) == {"openai", "raw", "stream_openai", "stream_raw"}, got  # one answer each, no hang
    status, whole = got["raw"]
    assert status == 200, whole
    answers = [(got["openai"][0], got["openai"][1]), (whole["choices"][0]["text"], whole["dresd"])]
    for text, stats in answers:  # in full, as in-process decoding has it
        assert text == full and stats["datastore_version"] == pinned
    assert any(stats["attempts"] == 2 for _, stats in answers)  # the retry was the one that answered
    exc, sent = got["stream_openai"]
    assert "died" in str(exc) and full.startswith(sent), exc  # openai raises the terminal error event
    status, payloads = got["stream_raw"]
    assert status == 200 and payloads[-1] == b"[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == 503 and "died after part of the answer was sent" in error["message"]
    assert all(b'"error"' not in p for p in payloads[:-2])  # exactly one terminal error event
    assert scrape(served)["dresd:requests_retried_total"] >= retried_before + 1
    again = client.completions.create(model="dresd", prompt=PROMPT, max_tokens=3, temperature=0)
    assert again.model_extra["dresd"]["datastore_version"] == pinned  # the pin is in the root: restarts keep it
    assert raw(served, "POST", "/admin/unpin", b"")[0] == 200


def test_a_request_that_crashes_its_replicas_is_retried_once_then_answered_503(served, client, reference):
    """A prompt that kills every replica it reaches (the CRASH hook) takes down two, no more,
    and gets one 503 naming the dead replica; a request decoding meanwhile gets one answer;
    the restarted replicas serve again."""
    import threading

    before = scrape(served)
    full = reference(LONG_PROMPT, "greedy", LONG)
    body = {"prompt": LONG_PROMPT, "max_tokens": LONG, "temperature": 0, "dresd": {"method": "greedy"}}
    other: dict = {}
    worker = threading.Thread(target=lambda: other.update(answer=raw(served, "POST", "/v1/completions",
                                                                      json.dumps(body).encode(), timeout=RESTART_WAIT_S)))
    worker.start()
    time.sleep(0.3)
    status, _, data = raw(served, "POST", "/v1/completions", json.dumps({"prompt": f"{CRASH} now"}).encode(),
                          timeout=RESTART_WAIT_S)
    error = json.loads(data)["error"]
    assert status == 503 and "replica" in error["message"] and "died on each of 2 attempts" in error["message"]
    worker.join(RESTART_WAIT_S + 10)
    status, _, data = other["answer"]
    answer = json.loads(data)
    assert (status == 200 and answer["choices"][0]["text"] == full) or (status == 503 and "died" in data.decode()), \
        answer
    after = scrape(served)
    assert after["dresd:requests_retried_total"] >= before["dresd:requests_retried_total"] + 1
    assert after['dresd:requests_total{outcome="error"}'] >= before['dresd:requests_total{outcome="error"}'] + 1
    again = client.with_options(timeout=RESTART_WAIT_S).completions.create(model="dresd", prompt=PROMPT,
                                                                             max_tokens=3, temperature=0)
    assert again.choices[0].text


def test_the_app_is_an_ingress_decoding_replicas_and_its_metrics_hub(served):
    from ray import serve

    deployments = serve.status().applications["dresd-test"].deployments
    assert set(deployments) == {"DresdIngress", "DresdDecoder", "MetricsHub"}
    assert {name.split("#")[1] for name in app_actors()} == set(deployments)  # nothing detached beside them


def test_bound_beyond_loopback_without_a_key_it_refuses_to_start(monkeypatch):
    from dresd.serving.app import api_key_for

    monkeypatch.delenv("DRESD_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="not loopback"):
        api_key_for(ServeConfig(host="0.0.0.0"))
    assert api_key_for(ServeConfig()) is None
    monkeypatch.setenv("DRESD_API_KEY", "k")
    assert api_key_for(ServeConfig(host="0.0.0.0")) == "k"


def test_the_serve_config_file_in_the_repository_loads_as_a_serve_config():
    from pathlib import Path

    import yaml

    from dresd.serving.app import resolve_config

    path = Path(__file__).parents[2] / "jobs" / "configs" / "serve.yaml"
    app = yaml.safe_load(path.read_text())["applications"][0]
    assert app["import_path"] == "dresd.serving.app:build_app"
    cfg = resolve_config({**app["args"], "set": ["max_batch=4"]})
    assert (cfg.host, cfg.replicas, cfg.max_batch, cfg.speculative.method) == ("0.0.0.0", 2, 4, "dresd")
    assert cfg.model.threads == 2
    with pytest.raises(ConfigError, match="replicas"):
        resolve_config({**app["args"], "replicas": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_config({"speculative": {"metod": "pld"}})


def test_the_cache_bound_of_the_config_reaches_the_decoding_replicas():
    from dresd.config import CacheConfig
    from dresd.serving.app import build_app

    def decoder_env(cfg: ServeConfig) -> dict:
        ingress = build_app(cfg)._bound_deployment
        decoder = next(a for a in ingress.init_args if getattr(a, "_bound_deployment", None) is not None
                       and a._bound_deployment.name == "DresdDecoder")
        return decoder._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]

    assert decoder_env(ServeConfig(cache=CacheConfig(max_gb=3)))["DRESD_CACHE_MAX_GB"] == "3.0"
    assert "DRESD_CACHE_MAX_GB" not in decoder_env(ServeConfig())  # the node's own bound applies
