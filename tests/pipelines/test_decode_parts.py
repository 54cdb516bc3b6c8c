"""Decode part files on a local folder and on a storage URI: a part appears whole or not at
all, crashed writers' temporaries and parts outside the plan go, and a second run on one
output is refused while the first holds it."""

from __future__ import annotations

import multiprocessing
import os

import pyarrow as pa
import pytest

from pipelines.decode_parts import META_KEY, OutputBusy, Parts, exclusive_run


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))


def _table(n: int, key: str):
    return pa.Table.from_pylist([{"row": i, "response": f"r{i}"} for i in range(n)],
                                schema=pa.schema([("row", pa.int64()), ("response", pa.string())],
                                                 metadata={META_KEY: ('{"key": "%s"}' % key).encode()}))


@pytest.mark.parametrize("uri", [False, True])
def test_parts_round_trip_and_leave_no_temporaries(tmp_path, uri):
    out = f"file://{tmp_path}/out" if uri else str(tmp_path / "out")
    parts = Parts(out)
    assert parts.prepare() == [] and parts.meta(0) is None
    parts.write(0, _table(3, "a"))
    parts.write(0, _table(2, "b"))  # replaced whole
    assert parts.meta(0) == {"key": "b"} and parts.read(0).num_rows == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["part-000000.parquet"]
    parts.write_text_file(f"{out}.jsonl", iter(["x\n", "y\n"]))
    assert (tmp_path / "out.jsonl").read_text() == "x\ny\n"
    assert sorted(os.listdir(tmp_path)) == ["out", "out.jsonl"]


def _crash_writing(out: str) -> None:
    os.environ["DRESD_FAULT"] = "during_part_write:kill"
    Parts(out).write(1, _table(4, "x"))


def test_a_crashed_writer_leaves_no_visible_part_and_the_next_run_clears_its_temporary(tmp_path):
    out = f"file://{tmp_path}/out"
    parts = Parts(out)
    parts.prepare()
    proc = multiprocessing.get_context("spawn").Process(target=_crash_writing, args=(out,))
    proc.start()
    proc.join(60)
    assert proc.exitcode not in (0, None)
    left = os.listdir(tmp_path / "out")
    assert not parts.exists(1) and len(left) == 1 and left[0].startswith(".part-000001.parquet.tmp-")
    assert parts.prepare() == [] and os.listdir(tmp_path / "out") == []


def test_parts_outside_the_plan_are_removed(tmp_path):
    parts = Parts(f"file://{tmp_path}/out")
    for c in range(4):
        parts.write(c, _table(1, str(c)))
    found = parts.prepare()
    assert parts.remove_outside(found, {0, 1}) == ["part-000002.parquet", "part-000003.parquet"]
    assert parts.prepare() == ["part-000000.parquet", "part-000001.parquet"]


def _hold(out: str, ready, release) -> None:
    with exclusive_run(out):
        ready.set()
        release.wait(60)


def test_a_second_run_on_one_output_is_refused_naming_the_holder(tmp_path):
    out = f"file://{tmp_path}/out"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(OutputBusy, match=f"{out}: another decoding run.*pid {holder.pid}"):
            with exclusive_run(out):
                pass
    finally:
        release.set()
        holder.join(60)
    with exclusive_run(out):  # free again once the first run ends
        pass
