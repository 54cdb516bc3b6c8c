"""Kill-point recovery, shared by tests/test_kill_points.py (a CI subset) and
scripts/reliability.py (the whole matrix, rendered into docs/reliability.md).

A case runs one small job (a build, an update, a decode) in a child process with
DRESD_FAULT=<point>:kill (dresd.storage.faults) and checks that it died at that point and that
what it was changing is still whole (the previous CURRENT version, verified; the decode parts
already written). Then it reruns the job without the fault and compares the result with an
uninterrupted run of the same job from the same start: every data file of the CURRENT version
(token stream, keys, index, tombstones; their sha256) and its counts, or every decoded row.
Last it looks for debris: temporary and staging folders, versions never made current, work
folders, CURRENT's temporary files, claims left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from dresd.storage.faults import FAULT_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 600  # one small job; only a hung one gets near it
STORE_JOBS = ("build", "build-uri", "add", "delete", "compact", "reindex")


@dataclass(frozen=True)
class Case:
    """Kill `job` at the `nth` time it reaches `point`."""

    job: str
    point: str
    nth: int = 1

    @property
    def id(self) -> str:
        return f"{self.job}:{self.point}" + (f"@{self.nth}" if self.nth > 1 else "")

    @property
    def fault(self) -> str:
        return f"{self.point}:kill" + (f"@{self.nth}" if self.nth > 1 else "")


# What a kill at each point must leave, and what the rerun does with it.
EXPECTED = {
    "embed_before_shard_rename": "the shard without its marker is never read; the rerun reuses finished shards",
    "embed_after_shard_rename": "the marked shard is whole; the rerun reuses it",
    "during_index_fill": "a shard whose codes were not written is coded again; finished codes are reused",
    "during_merge": "nothing published; the rerun merges again",
    "after_version_rename": "CURRENT unchanged; the version never made current is removed by the rerun",
    "before_current_swap": "CURRENT unchanged, lock free; the never-current version is removed by the rerun",
    "during_current_write": "CURRENT's old line stays whole; the rerun removes the temporary pointer and the "
                            "never-current version",
    "during_upload": "the partial remote version has no manifest, so is never listed; the rerun removes it and "
                     "the staging folder",
    "during_add": "nothing published; the rerun reuses the written shards",
    "during_delete": "nothing published; the rerun deletes",
    "during_compact": "nothing published; the rerun compacts",
    "during_reindex": "nothing published; the rerun lays the keys out again",
    "during_part_write": "finished parts stay; the torn part never replaces its name; the rerun redoes its chunk",
}

MATRIX = (
    Case("build", "embed_before_shard_rename", 2),
    Case("build", "embed_after_shard_rename", 2),
    Case("build", "during_index_fill"),
    Case("build", "during_merge"),
    Case("build", "after_version_rename"),
    Case("build", "before_current_swap"),
    Case("build", "during_current_write"),
    Case("build-uri", "during_upload", 2),
    Case("add", "embed_before_shard_rename", 2),
    Case("add", "during_add"),
    Case("add", "after_version_rename"),
    Case("delete", "during_delete"),
    Case("delete", "after_version_rename"),
    Case("delete", "during_current_write"),
    Case("compact", "during_compact"),
    Case("compact", "after_version_rename"),
    Case("reindex", "during_reindex"),
    Case("reindex", "after_version_rename"),
    Case("decode", "during_part_write", 2),
)

# The CI subset (tests/test_kill_points.py): on a store made without a model, except decode.
CI_CASES = (
    Case("delete", "after_version_rename"),
    Case("delete", "during_current_write"),
    Case("delete", "during_delete"),
    Case("decode", "during_part_write", 2),
)


@dataclass
class Run:
    """One child process: its exit code (negative: the signal that ended it), output, seconds."""

    rc: int | None
    out: str
    err: str
    seconds: float


@dataclass
class Outcome:
    """What one case measured."""

    case: Case
    killed: bool = False  # died with FAULT_EXIT_CODE, or SIGKILLed by a worker's fault (faults.py)
    fired: bool = False  # the fault log names the point: the death happened there
    intact: bool = False  # after the kill: the previous CURRENT (or finished parts) whole
    equal: bool = False  # after the rerun: the result equals an uninterrupted run's
    debris: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detail: str = ""

    @property
    def result(self) -> str:
        if not self.fired:
            return "not reached"
        if self.killed and self.intact and self.equal:
            return "recovered"
        return "previous intact" if self.intact else "data lost"


def _ended_by_fault(rc: int | None) -> bool:
    return rc in (FAULT_EXIT_CODE, -signal.SIGKILL)


def run_job(argv: list[str], env: dict[str, str], timeout: float = JOB_TIMEOUT_S) -> Run:
    """Run `argv` from the repo root in its own session; whatever it leaves running (Ray's
    processes, when its driver was killed) is killed after it ends."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n(timed out after {timeout:g} s)"
    finally:
        _kill_session(proc.pid)
    return Run(proc.returncode, out, err, time.monotonic() - t0)


