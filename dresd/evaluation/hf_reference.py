"""Hugging Face `generate()` as an external reference, timed like our own loop.

Two ways: `PlainHFProcess` runs it as users do, in a fresh process with plain transformers
(nothing of dresd imported, no thread settings of ours, the model folder loaded by
`from_pretrained` with its defaults, `generate()` with the folder's generation config):
the reference our speed is quoted against. `hf_generate` runs it on a model loaded in this
process (a diagnostic: HF's loop on our fast-path weights). Plain greedy and HF's prompt
lookup (`prompt_lookup_num_tokens`); tokens/s counts new tokens over the whole
`generate()` call, prefill included, as DecodeMetrics.wall_s does for our loop.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time

import torch

from dresd.decoding.loop import Generation
from dresd.decoding.metrics import DecodeMetrics


@torch.inference_mode()
def hf_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int,
                prompt_lookup_num_tokens: int | None = None) -> Generation:
    """Greedy `model.generate` (optionally with prompt lookup); target calls are not observable."""
    ids = torch.tensor([prompt_ids], device=model.device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id,
                  attention_mask=torch.ones_like(ids))
    if prompt_lookup_num_tokens:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    # The model's own generation_config may carry sampling defaults: greedy must be explicit.
    kwargs.update(temperature=None, top_p=None, top_k=None)
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    wall = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    if eos_id in new:
        new = new[: new.index(eos_id) + 1]
    return Generation(token_ids=new, metrics=DecodeMetrics(new_tokens=len(new), wall_s=wall))


# Settings the project's own tools put in their environment (dresd/cli/main.py,
# benchmarks/spec_bench.py); a user's process runs with the OpenMP and OpenBLAS defaults.
PROJECT_THREAD_ENV = ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")

# The child: what a user of transformers writes, nothing more. It reads one JSON request a
# line ({"ids", "max_new_tokens", "prompt_lookup_num_tokens"}) and answers with the new
# tokens and the seconds of the generate() call.
_CHILD = r"""
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
eos = model.generation_config.eos_token_id
print(json.dumps({"ready": True, "eos": eos if isinstance(eos, list) else [eos], "dtype": str(model.dtype),
                  "threads": torch.get_num_threads(), "dresd_imported": "dresd" in sys.modules,
                  "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")}}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    ids = torch.tensor([req["ids"]])
    kw = {"prompt_lookup_num_tokens": req["prompt_lookup_num_tokens"]} if req.get("prompt_lookup_num_tokens") else {}
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["max_new_tokens"], **kw)
    wall = time.perf_counter() - t0
    print(json.dumps({"token_ids": out[0, ids.shape[1]:].tolist(), "wall_s": wall}), flush=True)
"""


class PlainHFProcess:
    """HF `generate()` in a fresh child process, as a user runs it (see the module docstring).

    `generate` sends one request and waits at most `timeout_s` for it; a child that dies or
    hangs raises RuntimeError naming the model folder and the end of the child's stderr."""

    def __init__(self, model_dir: str, timeout_s: float = 600.0, env: dict[str, str] | None = None):
        self.model_dir, self.timeout_s = str(model_dir), timeout_s
        if env is None:
            env = {k: v for k, v in os.environ.items() if k not in PROJECT_THREAD_ENV}
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, self.model_dir], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=env, bufsize=0)
        self._buf = b""
        self.info = self._read()  # eos ids, dtype, threads: what the child loaded
        self.eos_ids = set(self.info["eos"]) - {None}

    def _fail(self, what: str) -> RuntimeError:
        self.close()
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace")[-2000:]
        return RuntimeError(f"HF reference process for {self.model_dir}: {what}; its stderr ends:\n{tail}")

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise self._fail(f"no answer within {self.timeout_s:.0f} s")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise self._fail(f"exited with code {self.proc.wait()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def generate(self, prompt_ids: list[int], max_new_tokens: int,
                 prompt_lookup_num_tokens: int | None = None) -> Generation:
        """The child's `generate()` on these prompt ids; new tokens up to the first EOS, included."""
        req = {"ids": list(prompt_ids), "max_new_tokens": max_new_tokens,
               "prompt_lookup_num_tokens": prompt_lookup_num_tokens}
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._fail("its input is closed (the process ended)") from None
        out = self._read()
        new = out["token_ids"]
        cut = next((i + 1 for i, t in enumerate(new) if t in self.eos_ids), len(new))
        new = new[:cut]
        return Generation(token_ids=new, metrics=DecodeMetrics(new_tokens=len(new), wall_s=out["wall_s"]))

    def close(self) -> None:
        """End the child (its input closed, then killed if it lingers)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "PlainHFProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
