"""A shared-nothing Ray cluster on one machine, shaped like cluster.yaml's.

A head that advertises no CPUs and two workers, each a separate `ray start --block` process
in its own mount namespace (`unshare -m`): each node binds private folders over the same
`~/.cache`, scratch and Ray temp-dir paths, so `~/.cache/dresd` (converted models, fetched
versions, scratch mirrors), the node scratch path and each node's unpacked job working dir
hold different contents on every node, as on a real cluster. Token authentication is on. The only storage the nodes share is a `file://`
folder standing in for an object store; jobs go in with `ray job submit --working-dir`.

Needs root (mount namespaces); the fixture skips with the reason where `unshare -m` fails.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
START_TIMEOUT_S = 240.0
CACHE = Path.home() / ".cache"  # DReSD's cache (converted models, fetches, scratch mirrors) lives here


def node_ip() -> str:
    """This machine's address as Ray picks it."""
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SharedNothingCluster:
    """Handles of a running cluster: where its nodes' private folders are, its shared store
    and the environment that reaches it (token included)."""

    root: Path  # everything of this cluster (private node folders, shared store, logs)
    shared: Path  # the `file://` object store stand-in, the one folder every node sees
    scratch: Path  # one path, a different folder on every node (mount point)
    dashboard: str  # job server address for `ray job submit`
    env: dict  # environment of a client: token auth on, RAY_ADDRESS unset
    nodes: dict[str, Path] = field(default_factory=dict)  # node name -> its private ~/.cache
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def uri(self, rel: str) -> str:
        return f"file://{self.shared / rel}"

    def submit(self, entrypoint: str, timeout_s: float) -> concurrent.futures.Future:
        """Run `entrypoint` as a Ray job with this repository as its working dir, in the
        background (the test meanwhile runs its one-node reference); the future gives the
        `ray job submit` process's CompletedProcess."""
        cmd = [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO),
               "--runtime-env-json", '{"excludes": [".git", ".venv", "runs", "*.egg-info", "benchmarks"]}',
               "--", "bash", "-c", entrypoint]

        def run() -> subprocess.CompletedProcess:
            deadline = time.monotonic() + timeout_s
            while True:
                done = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=REPO,
                                      timeout=max(1.0, deadline - time.monotonic()))
                # The head's job agent registers a while after the node does (longer on a busy
                # machine); a submission it refuses was never started, so it is made again.
                if "No available agent to submit job" not in done.stderr or time.monotonic() > deadline - 60:
                    return done
                time.sleep(5)

        return concurrent.futures.ThreadPoolExecutor(1).submit(run)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                # Each node is its own session: the group holds its raylet, GCS and workers.
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def unshare_problem() -> str | None:
    """Why a node cannot get a private mount namespace here, or None."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -m fails: {probe.stderr.strip()}"


def _node_command(private: dict[Path, Path], ray_args: str) -> list[str]:
    """`ray start` in a mount namespace of its own, with each `private` folder bound over its
    path there (private folder -> the path every node uses)."""
    mounts = " && ".join(f"mount --bind {src} {dst}" for src, dst in private.items())
    # A node stops with the test process however that ends (a crash skips the fixture's teardown).
    orphan = "setpriv --pdeathsig TERM " if shutil.which("setpriv") else ""
    return ["unshare", "-m", "--propagation", "private", "bash", "-c",
            f"{mounts} && exec {orphan}{RAY} start --block {ray_args}"]


class NodeExited(RuntimeError):
    """A node's `ray start` ended while the cluster started."""

    def __init__(self, name: str, code: int, log: str):
        # The lines that say why; the log's tail is mostly the raylet's state dump.
        why = [line for line in log.splitlines() if any(w in line for w in ("Error", "Exception", "Failed", "failed"))]
        super().__init__(f"cluster node {name} exited ({code}): " + "\n".join(why[-15:] or [log[-2000:]]))
        self.name = name


def _wait_for_nodes(env: dict, gcs: str, count: int, procs: dict, logs: Path) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise NodeExited(name, proc.returncode, (logs / f"{name}.log").read_text())
        out = subprocess.run([sys.executable, "-c", probe, gcs], capture_output=True, text=True, env=env, timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise TimeoutError(f"cluster at {gcs}: {count} nodes not alive after {START_TIMEOUT_S:g} s; head log: "
                       + (logs / "head.log").read_text()[-2000:])


@pytest.fixture(scope="module")
def shared_nothing_cluster():
    """A head (CPU: 0) and two 1-CPU workers, each node in its own mount namespace."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if problem := unshare_problem():
        pytest.skip(f"shared-nothing cluster needs private mount namespaces: {problem}")
    # Short: Ray's unix socket paths live under the temp dir and are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="drc", dir="/tmp"))
    shared, scratch, logs = root / "shared", root / "scratch", root / "logs"
    for d in (shared, scratch, logs, root / "ray"):
        d.mkdir()
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DRESD_CACHE_DIR")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
               OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0",
               # A busy machine registers a raylet slowly; the default 30 s fails the node.
               RAY_raylet_start_wait_time_s="180",
               # Teardown stops the nodes at once: no Serve replicas to drain.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    port, dash = free_port(), free_port()
    # Ray rewrites a loopback GCS address to the machine's own address, so nodes bind to that.
    gcs = f"{node_ip()}:{port}"
    cluster = SharedNothingCluster(root=root, shared=shared, scratch=scratch, dashboard=f"http://127.0.0.1:{dash}", env=env)
    specs = {
        "head": f"--head --port {port} --num-cpus 0 --dashboard-host 127.0.0.1 "
                f"--dashboard-port {dash} --include-dashboard true --temp-dir {root}/ray --disable-usage-stats",
        "worker1": f"--address {gcs} --num-cpus 1",
        "worker2": f"--address {gcs} --num-cpus 1",
    }
    for name in specs:  # nodes on one machine: each agent on ports of its own (defaults are fixed)
        specs[name] += (f" --dashboard-agent-listen-port {free_port()} --dashboard-agent-grpc-port {free_port()}"
                        f" --metrics-export-port {free_port()} --runtime-env-agent-port {free_port()}")
    try:
        for name, args in specs.items():
            home, scr, temp = root / name / "cache", root / name / "scratch", root / name / "ray"
            # ~/.cache rather than all of $HOME: the Python install may live under $HOME (pyenv).
            # Ray's temp dir too: workers use the head's path, and a node unpacking a job's
            # working dir there would replace the driver's current directory.
            private = {home: CACHE, scr: scratch} | ({temp: root / "ray"} if name != "head" else {})
            for folder in private:
                folder.mkdir(parents=True)
            cluster.nodes[name] = home
            for attempt in (1, 2, 3):  # a worker that fails to register on a busy machine gets more tries
                with open(logs / f"{name}.log", "w") as log:
                    cluster.procs[name] = subprocess.Popen(_node_command(private, args), env=env, stdout=log,
                                                           stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
                try:
                    # One node at a time: a raylet that registers while another starts can time
                    # out on a busy machine, and workers give up on a GCS that is not up yet.
                    _wait_for_nodes(env, gcs, len(cluster.procs), cluster.procs, logs)
                    break
                except NodeExited as exc:
                    if exc.name != name or name == "head" or attempt == 3:
                        raise
                    del cluster.procs[name]
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