def _kill_session(sid: int) -> None:
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and os.getsid(p.pid) == sid:
                p.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


def read_current(root: Path) -> str | None:
    try:
        words = (root / "CURRENT").read_text().split()
    except FileNotFoundError:
        return None
    return words[0] if words else None


def version_names(root: Path) -> set[str]:
    vdir = root / "versions"
    return {p.name for p in vdir.iterdir() if not p.name.startswith(".")} if vdir.is_dir() else set()


def store_digest(root: Path) -> dict:
    """The CURRENT version's content: every data file's sha256, its counts and its parent."""
    version = read_current(root)
    if version is None:
        return {}
    manifest = json.loads((root / "versions" / version / "manifest.json").read_text())
    return {"files": {n: f["sha256"] for n, f in manifest["files"].items()}, "counts": manifest.get("counts"),
            "parent": manifest.get("parent")}


def decode_rows(out: Path) -> dict[str, list[dict]]:
    """Rows of every part file by part name (timings left out)."""
    import pyarrow.parquet as pq

    return {p.name: [{k: v for k, v in r.items() if k != "wall_s"} for r in pq.read_table(p).to_pylist()]
            for p in sorted(out.glob("part-*.parquet"))}


def decode_digest(out: Path) -> dict:
    rows = decode_rows(out)
    return {"parts": sorted(rows), "rows": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()}


def store_debris(root: Path, keep: set[str]) -> list[str]:
    """What a dead job left under a datastore root: anything hidden under versions/, versions
    outside `keep` (those once current), CURRENT's temporary files, work folders."""
    found = []
    vdir = root / "versions"
    for p in sorted(vdir.iterdir()) if vdir.is_dir() else []:
        if p.name.startswith("."):
            found.append(f"versions/{p.name}")
        elif p.name not in keep:
            found.append(f"versions/{p.name} (never current)")
    found += sorted(p.name for p in root.glob(".CURRENT.*.tmp"))
    work = root / ".build"
    found += sorted(f".build/{p.name}" for p in work.iterdir()) if work.is_dir() else []
    return found


def bookkeeping(p: Path) -> bool:
    """A cache entry's files that stay by design (dresd.storage.leases): its lock, its last-use
    stamp, the root marker."""
    return p.name.endswith(".lock") or (p.name.startswith(".") and p.name.endswith(".used")) or p.name == ".root"


def cache_debris(cache: Path) -> list[str]:
    """What a dead job left in the node's cache: staging folders, scratch mirrors, upload
    claims, half-copied cached versions, leases of dead processes."""
    storage = cache / "storage"
    found = [f"staging/{p.name}" for p in sorted((storage / "staging").glob("*"))]
    for kind, pattern in (("scratch", "*/*"), ("uploads", "*/*"), ("datastores", "*/.*")):
        found += [f"{kind}/{p.parent.name}/{p.name}" for p in sorted((storage / kind).glob(pattern))
                  if not bookkeeping(p)]
    return found


