"""Closed-loop clients against `dresd serve`: output tokens/s, time to first token and
per-token latency (p50 / p99) and requests lost, per method and concurrency.

    .venv/bin/python benchmarks/serve_bench.py --datastore stores/sgpt [--methods greedy,suffix,dresd] \
        [--concurrency 1,4,16] [--requests 32] [--max-tokens 64] [--replicas 1] [--kill-replica]
    .venv/bin/python benchmarks/serve_bench.py --url http://127.0.0.1:8000 ...   # a server already up

Each of C client threads sends one streamed /v1/completions request (greedy, `dresd.method`
set per run, MT-Bench first turns in turn) and the next as soon as it ends, until
--requests have been sent. A request is lost unless it ends with `data: [DONE]` after a
last chunk carrying its `dresd` report; TTFT is arrival of the first text chunk, per-token
latency (end - first token) / (tokens - 1). With --kill-replica, one decoding replica
is killed halfway through each run (Serve starts a new one; the ingress retries the requests
it held that had sent no text, and ends the streams that had with an error event). A request is answered (ok), answered with an error (an HTTP error
status, or a stream's terminal error event), or lost (no answer: a broken connection, a
timeout); lost must be 0. Every concurrency runs in --passes passes, the methods in turn
within each from a rotating start, so a change of load on the machine falls on all alike;
"x greedy" is the median over passes of a method's tokens/s over greedy's in the same pass.
At concurrency 1 --requests are split over the passes; above it, each pass sends at least
as many requests as clients. With --in-process, the same requests also run one at a time in
this process (dresd.decoding.engine.Engine, same model and threads) after each served run at
concurrency 1, and concurrency 1's tokens/s is reported against them. Results: a markdown table
on stdout and serve_bench.json in --out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

# As the dresd command line sets them, before torch loads: the in-process baseline must run
# as `dresd generate` does (spinning OpenMP threads collapse forwards on a busy machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# Prompt sets the requests cycle through (benchmarks.spec_bench.eval_sets), as the report names them.
PROMPT_SETS = {"mtbench": "MT-Bench", "sharegpt": "held-out ShareGPT"}


def one_request(url: str, key: str | None, prompt: str, method: str, max_tokens: int, timeout: float) -> dict:
    """Send one streamed request; its timings and whether it was answered in full."""
    u = urlparse(url)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "dresd": {"method": method}})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    start, first, tokens, done, report, status = time.perf_counter(), None, 0, False, None, 0
    errored = False
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
        conn.request("POST", u.path.rstrip("/") + "/v1/completions", body=body, headers=headers)
        resp = conn.getresponse()
        status = resp.status
        errored = status != 200  # an HTTP error answer (4xx/5xx with its JSON body)
        while status == 200:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                errored = True  # the terminal error event; [DONE] follows it
                continue
            if event.get("choices") and event["choices"][0].get("text") and first is None:
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            report = event.get("dresd") or report
        conn.close()
    except (OSError, http.client.HTTPException, json.JSONDecodeError):
        pass
    end = time.perf_counter()
    ok = done and report is not None and not errored
    return {"ok": ok, "errored": errored, "status": status, "tokens": tokens if ok else 0, "e2e_s": end - start,
            "ttft_s": (first - start) if first else None,
            "tpot_s": (end - first) / (tokens - 1) if ok and first and tokens > 1 else None,
            "accepted": (report or {}).get("accepted_tokens", 0), "calls": (report or {}).get("target_calls", 0)}


def pct(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_requests(url, key, prompts, method, concurrency, requests, max_tokens, timeout, kill=None,
                 first: int = 0) -> tuple[list[dict], float]:
    """C closed-loop clients until `requests` are sent (prompts from number `first` on);
    `kill()` is called halfway. Returns every request's result and the wall time."""
    results, lock, sent = [], threading.Lock(), [0]

    def client():
        while True:
            with lock:
                if sent[0] >= requests:
                    return
                i = sent[0]
                sent[0] += 1
                if kill is not None and i == requests // 2:
                    threading.Thread(target=kill, daemon=True).start()
            r = one_request(url, key, prompts[(first + i) % len(prompts)], method, max_tokens, timeout)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def summary(method: str, concurrency: int, results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    calls = sum(r["calls"] for r in ok)
    errored = sum(r["errored"] for r in results)
    return {"method": method, "concurrency": concurrency, "requests": len(results), "errors": errored,
            "lost": len(results) - len(ok) - errored,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "wall_s": wall,
            "ttft_p50_s": pct([r["ttft_s"] for r in ok], 0.5), "ttft_p99_s": pct([r["ttft_s"] for r in ok], 0.99),
            "tpot_p50_s": pct([r["tpot_s"] for r in ok], 0.5), "tpot_p99_s": pct([r["tpot_s"] for r in ok], 0.99),
            "mat": (sum(r["accepted"] for r in ok) + calls) / calls if calls else None,
            "statuses": sorted({r["status"] for r in results})}


def kill_one_replica(app_name: str):
    def kill():
        import ray

        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(f"SERVE_REPLICA::{app_name}#DresdDecoder#"):  # not the ingress or hub
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
                print(f"killed {actor['name']}", file=sys.stderr)
                return
    return kill


class InProcess:
    """The same requests decoded one at a time in this process, as `dresd generate` does."""

    def __init__(self, cfg):
        from dresd.datastore.store import Datastore
        from dresd.decoding.engine import Engine
        from dresd.model.loading import load_model

        self.cfg = cfg
        self.engine = Engine(load_model(cfg.model), Datastore(cfg.datastore) if cfg.datastore else None)
        self.tokens, self.seconds, self.accepted, self.calls = {}, {}, {}, {}

    def run(self, prompts: list[str], method: str, requests: int, max_tokens: int, first: int = 0) -> None:
        """Decode requests `first` .. `first + requests` and add them to the method's totals.
        MAT as the served rows count it, (accepted + target calls) / target calls: a served
        MAT is judged against this one, on the same prompts, not against another prompt set's."""
        from dataclasses import replace

        spec = replace(self.cfg.speculative, method=method)
        if method not in self.tokens:
            self.engine.generate(prompts[0], spec, 4)  # warm, as the served run is
            self.tokens[method] = self.seconds[method] = self.accepted[method] = self.calls[method] = 0
        t0 = time.perf_counter()
        for i in range(first, first + requests):
            gen = self.engine.generate(prompts[i % len(prompts)], spec, max_tokens)
            self.tokens[method] += len(gen.token_ids)
            self.accepted[method] += gen.metrics.accepted
            self.calls[method] += gen.metrics.target_calls
        self.seconds[method] += time.perf_counter() - t0

    def figures(self, method: str) -> tuple[float, float | None]:
        """(tokens/s, MAT) over every run of `method`."""
        calls = self.calls[method]
        mat = (self.accepted[method] + calls) / calls if calls else None
        return self.tokens[method] / self.seconds[method], mat


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server (default: start one here)")
    p.add_argument("--datastore", default=None)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: packaged SmolLM2-135M)")
    p.add_argument("--methods", default="greedy,suffix,dresd")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=32, help="requests per method and concurrency")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads per replica (0 = torch's default)")
    p.add_argument("--kill-replica", action="store_true", help="kill one replica halfway through each run")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a client waits for one request")
    p.add_argument("--in-process", action="store_true",
                   help="also decode the requests one at a time in this process (the concurrency-1 baseline)")
    p.add_argument("--passes", type=int, default=2,
                   help="passes per concurrency, methods in turn within each (with --in-process, concurrency 1 "
                        "alternates served and in-process runs)")
    p.add_argument("--prompt-set", choices=tuple(PROMPT_SETS), default="mtbench",
                   help="MT-Bench first turns, or held-out ShareGPT first turns (the corpus the bench stores hold)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()

    from benchmarks.spec_bench import eval_sets
    from dresd.config import ModelConfig, ServeConfig, SpeculativeConfig

    cfg = ServeConfig(model=ModelConfig(path=args.model, threads=args.threads), datastore=args.datastore,
                      # Each request names its method; the replicas' default needs no datastore.
                      speculative=SpeculativeConfig(method="greedy"), replicas=args.replicas, max_batch=args.max_batch,
                      max_ongoing_requests=max(64, args.max_batch), max_queued_requests=-1,
                      request_timeout_s=args.timeout, app_name="dresd-bench", port=args.port)
    url, started = args.url, False
    if url is None:
        from dresd.serving.app import start

        url, started = start(cfg), True
    key = os.environ.get(cfg.api_key_env)
    prompts = eval_sets([args.prompt_set])[args.prompt_set]
    # Loaded while the server is up: concurrency 1 alternates served and in-process passes
    # over the same prompts, so a change of load on the machine falls on both alike.
    local = InProcess(cfg) if args.in_process else None
    rows = []
    methods = args.methods.split(",")
    try:
        for method in methods:
            one_request(url, key, prompts[0], method, 4, args.timeout)  # warm: drafters, cost model
        for c in (int(x) for x in args.concurrency.split(",")):
            # Each pass sends every method a share of the requests (at least c, so c clients
            # stay busy), methods in turn from a rotating start: load that drifts over minutes
            # falls on every method alike, and "x greedy" pairs each pass's figures.
            per = max(c, -(-args.requests // args.passes))
            got = {m: ([], 0.0, []) for m in methods}
            sent = 0
            for p in range(args.passes):
                n = min(per, args.requests - sent) if c == 1 else per
                if n <= 0:
                    break
                for method in methods[p % len(methods):] + methods[: p % len(methods)]:
                    kill = kill_one_replica(cfg.app_name) if args.kill_replica and p == 0 else None
                    res, took = run_requests(url, key, prompts, method, c, n, args.max_tokens, args.timeout, kill, sent)
                    results, wall, rates = got[method]
                    rates.append(sum(r["tokens"] for r in res if r["ok"]) / took)
                    got[method] = (results + res, wall + took, rates)
                    if c == 1 and local is not None:
                        local.run(prompts, method, n, args.max_tokens, sent)
                sent += n
            for method in methods:
                results, wall, rates = got[method]
                row = summary(method, c, results, wall)
                row["pass_tokens_per_s"] = rates
                if "greedy" in got:
                    row["x_greedy"] = statistics.median(a / b for a, b in zip(rates, got["greedy"][2]))
                if c == 1 and local is not None:
                    row["in_process_tokens_per_s"], row["in_process_mat"] = local.figures(method)
                    print(f"{method} in-process: {row['in_process_tokens_per_s']:.1f} tok/s, "
                          f"MAT {fmt(row['in_process_mat'], '.2f')}", file=sys.stderr)
                rows.append(row)
                print(f"{method} c={c}: {row['tokens_per_s']:.1f} tok/s (passes: "
                      f"{', '.join(f'{x:.1f}' for x in rates)}), lost {row['lost']}", file=sys.stderr)
    finally:
        if started:
            from ray import serve

            from dresd.serving.app import stop

            stop(cfg)
            serve.shutdown()
    lines = ["# Serving: closed-loop clients against dresd serve", "",
             f"{args.replicas} decoding replica(s), max batch {args.max_batch}, streamed "
             f"{PROMPT_SETS[args.prompt_set]} requests ({args.requests} per row at concurrency 1, at least the "
             f"concurrency per pass above it), {args.max_tokens} new tokens, greedy, {args.passes} passes with the "
             f"methods in turn; x greedy: the median over passes of each pass's ratio; "
             f"datastore {args.datastore}"
             + ("; one decoding replica killed halfway through each row's first pass" if args.kill_replica else "")
             + f"; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end.", "",
             "| method | concurrency | requests | lost | errors | tokens/s | x greedy | x in-process | TTFT p50 | "
             "TTFT p99 | per-token p50 | per-token p99 | MAT | MAT in-process |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = r.get("in_process_tokens_per_s")
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        lines.append(f"| {r['method']} | {r['concurrency']} | {r['requests']} | {r['lost']} | {r['errors']} | "
                     f"{r['tokens_per_s']:.1f} | {fmt(r.get('x_greedy'), '.2f')} | {ratio} | "
                     f"{fmt(r['ttft_p50_s'])} | {fmt(r['ttft_p99_s'])} | "
                     f"{fmt(r['tpot_p50_s'], '.4f')} | {fmt(r['tpot_p99_s'], '.4f')} | {fmt(r['mat'], '.2f')} | "
                     f"{fmt(r.get('in_process_mat'), '.2f')} |")
    print("\n".join(lines))
    from dresd.evaluation.results import save_run

    print(f"wrote {save_run('serve_bench', chr(10).join(lines) + chr(10), args.out)}")


if __name__ == "__main__":
    main()
