"""jobs/build.py as a user runs it: a subprocess (own local Ray), and through `ray job submit`
against a local head with token auth. Plus the `--set` override helper it shares."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from dresd.config import BuildConfig, CorpusConfig, load_yaml
from dresd.config.loader import load_config
from jobs.common import resolve_address

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # .venv/bin when run as `.venv/bin/python -m pytest`


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model folder and a 20-record prompt/response corpus."""
    from tiny_models import make_tiny_llama

    tmp = tmp_path_factory.mktemp("job")
    model = make_tiny_llama(tmp / "tiny", vocab_size=272)
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(
        json.dumps({"prompt": f"question {i}?", "response": f"answer {i}: " + "abc " * (i % 5 + 3)}) + "\n"
        for i in range(20)))
    return tmp, model, corpus


def _config(path: Path, model: Path, corpus: Path, output: Path, extra: dict | None = None) -> Path:
    data = {
        "model": {"path": str(model)},
        "corpus": {"paths": [str(corpus)], "kind": "prompt_response", "max_tokens": 256},
        "index": {"dim": 16},
        "output": str(output),
        "value_len": 8,
        "check_sample": 50,
    }
    for key, value in (extra or {}).items():  # a dict merges into its section; a scalar is set
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in a job entrypoint = this venv
    env.update(extra)
    return env


def _run_job(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.build", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _check_store(stdout: str, output: Path, max_records: int) -> None:
    version = re.search(r"^datastore version: (\S+)$", stdout, re.M)
    assert version, stdout
    assert Path(version.group(1)).parent.parent == output
    assert (output / "CURRENT").is_file()
    assert re.search(rf"^rows read {max_records}\b", stdout, re.M), stdout
    assert "intrinsic check: recall@50" in stdout
    manifest = json.loads((Path(version.group(1)) / "manifest.json").read_text())
    assert manifest["build_config"]["corpus"]["max_records"] == max_records  # the --set reached the build


# ----------------------------------------------------------------------------- subprocess


@pytest.mark.subprocess
@pytest.mark.ray  # the job starts its own local Ray
def test_build_job_subprocess(tiny):
    tmp, model, corpus = tiny
    cfg = _config(tmp / "build.yaml", model, corpus, tmp / "unused")
    output = tmp / "store"
    t0 = time.perf_counter()
    r = _run_job("--config", str(cfg), "--output", str(output), "--set", "corpus.max_records=15")
    assert r.returncode == 0, r.stderr[-4000:]
    _check_store(r.stdout, output, 15)
    assert "(ray: local)" in r.stdout
    assert not (tmp / "unused").exists()  # --output beat the config's output
    print(f"build job subprocess: {time.perf_counter() - t0:.1f}s")


@pytest.mark.subprocess  # exits before Ray starts
@pytest.mark.parametrize(
    "yaml_extra, args, named",
    [
        ({"corpus": {"pathz": ["x.jsonl"]}}, [], "pathz"),  # unknown key in the YAML
        ({"embed_actorz": 2}, [], "embed_actorz"),
        ({}, ["--set", "index.nprob=4"], "nprob"),  # unknown key in an override
        ({}, ["--set", "value_len=twenty"], "value_len"),  # a value of the wrong type
        ({}, ["--set", "corpus.kind=tsv"], "corpus.kind"),  # not one of the Literal's choices
        ({}, ["--bogus-flag"], "--bogus-flag"),
    ],
)
def test_bad_config_exits_1_naming_the_problem(tiny, yaml_extra, args, named):
    tmp, model, corpus = tiny
    cfg = _config(tmp / f"bad-{named.strip('-')}.yaml", model, corpus, tmp / "never", yaml_extra)
    r = _run_job("--config", str(cfg), *args, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert named in r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr  # one clear line
    assert not (tmp / "never").exists()


@pytest.mark.subprocess
def test_missing_config_file_exits_1(tmp_path):
    r = _run_job("--config", str(tmp_path / "nope.yaml"), timeout=60)
    assert r.returncode == 1 and "config file not found" in r.stderr


# ----------------------------------------------------------------------------- ray job submit


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_using(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker` (this head's temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def ray_head():
    """A local Ray head with token auth and the dashboard on 127.0.0.1, on free ports.

    Started with --block in its own session so that it is stopped by signalling exactly the
    processes it started (`ray stop` would stop every Ray on the machine).
    """
    ray_cli = BIN / "ray"
    if not ray_cli.exists():
        pytest.skip("ray CLI not found next to the interpreter")
    gcs, dash, agent, client = _free_ports(4)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must fit
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # SIGTERM to `ray start --block` stops its processes at once (no 30 s node drain).
    head_env = dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host", "127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         "--temp-dir", temp, "--disable-usage-stats"],
        env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without a token: the server is up
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("ray head did not start:\n" + (Path(temp) / "head.log").read_text()[-3000:])
                time.sleep(0.5)
        yield address, env
    finally:
        # SIGTERM the head's own process group, then SIGKILL whatever of it is left.
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 15)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                pass
            try:
                head.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        log.close()
        deadline = time.monotonic() + 10
        while (leftovers := _processes_using(temp)) and time.monotonic() < deadline:
            time.sleep(0.5)  # still exiting
        for pid in leftovers:  # started by this head (its private temp dir) outside its group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftovers, f"ray head left processes behind: {leftovers}"


def _submit(address: str, env: dict, *job_args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit ... -- python -m jobs.build ...` from the repo root; retried while the
    head's job agent is still starting."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "-m", "jobs.build", *job_args]
    deadline = time.monotonic() + 60
    while True:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(2)


@pytest.mark.subprocess
@pytest.mark.ray  # ray_head: a Ray head process
def test_ray_job_submit_with_token_auth(tiny, ray_head):
    address, env = ray_head
    tmp, model, corpus = tiny
    cfg = _config(tmp / "submit.yaml", model, corpus, tmp / "submit-store")
    t0 = time.perf_counter()

    # A client without the token (and no ~/.ray/auth_token: HOME elsewhere) is refused.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    no_token["HOME"] = str(tmp)
    r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], cwd=ROOT, env=no_token,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "uthenticat" in r.stdout + r.stderr, r.stdout + r.stderr

    r = _submit(address, env, "--config", str(cfg), "--set", "corpus.max_records=12")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_store(r.stdout, tmp / "submit-store", 12)
    assert "(ray: " in r.stdout and "(ray: local)" not in r.stdout  # joined the head via RAY_ADDRESS

    bad = _submit(address, env, "--config", str(cfg), "--set", "corpus.nope=1", timeout=120)
    assert bad.returncode != 0
    assert "nope" in bad.stdout + bad.stderr
    print(f"ray job submit (2 jobs): {time.perf_counter() - t0:.1f}s")


# ----------------------------------------------------------------------------- jobs.common


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None, None) is None
    assert resolve_address(None, "cfg:1") == "cfg:1"
    monkeypatch.setenv("RAY_ADDRESS", "env:2")
    assert resolve_address(None, "cfg:1") == "env:2"
    assert resolve_address("flag:3", "cfg:1") == "flag:3"


def test_example_config_loads():
    path = ROOT / "jobs/configs/build_sharegpt.yaml"
    cfg = load_config(BuildConfig, path)
    assert cfg == load_yaml(BuildConfig, path)
    assert cfg.corpus.paths == ["sharegpt"] and cfg.corpus.kind == "conversations"
    assert cfg.corpus.max_records == 2000 and cfg.corpus.prompt_format == "chat"
    assert cfg.output == "runs/stores/sharegpt"
    assert isinstance(cfg.corpus, CorpusConfig)
