"""The packed kernel's build never waits forever (issue 25): torch's lock file left by a
build killed midway is removed and the build runs again; a live builder is waited for a
bounded time, then decoding runs stock linears. torch's compile step is stubbed at
cpp_extension.load; the locks, the waiting and the killed process are real."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from dresd.model.fastpath import cpu_linear

REPO = Path(__file__).resolve().parents[3]
BUILT = object()  # what the stubbed build returns in place of the compiled module


@pytest.fixture
def build_dir(tmp_path, monkeypatch):
    """An empty extension cache for this test; packed_kernel's memo cleared around it."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    cpu_linear.packed_kernel.cache_clear()
    yield tmp_path / "ext" / f"dresd_packed_linear_{cpu_linear.kernel_tag()}"
    cpu_linear.packed_kernel.cache_clear()  # later tests load the real kernel again


def torch_like_build(name, **kwargs):
    """cpp_extension.load's locking, minus the compiler: take torch's baton, or wait on it
    exactly as torch does (forever, while its file exists)."""
    baton = FileBaton(os.path.join(cpp_extension._get_build_directory(name, False), "lock"))
    if baton.try_acquire():
        baton.release()
    else:
        baton.wait()
    return BUILT


def packed_kernel_within(seconds: float):
    """packed_kernel() run in a thread: its result, or a failure if it is still waiting."""
    out = []
    worker = threading.Thread(target=lambda: out.append(cpu_linear.packed_kernel()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"packed_kernel() still waiting after {seconds} s"
    return out[0]


def run_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


KILLED_BUILD = """
import os
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton
from dresd.model.fastpath import cpu_linear

def killed_midway(name, **kwargs):
    FileBaton(os.path.join(cpp_extension._get_build_directory(name, False), "lock")).try_acquire()
    os._exit(9)  # as if killed while compiling: torch's lock file stays behind

cpp_extension.load = killed_midway
cpu_linear.packed_kernel()
"""


def test_a_lock_left_by_a_killed_build_is_removed_and_the_build_runs_again(build_dir, monkeypatch, caplog):
    proc = run_python(KILLED_BUILD)  # the fixture's TORCH_EXTENSIONS_DIR is in os.environ
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err
    assert (build_dir / cpu_linear.TORCH_LOCK).exists()  # what used to block every later process

    monkeypatch.setattr(cpp_extension, "load", torch_like_build)
    with caplog.at_level("WARNING", logger=cpu_linear.log.name):
        assert packed_kernel_within(30) is BUILT
    assert not (build_dir / cpu_linear.TORCH_LOCK).exists()
    assert any(f"removing {build_dir / 'lock'}, left by a kernel build that did not finish" in r.getMessage()
               for r in caplog.records)


HOLDER = """
import sys, time
from dresd.storage.locks import file_lock
with file_lock(sys.argv[1], 5, "test holder"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_live_builder_is_waited_for_a_bounded_time_then_stock_linears(build_dir, monkeypatch, caplog):
    build_dir.mkdir(parents=True)
    holder = run_python(HOLDER, str(build_dir / cpu_linear.BUILD_LOCK))
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        monkeypatch.setattr(cpu_linear, "KERNEL_BUILD_WAIT_S", 0.5)
        monkeypatch.setattr(cpp_extension, "load", torch_like_build)
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger=cpu_linear.log.name):
            assert packed_kernel_within(30) is None  # stock linears: slower, never wrong
        assert time.monotonic() - t0 < 10
        assert any("packed CPU linear kernel unavailable" in m and "is still held after 0.5 s" in m
                   and f"pid {holder.pid}" in m for m in (r.getMessage() for r in caplog.records))
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone, and the kernel released its lock with it: the next process builds.
    cpu_linear.packed_kernel.cache_clear()
    assert packed_kernel_within(30) is BUILT
