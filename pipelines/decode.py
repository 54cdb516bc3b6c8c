"""Batch offline decoding as a Ray Data stage: a prompts dataset into parquet part files.

Prompts (jsonl / json / parquet / a `datasets` folder, or "mtbench" / "sharegpt") are cut
into chunks of `chunk_rows` rows by their position in the source. Each chunk is decoded by
a Ray Data actor (model loaded once per actor; rows length-sorted, `batch_size` sequences
per forward with dresd.decoding.batch.generate_batch) and written as ONE part file
`<output>/part-<chunk>.parquet`, atomically (tmp + rename). The part records a key over
the chunk's rows and the decode settings: a rerun skips every part whose key matches and
recomputes the rest (missing, crashed or stale), so the folder ends with each row exactly
once. Columns: row, id, prompt, response, token_ids, prompt_tokens, new_tokens, stop,
wall_s. With `id_corpus: true` the parts are also gathered into a jsonl corpus of
{"id", "prompt", "response"} records for `dresd build --corpus FILE`. The job entry point
is jobs/decode.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from dresd.storage.files import is_uri, sha256_file
from pipelines.decode_parts import META_KEY, Parts, exclusive_run
from pipelines.decode_report import DecodeReport
from dresd.config import ModelConfig, to_dict
from dresd.config import DecodeConfig



# ----------------------------------------------------------------------------- prompts


def _source_rows(cfg: DecodeConfig):
    """(id, prompt or None, reject reason or None) for every row of the source, in order."""
    from dresd.datastore.corpus import (list_corpus_files, mtbench_first_turns, read_rows, sharegpt_first_turns,
                                        unicode_problem)

    if cfg.prompts == "mtbench":
        yield from ((f"mtbench:{i + 1}", q, None) for i, q in enumerate(mtbench_first_turns()))
        return
    if cfg.prompts == "sharegpt":
        yield from ((sid, prompt, None) for sid, prompt, _ in sharegpt_first_turns())
        return
    for path in list_corpus_files([cfg.prompts]):
        for raw in read_rows(path, on_error="skip"):
            rid = f"{os.path.basename(raw.file)}:{raw.row}"
            if raw.data is None:
                yield rid, None, raw.error or "unreadable"
                continue
            if cfg.id_field and raw.data.get(cfg.id_field) is not None:
                rid = str(raw.data[cfg.id_field])
            value = raw.data.get(cfg.prompt_field)
            # A lone surrogate (from a \uD800 escape) would crash the tokenizer in the actor.
            reason = ("missing_field" if value is None else "not_string" if not isinstance(value, str)
                      else "empty_prompt" if not value.strip() else "bad_unicode" if unicode_problem(value) else None)
            yield rid, (value if reason is None else None), reason


def read_prompts(cfg: DecodeConfig) -> list[dict]:
    """The rows to decode (after skip/limit): {row: index in the source, id, prompt, reject}."""
    stop = None if cfg.limit is None else cfg.skip + cfg.limit
    rows = itertools.islice(enumerate(_source_rows(cfg)), cfg.skip, stop)
    return [{"row": i, "id": rid, "prompt": prompt, "reject": reason} for i, (rid, prompt, reason) in rows]


def _model_tag(m: ModelConfig) -> list:
    """Names the model's files by content (sha256, cheap next to decoding) without loading it. Not by
    mtime: a reinstall of the model's package rewrites its files, and every finished part
    would be decoded again."""
    from dresd.model.resolve import resolve_model  # a storage URI is fetched once into this node's cache

    path = resolve_model(m.path)[1].resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return [[f.name, sha256_file(f)] for f in files if f.is_file()]


def settings(cfg: DecodeConfig) -> dict:
    """Everything that changes a row's output; part keys hash it."""
    out = {k: getattr(cfg, k) for k in ("prompt_format", "max_prompt_tokens", "max_new_tokens", "temperature")}
    out["model"] = _model_tag(cfg.model)
    if cfg.model.dtype != "auto":  # another precision gives other tokens ("auto" keeps older keys)
        out["dtype"] = cfg.model.dtype
    if cfg.temperature > 0:  # sampled tokens depend on the seed, on batching and on the drafts
        out.update(top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size)
        if cfg.speculative.method != "greedy":
            out.update(speculative=to_dict(cfg.speculative), datastore=cfg.datastore)
    return out


