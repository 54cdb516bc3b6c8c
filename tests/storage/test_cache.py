"""Tests for dresd.storage.cache: the cache root, cached machine measurements, folders built
once and published whole (rebuilt when partial or corrupt, built once under concurrency),
and remote files fetched into the cache."""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from dresd.storage.cache import MARKER_FILE, cache_problem, cache_root, cached_measurement, ensure_cached, fetch


def fake_builder(counter: Path, delay: float, out: Path) -> None:
    """Builder for ensure_cached tests: records each run, writes a 'weights' and a json file."""
    with open(counter, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(delay)
    (out / "config.json").write_text(json.dumps({"a": 1}))
    (out / "sub").mkdir()
    (out / "sub" / "model.safetensors").write_bytes(os.urandom(4096))


def _runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def _concurrent_worker(target: str, counter: str, barrier) -> None:
    barrier.wait()
    out = ensure_cached(Path(target), functools.partial(fake_builder, Path(counter), 2.0))
    assert cache_problem(out) is None


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DRESD_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "dresd"


def _delete_weights(d: Path):
    (d / "sub" / "model.safetensors").unlink()


def _truncate_weights(d: Path):
    with open(d / "sub" / "model.safetensors", "r+b") as fh:
        fh.truncate(100)


def _remove_marker(d: Path):
    (d / MARKER_FILE).unlink()


def _garble_marker(d: Path):
    (d / MARKER_FILE).write_text("{not json")


def _edit_json_same_size(d: Path):
    (d / "config.json").write_text(json.dumps({"a": 2}))


def _extra_file(d: Path):
    (d / "stray.bin").write_bytes(b"x")


@pytest.mark.parametrize(
    "corrupt", [_delete_weights, _truncate_weights, _remove_marker, _garble_marker, _edit_json_same_size, _extra_file]
)
def test_corrupt_cache_is_rebuilt(tmp_path, caplog, corrupt):
    target, counter = tmp_path / "entry", tmp_path / "runs.txt"
    build = functools.partial(fake_builder, counter, 0.0)
    assert ensure_cached(target, build) == target
    assert cache_problem(target) is None and _runs(counter) == 1
    ensure_cached(target, build)
    assert _runs(counter) == 1  # a valid entry is reused
    corrupt(target)
    assert cache_problem(target) is not None
    with caplog.at_level(logging.WARNING, logger="dresd.storage.cache"):
        ensure_cached(target, build)
    assert _runs(counter) == 2
    assert cache_problem(target) is None
    assert any("rebuilding" in r.getMessage() for r in caplog.records)


def test_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "entry"

    def broken(out: Path):
        (out / "half.bin").write_bytes(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ensure_cached(target, broken)
    assert not target.exists()
    assert not list(tmp_path.glob(".entry.tmp-*"))
    ensure_cached(target, functools.partial(fake_builder, tmp_path / "runs.txt", 0.0))
    assert cache_problem(target) is None


def test_two_processes_build_once(tmp_path):
    target, counter = tmp_path / "entry", tmp_path / "runs.txt"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_concurrent_worker, args=(str(target), str(counter), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _runs(counter) == 1
    assert cache_problem(target) is None


def test_cached_measurement_is_taken_once_per_key(tmp_path):
    path = tmp_path / "m" / "cost.json"
    taken = []

    def measure():
        taken.append(1)
        return {"seconds": len(taken)}

    assert cached_measurement(path, "cpu-1", measure) == {"seconds": 1}
    assert cached_measurement(path, "cpu-1", measure) == {"seconds": 1} and len(taken) == 1  # read back
    # Another key (another model, device or thread count) is measured again, and replaces it.
    assert cached_measurement(path, "cpu-2", measure) == {"seconds": 2}
    assert json.loads(path.read_text()) == {"key": "cpu-2", "value": {"seconds": 2}}
    assert cached_measurement(path, "cpu-2", measure, refresh=True) == {"seconds": 3}
    # An unreadable file is measured again; no temporary file stays behind.
    path.write_text("{not json")
    assert cached_measurement(path, "cpu-2", measure) == {"seconds": 4}
    assert sorted(p.name for p in path.parent.iterdir()) == ["cost.json"]


def test_fetch_caches_and_refetches_changed_files(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "c.jsonl"
    src.write_text('{"a": 1}\n')
    uri = f"file://{src}"
    first = fetch(uri)
    assert first.read_text() == '{"a": 1}\n' and first != src and str(first).startswith(str(tmp_path / "cache"))
    assert fetch(uri) == first  # unchanged: the cached copy
    src.write_text('{"a": 2}\n{"a": 3}\n')
    os.utime(src, ns=(1, 1))
    again = fetch(uri)
    assert again != first and again.read_text().count("\n") == 2
    assert fetch(tmp_path / "c.jsonl") == src  # local paths are used in place
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        fetch(f"file://{tmp_path}/missing.jsonl")


def test_a_hung_builder_of_the_same_entry_is_waited_for_a_bounded_time(tmp_path, monkeypatch):
    import dresd.storage.cache as cache
    from dresd.storage.locks import LockTimeout, file_lock

    monkeypatch.setattr(cache, "CACHE_LOCK_TIMEOUT_S", 0.3)
    target = tmp_path / "entry"
    with file_lock(tmp_path / "entry.lock", 1, "a builder that never finishes"):
        with pytest.raises(LockTimeout, match=r"building cache entry .*entry: lock .*entry\.lock is still held after 0\.3 s"):
            cache.ensure_cached(target, lambda tmp: (tmp / "x").write_text("x"))
    assert cache.ensure_cached(target, lambda tmp: (tmp / "x").write_text("x")) == target  # lock free: builds
