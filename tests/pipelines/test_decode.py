"""Batch decoding (pipelines/decode.py) without Ray: prompts read and planned into chunks,
the actor class called directly (one part per chunk, equal to plain greedy decoding,
written whole or not at all) and the driver's resume logic around it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch
import transformers

import dresd.decoding.batch as batch_mod
import pipelines.decode as decode_mod
from dresd.config import DecodeConfig, ModelConfig, to_dict
from dresd.datastore.formatting import format_prompt_ids
from pipelines.decode import DecodeChunks, chunk_table, part_meta, part_path, plan_chunks, read_prompts, run_decode, settings
from tests_support import greedy_reference, one_torch_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
NEW = 5


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """11 source rows: 7 decodable, 4 rejected when read, 1 more too long once formatted."""
    lines = [json.dumps({"q": f"question {i}: " + "why " * (i % 4), "qid": f"q{i}"}) for i in range(7)]
    lines.insert(2, json.dumps({"qid": "no-q"}))  # row 2: missing_field
    lines.insert(4, "{not json")  # row 4: bad_json, no id of its own
    lines.insert(6, json.dumps({"q": 7, "qid": "num"}))  # row 6: not_string
    lines.insert(8, json.dumps({"q": "   ", "qid": "blank"}))  # row 8: empty_prompt
    lines.append(json.dumps({"q": "x" * 200, "qid": "long"}))  # row 11: too_long (formatted, > 64 tokens)
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(tiny_model_dir, prompts, out, **kw) -> DecodeConfig:
    """A config on the tiny model; plain batched decoding unless `speculative` says otherwise."""
    from dresd.config import SpeculativeConfig

    kw.setdefault("speculative", SpeculativeConfig(method="greedy"))
    return DecodeConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), prompts=str(prompts),
                        prompt_field="q", id_field="qid", max_new_tokens=NEW, max_prompt_tokens=64,
                        batch_size=2, chunk_rows=4, output=str(out), threads=1, **kw)


def test_prompts_are_read_with_reasons_and_planned_into_chunks(tiny_model_dir, prompts, tmp_path):
    cfg = _cfg(tiny_model_dir, prompts, tmp_path)
    rows = read_prompts(cfg)
    assert [r["row"] for r in rows] == list(range(12))
    assert [r["reject"] for r in rows] == [None, None, "missing_field", None, "bad_json", None, "not_string",
                                           None, "empty_prompt", None, None, None]
    assert [r["id"] for r in rows[:5]] == ["q0", "q1", "no-q", "q2", "prompts.jsonl:5"]  # no id: file and line
    assert all(r["prompt"] is None for r in rows if r["reject"])
    assert [r["row"] for r in read_prompts(replace(cfg, skip=3, limit=4))] == [3, 4, 5, 6]

    chunks = plan_chunks(cfg, rows)
    assert [(c["chunk"], [r["row"] for r in c["rows"]]) for c in chunks] == [
        (0, [0, 1, 2, 3]), (1, [4, 5, 6, 7]), (2, [8, 9, 10, 11])]
    # A chunk is named by its rows' position in the source, whatever skip/limit cut out.
    assert [(c["chunk"], len(c["rows"])) for c in plan_chunks(cfg, read_prompts(replace(cfg, skip=6)))] == [(1, 2), (2, 4)]
    keys = [c["key"] for c in chunks]
    assert [c["key"] for c in plan_chunks(cfg, read_prompts(cfg))] == keys  # stable
    assert all(a != b for a, b in zip(keys, (c["key"] for c in plan_chunks(replace(cfg, max_new_tokens=3), rows))))
    edited = [dict(r) for r in rows]
    edited[5]["prompt"] = "another question"
    assert [c["key"] == k for c, k in zip(plan_chunks(cfg, edited), keys)] == [True, False, True]
    # Greedy rows do not depend on batching; sampled ones do.
    assert plan_chunks(replace(cfg, batch_size=3), rows)[0]["key"] == keys[0]
    sampled = replace(cfg, temperature=0.7)
    assert plan_chunks(replace(sampled, batch_size=3), rows)[0]["key"] != plan_chunks(sampled, rows)[0]["key"]


def test_settings_name_the_model_by_content_not_path(tiny_model_dir, prompts, tmp_path):
    cfg = _cfg(tiny_model_dir, prompts, tmp_path)
    copy = shutil.copytree(tiny_model_dir, tmp_path / "reinstalled")
    assert settings(replace(cfg, model=ModelConfig(path=str(copy)))) == settings(cfg)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert settings(replace(cfg, model=ModelConfig(path=str(copy)))) != settings(cfg)


def test_a_dtype_other_than_auto_names_other_parts_and_loads_the_actor_in_it(tiny_model_dir, prompts, tmp_path):
    cfg = _cfg(tiny_model_dir, prompts, tmp_path)
    assert "dtype" not in settings(cfg)  # "auto" keeps the parts of runs from before the option
    bf16 = replace(cfg, model=replace(cfg.model, dtype="bfloat16"))
    assert settings(bf16) == {**settings(cfg), "dtype": "bfloat16"}
    assert DecodeChunks(to_dict(bf16), str(tmp_path)).lm.dtype == "bfloat16"


def test_the_actor_loads_the_model_with_the_jobs_own_settings(tiny_model_dir, prompts, tmp_path):
    from dresd.model.fastpath.cpu_linear import has_dual_layout

    cfg = _cfg(tiny_model_dir, prompts, tmp_path)
    # Not "auto": a fresh node would build and time the packed kernel when the job said not to.
    for dual in (False, True):
        actor = DecodeChunks(to_dict(replace(cfg, model=replace(cfg.model, dual_layout=dual))), str(tmp_path))
        assert has_dual_layout(actor.lm.model) is dual


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))

    def greedy(prompt: str) -> list[int]:
        """Plain cache-free greedy decoding of the formatted prompt, cut after EOS."""
        out = greedy_reference(model, format_prompt_ids(tok, prompt, "chat"), NEW)
        return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out

    return greedy


def test_a_chunk_becomes_one_part_equal_to_plain_greedy_decoding(tiny_model_dir, prompts, tmp_path, reference):
    cfg = _cfg(tiny_model_dir, prompts, tmp_path)
    chunks = plan_chunks(cfg, read_prompts(cfg))
    actor = DecodeChunks(to_dict(cfg), str(tmp_path))
    receipts = actor(chunk_table(chunks))
    assert receipts["chunk"] == [0, 1, 2] and receipts["written"] == [True] * 3
    assert receipts["done"] == [3, 2, 2]  # decodable rows per chunk
    assert [json.loads(r) for r in receipts["rejects"]] == [{"missing_field": 1}, {"bad_json": 1, "not_string": 1},
                                                           {"empty_prompt": 1, "too_long": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == [part_path(tmp_path, c).name for c in range(3)]

    rows = [r for c in range(3) for r in pq.read_table(part_path(tmp_path, c)).to_pylist()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4", "q5", "q6"]  # row order, each once
    assert sum(r["new_tokens"] for r in rows) == sum(receipts["new_tokens"])
    for r in rows:
        assert r["token_ids"] == reference(r["prompt"]), r["id"]
        eos = r["token_ids"][-1] == actor.lm.eos_token_id
        assert r["stop"] == ("eos" if eos else "length") and r["new_tokens"] == len(r["token_ids"])
        assert eos or len(r["token_ids"]) == NEW
        assert r["response"] == actor.lm.tokenizer.decode(
            r["token_ids"][:-1] if r["stop"] == "eos" else r["token_ids"], skip_special_tokens=True)
    meta = part_meta(part_path(tmp_path, 2))
    assert meta == {"chunk": 2, "key": chunks[2]["key"], "rows": 4, "done": 2, "rejects": {"empty_prompt": 1, "too_long": 1}}


def test_a_failed_batch_or_write_leaves_the_old_part_whole(tiny_model_dir, prompts, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, prompts, tmp_path)
    chunk = plan_chunks(cfg, read_prompts(cfg))[0]
    actor = DecodeChunks(to_dict(cfg), str(tmp_path))
    path = part_path(tmp_path, 0)
    assert actor.decode_chunk(0, "old-key", json.loads(json.dumps(chunk["rows"])))["written"]
    before = path.read_bytes()

    real = batch_mod.generate_batch
    calls = []

    def second_batch_fails(lm, ids, *a, **k):
        calls.append(len(ids))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(lm, ids, *a, **k)

    monkeypatch.setattr(batch_mod, "generate_batch", second_batch_fails)
    receipt = actor.decode_chunk(0, chunk["key"], json.loads(json.dumps(chunk["rows"])))
    assert calls == [2, 1]  # 3 rows, batches of 2
    assert not receipt["written"] and json.loads(receipt["failed"]) == {"error:RuntimeError": 1}
    assert receipt["done"] == 2  # decoded, but thrown away with the unfinished chunk
    assert path.read_bytes() == before and part_meta(path)["key"] == "old-key"
    monkeypatch.setattr(batch_mod, "generate_batch", real)

    def torn_write(table, where, **k):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", torn_write)
    with pytest.raises(OSError, match="disk full"):
        actor.decode_chunk(0, chunk["key"], json.loads(json.dumps(chunk["rows"])))
    assert path.read_bytes() == before  # the old part, never half a new one
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temp file is gone


def test_run_decode_computes_only_missing_torn_or_stale_parts(tiny_model_dir, prompts, tmp_path, monkeypatch):
    """run_decode's planning with the Ray stage replaced by the same actor class run here."""
    stages = []

    def in_process_stage(cfg, output, pending, report):
        stages.append([c["chunk"] for c in pending])
        actor = DecodeChunks(to_dict(cfg), str(output))
        for c in pending:
            r = actor.decode_chunk(c["chunk"], c["key"], json.loads(json.dumps(c["rows"])))
            assert r["written"]
            report.computed.append(r["chunk"])
            report.decoded += r["done"]
            report.rejected.update(json.loads(r["rejects"]))

    monkeypatch.setattr(decode_mod, "_run_stage", in_process_stage)
    out = tmp_path / "out"
    cfg = _cfg(tiny_model_dir, prompts, out, id_corpus=True, corpus_file=str(tmp_path / "id.jsonl"))

    first = run_decode(cfg)
    assert stages == [[0, 1, 2]] and first.computed == [0, 1, 2]
    assert (first.rows_in, first.decoded, first.skipped, sum(first.rejected.values())) == (12, 7, 0, 5)
    assert "12 = 7 + 0 + 5 + 0 (ok)" in "\n".join(first.lines())
    records = [json.loads(line) for line in (tmp_path / "id.jsonl").read_text().splitlines()]
    rows = [r for c in range(3) for r in pq.read_table(part_path(out, c)).to_pylist()]
    assert records == [{"id": r["id"], "prompt": r["prompt"], "response": r["response"]} for r in rows
                       if r["response"].strip()]
    assert len(records) == first.corpus_records > 0 and first.corpus_records + first.corpus_empty == 7

    second = run_decode(cfg)  # everything finished: the stage does not run at all
    assert stages == [[0, 1, 2]] and second.reused == 3 and second.computed == []
    assert (second.decoded, second.skipped, second.rejected) == (0, 7, first.rejected)  # rejects kept in the parts

    stamp = part_path(out, 0).stat().st_mtime_ns
    part_path(out, 1).unlink()  # lost
    torn = part_path(out, 2)
    torn.write_bytes(torn.read_bytes()[:50])  # torn (not by this code: it renames whole files)
    (out / ".part-000000.parquet.tmp-dead").write_bytes(b"left by a crashed writer")
    third = run_decode(cfg)
    assert stages[-1] == [1, 2] and third.reused == 1 and third.replaced == 1
    assert (third.decoded, third.skipped) == (4, 3)
    assert part_path(out, 0).stat().st_mtime_ns == stamp
    assert sorted(p.name for p in out.iterdir()) == [part_path(out, c).name for c in range(3)]

    fourth = run_decode(replace(cfg, max_new_tokens=2))  # other settings: every part stale, replaced
    assert stages[-1] == [0, 1, 2] and fourth.replaced == 3 and fourth.reused == 0
    rows = [r for c in range(3) for r in pq.read_table(part_path(out, c)).to_pylist()]
    assert len(rows) == 7 and all(r["new_tokens"] <= 2 for r in rows)