def plan_chunks(cfg: DecodeConfig, rows: list[dict]) -> list[dict]:
    """Chunk c holds the rows with row // chunk_rows == c; its key covers rows and settings."""
    common = json.dumps(settings(cfg), sort_keys=True)
    chunks = []
    for c, group in itertools.groupby(rows, key=lambda r: r["row"] // cfg.chunk_rows):
        group = list(group)
        blob = common + json.dumps([[r["row"], r["id"], r["prompt"], r["reject"]] for r in group])
        chunks.append({"chunk": c, "key": hashlib.sha256(blob.encode()).hexdigest()[:20], "rows": group})
    return chunks


def chunk_table(chunks: list[dict]):
    """Planned chunks as the Arrow rows the actors take: one row a chunk, its rows' fields as
    list columns (row, id, prompt, reject; a prompt or reject may be null)."""
    import pyarrow as pa

    def column(name: str) -> list:
        return [[r[name] for r in c["rows"]] for c in chunks]

    return pa.table({"chunk": [c["chunk"] for c in chunks], "key": [c["key"] for c in chunks],
                     "row": pa.array(column("row"), pa.list_(pa.int64())),
                     "id": pa.array(column("id"), pa.list_(pa.string())),
                     "prompt": pa.array(column("prompt"), pa.list_(pa.string())),
                     "reject": pa.array(column("reject"), pa.list_(pa.string()))})


def part_path(output: Path, chunk: int) -> Path:
    return output / f"part-{chunk:06d}.parquet"


def part_meta(path: Path) -> dict | None:
    """The chunk record stored in a part's parquet metadata (None if missing or unreadable)."""
    import pyarrow.parquet as pq

    try:
        return json.loads(pq.read_schema(path).metadata[META_KEY])
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply "not done"
        return None


# ----------------------------------------------------------------------------- actor


def _batch_seed(seed: int, chunk: int, batch: int) -> int:
    return int(hashlib.sha256(f"{seed}:{chunk}:{batch}".encode()).hexdigest()[:15], 16)


class DecodeChunks:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`: one chunk -> one part."""

    def __init__(self, cfg: dict, output: str):
        import torch

        from dresd.config import from_dict
        from dresd.model.loading import load_model, node_threads

        self.cfg = from_dict(DecodeConfig, cfg)
        m = self.cfg.model
        threads = self.cfg.threads or node_threads(self.cfg.actors)  # not Ray's OMP_NUM_THREADS
        # The job's model settings as given (dual_layout, weight_codes, ...): only the threads are this actor's.
        self.lm = load_model(replace(m, threads=threads))
        torch.set_num_threads(threads)
        self.parts = Parts(output)
        self.speculative = self._speculative_decoder() if self.cfg.speculative.method != "greedy" else None
        print(f"decode actor: {self.lm.identity['name']} on {self.lm.device}, {torch.get_num_threads()} torch threads, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}", flush=True)

    def _speculative_decoder(self):
        """The batched speculative decoder this actor's chunks run through (one per actor, so
        each slot's drafter and planner keep what they learn across chunks)."""
        from dresd.datastore.formatting import format_fingerprint
        from dresd.datastore.store import Datastore
        from dresd.decoding.batch_spec import BatchedSpeculativeDecoder
        from dresd.decoding.calibration import cached_batch_cost_model
        from dresd.drafters.registry import drafter_factory

        cfg, lm, spec = self.cfg, self.lm, self.cfg.speculative
        store = Datastore(cfg.datastore) if cfg.datastore else None
        if store is not None:
            fmt = store.manifest["prompt_format"]["name"]
            if fmt != cfg.prompt_format:
                raise ValueError(f"datastore {cfg.datastore} was built with prompt format {fmt!r}; "
                                 f"this job lays prompts out as {cfg.prompt_format!r} (set prompt_format: {fmt})")
            store.check_compatible(lm.identity, format_fingerprint(lm.tokenizer, fmt), lm.dtype)
        cost = cached_batch_cost_model(lm.model) if spec.budget == "auto" else None
        return BatchedSpeculativeDecoder(lm.model, lm.eos_token_id, lm.max_context, spec,
                                         drafter_factory(spec, store, lm.tokenizer, lm.eos_token_id),
                                         cost, max_batch=cfg.batch_size)

    def _generate(self, chunk: int, b: int, group: list[dict], st) -> tuple[list[list[int]], dict]:
        """One batch's new tokens, plus its drafting counters (zero for plain batching)."""
        from dresd.decoding.batch import generate_batch

        cfg = self.cfg
        if self.speculative is None:
            gens = generate_batch(self.lm, [r["ids"] for r in group], cfg.max_new_tokens, cfg.temperature,
                                  cfg.top_p, _batch_seed(cfg.seed, chunk, b), stats=st)
            return gens, {"accepted": 0, "drafted": 0, "calls": st.new_tokens}
        from dresd.config import SamplingParams
        from dresd.decoding.batch_spec import BatchRequest

        t0 = time.perf_counter()
        requests = [BatchRequest(r["ids"], cfg.max_new_tokens,
                                 SamplingParams(cfg.temperature, cfg.top_p, _batch_seed(cfg.seed, chunk, r["row"]))
                                 if cfg.temperature > 0 else None) for r in group]
        gens = self.speculative.generate(requests)
        st.prefill_s, st.decode_s = 0.0, time.perf_counter() - t0
        st.new_tokens = sum(len(g.token_ids) for g in gens)
        counts = {"accepted": sum(g.metrics.accepted for g in gens), "drafted": sum(g.metrics.drafted for g in gens),
                  "calls": sum(g.metrics.target_calls for g in gens)}
        return [g.token_ids for g in gens], counts

    def decode_chunk(self, chunk: int, key: str, rows: list[dict]) -> dict:
        from dresd.decoding.batch import BatchStats
        from dresd.datastore.formatting import format_prompt_ids

        cfg, lm = self.cfg, self.lm
        limit = min(lm.max_context - 1, cfg.max_prompt_tokens or lm.max_context)
        rejects, failed, todo = Counter(), Counter(), []
        for r in rows:
            if r["reject"] is None:
                r["ids"] = format_prompt_ids(lm.tokenizer, r["prompt"], cfg.prompt_format)
                r["reject"] = "too_long" if len(r["ids"]) > limit else None
            if r["reject"] is None:
                todo.append(r)
            else:
                rejects[r["reject"]] += 1
        todo.sort(key=lambda r: len(r["ids"]))
        out, gen_s, new_tokens = [], 0.0, 0
        drafting = Counter(accepted=0, drafted=0, calls=0)
        # The speculative decoder refills its slots from a waiting list itself: one call per chunk.
        step = cfg.batch_size if self.speculative is None else max(1, len(todo))
        for b in range(0, len(todo), step):
            group, st = todo[b : b + step], BatchStats()
            try:
                gens, counts = self._generate(chunk, b // step, group, st)
                drafting.update(counts)
            except Exception as exc:  # noqa: BLE001 - counted by reason; the chunk stays unfinished
                failed[f"error:{type(exc).__name__}"] += len(group)
                print(f"chunk {chunk}: batch {b // cfg.batch_size} failed: {exc!r}", file=sys.stderr)
                continue
            gen_s, new_tokens = gen_s + st.wall_s, new_tokens + st.new_tokens
            for r, toks in zip(group, gens):
                eos = bool(toks) and toks[-1] == lm.eos_token_id
                text = lm.tokenizer.decode(toks[:-1] if eos else toks, skip_special_tokens=True)
                out.append(dict(row=r["row"], id=r["id"], prompt=r["prompt"], response=text, token_ids=toks,
                                prompt_tokens=len(r["ids"]), new_tokens=len(toks), stop="eos" if eos else "length",
                                wall_s=st.wall_s))
        receipt = {"chunk": chunk, "written": False, "done": len(out), "new_tokens": new_tokens, "gen_s": gen_s,
                   "rejects": json.dumps(rejects), "failed": json.dumps(failed), **drafting}
        if not failed:
            meta = {"chunk": chunk, "key": key, "rows": len(rows), "done": len(out), "rejects": rejects}
            self._write_part(chunk, sorted(out, key=lambda r: r["row"]), meta)
            receipt["written"] = True
        return receipt

    def _write_part(self, chunk: int, records: list[dict], meta: dict) -> None:
        import pyarrow as pa

        schema = pa.schema([("row", pa.int64()), ("id", pa.string()), ("prompt", pa.string()),
                            ("response", pa.string()), ("token_ids", pa.list_(pa.int32())),
                            ("prompt_tokens", pa.int32()), ("new_tokens", pa.int32()), ("stop", pa.string()),
                            ("wall_s", pa.float64())], metadata={META_KEY: json.dumps(meta).encode()})
        self.parts.write(chunk, pa.Table.from_pylist(records, schema=schema))

    def __call__(self, batch) -> dict:
        """Decode the chunks of a pyarrow batch (chunk_table); one per call in the job."""
        receipts = []
        for c in batch.to_pylist():
            rows = [{"row": r, "id": i, "prompt": p, "reject": j}
                    for r, i, p, j in zip(c["row"], c["id"], c["prompt"], c["reject"])]
            receipts.append(self.decode_chunk(int(c["chunk"]), c["key"], rows))
        return {name: [r[name] for r in receipts] for name in receipts[0]} if receipts else {}


# ----------------------------------------------------------------------------- driver


def _run_stage(cfg: DecodeConfig, output: str, pending: list[dict], report: DecodeReport) -> None:
    import ray

    from pipelines.runtime import check_shared_folder, ensure_ray

    ensure_ray(cfg.ray_address)
    if not is_uri(output):  # the actors write their parts here, on whichever node they run
        check_shared_folder(Path(output), "the decode output")
    t0 = time.perf_counter()
    # One chunk a block (a table each) and one block a call (batch_size=1): chunks spread over
    # the actors. Receipts come back in any order; each names its chunk.
    ds = ray.data.from_arrow([chunk_table([c]) for c in pending]).map_batches(
        DecodeChunks,
        fn_constructor_kwargs=dict(cfg=to_dict(cfg), output=str(output)),
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(cfg.actors, len(pending)), max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.actor_cpus,
        num_gpus=cfg.gpus,
        # Read when torch loads OpenMP: it must be in the worker's environment from the start.
        **({"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": cfg.omp_wait_policy}}} if cfg.omp_wait_policy else {}),
    )
    for r in ds.iter_rows():
        report.add(r)
    report.computed.sort()
    report.stage_s = time.perf_counter() - t0


def write_corpus(parts: Parts, chunks: list[dict], path: str, report: DecodeReport) -> None:
    """Gather every planned part, in row order, into a jsonl corpus at `path` (local or a
    storage URI), visible only when complete."""

    def lines():
        for c in chunks:
            for rec in parts.read(c["chunk"], columns=["id", "prompt", "response"]).to_pylist():
                if not rec["response"].strip():
                    report.corpus_empty += 1
                    continue
                report.corpus_records += 1
                yield json.dumps(rec, ensure_ascii=False) + "\n"

    parts.write_text_file(path, lines())
    report.corpus = str(path)


def run_decode(cfg: DecodeConfig) -> DecodeReport:
    """Decode every unfinished chunk; returns the report (nothing is raised for failed rows)."""
    from dresd.drafters.registry import method_entry

    if method_entry(cfg.speculative.method).needs_datastore and not cfg.datastore:
        raise ValueError(f"speculative.method {cfg.speculative.method!r} drafts from a datastore: set datastore")
    output = str(cfg.output) if is_uri(cfg.output) else str(Path(cfg.output).resolve())
    with exclusive_run(output):
        return _decode(cfg, output)


def _decode(cfg: DecodeConfig, output: str) -> DecodeReport:
    """run_decode's body, while this run holds the output."""
    parts = Parts(output)
    found = parts.prepare()  # temporary files of crashed writers go here
    rows = read_prompts(cfg)
    chunks = plan_chunks(cfg, rows)
    report = DecodeReport(output=output, rows_in=len(rows), chunks=len(chunks))
    # Parts of chunks this plan does not have (an earlier limit or chunk_rows) would add rows
    # that are not asked for to whatever reads the folder.
    report.removed = parts.remove_outside(found, {c["chunk"] for c in chunks})
    pending = []
    for c in chunks:
        exists = parts.name(c["chunk"]) in found
        meta = parts.meta(c["chunk"]) if exists else None
        if meta is not None and meta.get("key") == c["key"]:
            report.reused += 1
            report.skipped += meta["done"]
            report.rejected.update(meta["rejects"])
        else:
            report.replaced += exists
            pending.append(c)
    print(f"decoding {len(rows)} rows of {cfg.prompts!r} into {output}: {len(chunks)} chunks, "
          f"{len(pending)} to compute (ray: {cfg.ray_address or 'local'})", flush=True)
    if pending:
        _run_stage(cfg, output, pending, report)
    if cfg.id_corpus:
        if report.failed:
            print("id corpus not written: some chunks failed (rerun to finish them)", file=sys.stderr)
        else:
            write_corpus(parts, chunks, cfg.corpus_file or f"{output.rstrip('/')}.jsonl", report)
    return report
