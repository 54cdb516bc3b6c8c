"""The OpenAI wire format of `dresd serve`: request bodies checked into typed requests, and
the response, chunk and error bodies the routes send (dresd.serving.ingress).

A bad body is an `ApiError` naming the field (`param`), answered 4xx in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}); nothing here touches the model. The
`dresd` object in a body picks the method and budget for that request, and every response
carries a `dresd` object with the datastore version that served it and that request's
drafting counters. `IncrementalText` turns the tokens a request has emitted so far into the
text to send next, holding back what could still become a stop string or a split character.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from dresd.drafters.registry import available_methods

BUDGETS = ("auto", "off")
ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # OpenAI's limit on stop sequences


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, a message naming the field, and `param`."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass
class GenerationRequest:
    """One checked /v1/completions or /v1/chat/completions request."""

    kind: Literal["completion", "chat"]
    prompt: str | None = None  # completions: the prompt text (laid out in the datastore's format)
    messages: list[dict] | None = None  # chat: [{"role", "content"}], content as text
    max_tokens: int = 16
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: usage in the last chunk
    method: str | None = None  # dresd.method (None: the server's configured method)
    budget: str | None = None  # dresd.budget (None: the server's configured budget)


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {value!r}", name)
    return float(value)


def _text_content(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where} must be a string or a list of text parts", where)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "messages is required (a list of {role, content})", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content", where)
        if m.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {list(ROLES)}, got {m.get('role')!r}", f"{where}.role")
        out.append({"role": m["role"], "content": _text_content(m.get("content"), f"{where}.content")})
    if not any(m["content"].strip() for m in out):
        raise ApiError(400, "messages hold no text", "messages")
    return out


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "prompt is required (a string)", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the openai client may send a one-item batch
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt")
    if not prompt.strip():
        raise ApiError(400, "prompt is empty", "prompt")
    return prompt


def _dresd_options(body: dict) -> tuple[str | None, str | None]:
    opts = body.get("dresd")
    if opts is None:
        return None, None
    if not isinstance(opts, dict):
        raise ApiError(400, "dresd must be an object such as {\"method\": \"dresd\", \"budget\": \"auto\"}", "dresd")
    unknown = sorted(set(opts) - {"method", "budget"})
    if unknown:
        raise ApiError(400, f"dresd.{unknown[0]} is not a known option; known: method, budget", f"dresd.{unknown[0]}")
    method, budget = opts.get("method"), opts.get("budget")
    if method is not None and method not in available_methods():
        raise ApiError(400, f"dresd.method: unknown method {method!r}; expected one of {available_methods()}",
                       "dresd.method")
    if budget is not None and budget not in BUDGETS:
        raise ApiError(400, f"dresd.budget must be one of {list(BUDGETS)}, got {budget!r}", "dresd.budget")
    return method, budget


def parse_json_object(raw: bytes) -> dict:
    """Body `raw` as a JSON object; ApiError 400 (param "body") when it is not UTF-8 JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not UTF-8 (byte {exc.start})", "body") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}", "body")
    return body


def parse_request(raw: bytes, kind: Literal["completion", "chat"], default_max_tokens: int) -> GenerationRequest:
    """The checked request in body `raw`; ApiError (4xx) naming the field otherwise."""
    body = parse_json_object(raw)
    req = GenerationRequest(kind)
    if kind == "chat":
        req.messages = _messages(body)
    else:
        req.prompt = _prompt(body)
    name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"{name} must be an integer >= 1, got {max_tokens!r}", name)
    req.max_tokens = max_tokens
    req.temperature = _number(body, "temperature", 1.0)
    if req.temperature < 0:
        raise ApiError(400, f"temperature must be >= 0, got {req.temperature!r}", "temperature")
    req.top_p = _number(body, "top_p", 1.0)
    if not 0.0 < req.top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p!r}", "top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", "seed")
    req.seed = seed
    req.stop = _stops(body.get("stop"))
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {n!r}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, f"stream must be a boolean, got {stream!r}", "stream")
    req.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}", "stream_options")
        req.include_usage = bool(options.get("include_usage", False))
    req.method, req.budget = _dresd_options(body)
    return req


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    return stops


# ----------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def dresd_stats(version: str | None, method: str, metrics) -> dict:
    """A request's drafting report (metrics: its dresd.decoding.metrics.DecodeMetrics)."""
    return {"datastore_version": version, "method": method, "drafted_tokens": metrics.drafted,
            "accepted_tokens": metrics.accepted, "target_calls": metrics.target_calls,
            "mean_accepted_tokens": round(metrics.mean_accepted_tokens, 4)}


def response(req: GenerationRequest, rid: str, model: str, text: str, finish: str, use: dict, stats: dict) -> dict:
    """The whole (non-streamed) answer."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": use, "dresd": stats}


def chunk(req: GenerationRequest, rid: str, model: str, text: str | None, finish: str | None = None,
          first: bool = False, use: dict | None = None, stats: dict | None = None, empty: bool = False) -> dict:
    """One streamed chunk: new text, the finish reason (last choice chunk), or, with `empty`,
    the usage-only chunk OpenAI sends last (no choices)."""
    if req.kind == "chat":
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
           "choices": [] if empty else [choice]}
    if use is not None:
        out["usage"] = use
    if stats is not None:
        out["dresd"] = stats
    return out


def sse(data: dict) -> bytes:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


class IncrementalText:
    """The text of a growing token list, released as it becomes final.

    `update(tokens)` returns (new text to send, stopped): text is held back while it ends in
    a split UTF-8 character or in what could be the start of a stop string; once a stop
    string appears, the text before it is released and `stopped` is True.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.sent = ""  # text released so far
        self.text = ""  # text decoded so far (a stop string cut off)

    def update(self, tokens: list[int], final: bool = False) -> tuple[str, bool]:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if hits:
            cut = min(hits)[0]
            self.text = text[:cut]
            return self._release(self.text), True
        self.text = text
        if final:
            return self._release(text), False
        end = len(text)
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for s in self.stops:  # hold back a suffix that a stop string starts with
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k:end] == s[:k]:
                    hold = max(hold, k)
                    break
        end -= hold
        return self._release(text[:max(end, len(self.sent))]), False

    def _release(self, upto: str) -> str:
        if not upto.startswith(self.sent):  # a re-decode changed earlier text: send nothing new
            return ""
        new = upto[len(self.sent):]
        self.sent = upto
        return new