@pytest.mark.parametrize("method, budget", [("pld", "off"), ("auto", "auto")])
def test_a_speculative_method_gives_the_same_parts_and_counts_its_drafts(tiny_model_dir, prompts, tmp_path,
                                                                        reference, method, budget):
    """Drafting per sequence (prompt lookup with every draft verified; the job's default "auto",
    where the batch budget decides) changes no greedy token, and the receipts carry what was
    drafted and accepted."""
    from dresd.config import SpeculativeConfig

    assert DecodeConfig().speculative.method == "auto"
    spec = SpeculativeConfig(method=method, budget=budget)
    cfg = replace(_cfg(tiny_model_dir, prompts, tmp_path), speculative=spec, max_new_tokens=12)
    chunks = plan_chunks(cfg, read_prompts(cfg))
    assert chunks == plan_chunks(replace(cfg, speculative=SpeculativeConfig(method="greedy")), read_prompts(cfg))
    actor = DecodeChunks(to_dict(cfg), str(tmp_path))
    receipts = actor(chunk_table(chunks))
    assert receipts["written"] == [True] * 3 and receipts["done"] == [3, 2, 2]
    plain = DecodeChunks(to_dict(replace(cfg, speculative=SpeculativeConfig(method="greedy"))), str(tmp_path / "p"))
    (tmp_path / "p").mkdir()
    plain(chunk_table(chunks))
    for c in range(3):
        spec_rows = pq.read_table(part_path(tmp_path, c)).to_pylist()
        plain_rows = pq.read_table(part_path(tmp_path / "p", c)).to_pylist()
        assert [r["token_ids"] for r in spec_rows] == [r["token_ids"] for r in plain_rows]
    assert sum(receipts["drafted"]) > 0 or budget == "auto"
    assert 0 <= sum(receipts["accepted"]) <= sum(receipts["drafted"])
    assert sum(receipts["calls"]) <= sum(receipts["new_tokens"])  # a call yields at least one token


def test_a_method_that_needs_a_datastore_is_refused_before_decoding(tiny_model_dir, prompts, tmp_path):
    from dresd.config import SpeculativeConfig

    cfg = replace(_cfg(tiny_model_dir, prompts, tmp_path), speculative=SpeculativeConfig(method="dresd"))
    with pytest.raises(ValueError, match="speculative.method 'dresd' drafts from a datastore: set datastore"):
        run_decode(cfg)