class Bench:
    """The inputs the cases share, made once under `folder`: a tiny model, corpora, prompts and
    the store each job starts from. `synthetic`: stores made without a model (delete, compact
    and decode only), for a fast CI subset."""

    def __init__(self, folder: Path, synthetic: bool = False):
        self.folder, self.synthetic = Path(folder), synthetic
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cache = self.folder / "cache"
        self._bases: dict[str, Path] = {}
        self._baselines: dict[str, tuple[dict, set[str]]] = {}
        self.source = "src-1" if synthetic else "r3"  # what `delete` removes
        rows = [{"id": f"r{i}", "prompt": f"question {i}?", "response": f"answer {i}: " + "abc " * (i % 5 + 3)}
                for i in range(20)]
        more = [{"id": f"m{i}", "prompt": f"more {i}?", "response": f"reply {i}: " + "xyz " * (i % 4 + 2)}
                for i in range(15)]
        prompts = [{"q": f"question {i}: " + "why " * (i % 5), "qid": f"q{i}"} for i in range(12)]
        for name, records in (("base.jsonl", rows), ("more.jsonl", more), ("prompts.jsonl", prompts)):
            (self.folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    @property
    def model(self) -> Path:
        folder = self.folder / "model"
        if not folder.is_dir():
            from tiny_models import make_tiny_llama

            make_tiny_llama(folder, vocab_size=272)
        return folder

    def env(self, fault: str | None = None, log: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRESD_FAULT") and k != "RAY_ADDRESS"}
        env.update(DRESD_CACHE_DIR=str(self.cache), OMP_WAIT_POLICY="PASSIVE", OPENBLAS_NUM_THREADS="1",
                   TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
        if fault:
            env.update(DRESD_FAULT=fault, DRESD_FAULT_LOG=str(log))
        return env

    def command(self, job: str, target: Path) -> list[str]:
        dresd = [sys.executable, "-m", "dresd.cli"]
        if job == "decode":
            config = str(self._decode_config())
            return [sys.executable, "-m", "jobs.decode", "--config", config, "--output", str(target)]
        if job in ("build", "build-uri"):
            output = f"file://{target}" if job == "build-uri" else str(target)
            # IVF-PQ, though the corpus is small: its code pass is where `during_index_fill` fires.
            return dresd + ["build", "--model", str(self.model), "--corpus", str(self.folder / "more.jsonl"),
                            "--id-field", "id", "--output", output, "--dim", "16", "--value-len", "8",
                            "--set", "shard_rows=5", "--set", "check_sample=50", "--set", "index.kind=ivfpq",
                            "--set", "index.pq_m=8"]
        if job == "add":
            return dresd + ["update", "add", "--datastore", str(target), "--model", str(self.model), "--corpus",
                            str(self.folder / "more.jsonl"), "--id-field", "id", "--set", "shard_rows=5"]
        if job == "delete":
            return dresd + ["update", "delete", "--datastore", str(target), "--source", self.source]
        if job == "compact":
            return dresd + ["update", "compact", "--datastore", str(target)]
        if job == "reindex":  # the base's flat index laid out again as IVF-PQ
            return dresd + ["update", "reindex", "--datastore", str(target), "--set", "index.kind=ivfpq",
                            "--set", "index.pq_m=8"]
        raise ValueError(f"unknown job {job!r}")

    def _decode_config(self) -> Path:
        import yaml

        path = self.folder / "decode.yaml"
        if not path.is_file():
            path.write_text(yaml.safe_dump({
                "model": {"path": str(self.model), "device": "cpu"}, "prompts": str(self.folder / "prompts.jsonl"),
                "prompt_field": "q", "id_field": "qid", "max_new_tokens": 6, "batch_size": 3, "chunk_rows": 4,
                "threads": 1, "actors": 1}))
        return path

    def base(self, job: str) -> Path | None:
        """The store `job` starts from (None for decode): the base build, with one delete for compact."""
        if job == "decode":
            return None
        kind = "deleted" if job == "compact" else "base"
        if kind not in self._bases:
            self._bases[kind] = self._make_base(kind)
        return self._bases[kind]

    def _make_base(self, kind: str) -> Path:
        folder = self.folder / f"start-{kind}"
        shutil.rmtree(folder, ignore_errors=True)
        if kind == "deleted":
            shutil.copytree(self.base("build"), folder)
            run = run_job(self.command("delete", folder)[:-1] + ["r5" if not self.synthetic else "src-0"], self.env())
        elif self.synthetic:
            from dresd.datastore.publish import publish
            from tests_support import make_manifest, make_parts

            publish(folder, make_parts(), make_manifest(), version="v1")
            return folder
        else:
            run = run_job([sys.executable, "-m", "dresd.cli", "build", "--model", str(self.model), "--corpus",
                           str(self.folder / "base.jsonl"), "--id-field", "id", "--output", str(folder), "--dim", "16",
                           "--value-len", "8", "--set", "shard_rows=5", "--set", "check_sample=50"], self.env())
        if run.rc != 0:
            raise RuntimeError(f"making the {kind} store failed (exit {run.rc}):\n{run.err[-3000:]}")
        return folder

    def fresh(self, job: str, name: str) -> Path:
        """A new copy of the store `job` starts from (a new output folder for decode)."""
        target = self.folder / name
        shutil.rmtree(target, ignore_errors=True)
        if (base := self.base(job)) is not None:
            shutil.copytree(base, target)
        return target

    def digest(self, job: str, target: Path) -> dict:
        return decode_digest(target) if job == "decode" else store_digest(target)

    def baseline(self, job: str) -> tuple[dict, set[str]]:
        """(digest, versions) after an uninterrupted run of `job` (run once)."""
        if job not in self._baselines:
            target = self.fresh(job, f"baseline-{job}")
            run = run_job(self.command(job, target), self.env())
            if run.rc != 0:
                raise RuntimeError(f"the uninterrupted {job} failed (exit {run.rc}):\n{run.err[-3000:]}")
            self._baselines[job] = (self.digest(job, target), version_names(target))
        return self._baselines[job]

    def intact(self, job: str, target: Path, before: str | None) -> tuple[bool, str]:
        """After a kill: is what the job was changing still whole? (ok, why not)"""
        if job == "decode":
            want = decode_rows(self.folder / "baseline-decode")
            try:
                have = decode_rows(target)
            except Exception as err:  # noqa: BLE001 - a torn part is exactly what is looked for
                return False, f"a part does not read: {err}"
            bad = [name for name, rows in have.items() if rows != want.get(name)]
            return not bad, f"parts differ from an uninterrupted run's: {bad}" if bad else ""
        from dresd.datastore.store import Datastore

        now = read_current(target)
        if now != before:
            return False, f"CURRENT names {now}, not the previous {before}"
        try:
            Datastore(target, verify=True)
        except Exception as err:  # noqa: BLE001 - any failure to open is the finding
            return False, f"the previous version does not open: {err}"
        return True, ""


def run_case(bench: Bench, case: Case) -> Outcome:
    """Kill, check, rerun, compare, look for debris (see the module docstring)."""
    t0 = time.monotonic()
    want, want_versions = bench.baseline(case.job)
    slug = case.id.replace(":", "-").replace("@", "-")
    target = bench.fresh(case.job, f"case-{slug}")
    before = read_current(target) if case.job != "decode" else None
    log = bench.folder / f"case-{slug}.faults"
    log.unlink(missing_ok=True)
    out = Outcome(case)
    first = run_job(bench.command(case.job, target), bench.env(case.fault, log))
    fired = log.read_text().split() if log.is_file() else []
    out.fired = case.point in fired
    out.killed = _ended_by_fault(first.rc) and out.fired
    notes = [] if out.killed else [f"first run ended with exit {first.rc}: {first.err.strip()[-600:]}"]
    out.intact, why = bench.intact(case.job, target, before)
    notes += [why] if why else []
    second = run_job(bench.command(case.job, target), bench.env())
    if second.rc != 0:
        notes.append(f"rerun failed (exit {second.rc}): {second.err.strip()[-600:]}")
    else:
        got = bench.digest(case.job, target)
        out.equal = got == want
        if not out.equal:
            notes.append(f"rerun differs from an uninterrupted run: {got} != {want}")
    if case.job in STORE_JOBS:
        keep = version_names(bench.base(case.job)) | {read_current(target)}
        out.debris = store_debris(target, keep)
        if len(version_names(target)) != len(want_versions):
            notes.append(f"{len(version_names(target))} versions, an uninterrupted run leaves {len(want_versions)}")
    else:
        out.debris = sorted(p.name for p in target.glob(".part-*"))
    out.debris += cache_debris(bench.cache)
    out.seconds, out.detail = time.monotonic() - t0, "; ".join(notes)
    return out
