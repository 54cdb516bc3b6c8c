"""Benchmark results as json: one file per benchmark, and the docs page rendered from them.

Every script in `benchmarks/` writes its report as markdown (what people read in a terminal)
and, through `save_run`, the same report as `<benchmark>.json`: the command that produced
it, when, at which commit, and its sections with tables as columns and rows. The latest
accepted run of each benchmark lives in `benchmarks/results/<benchmark>.json`, and
`docs/benchmarks.md` is rendered from those files only (`benchmarks/make_docs.py`), so the
doc never says anything a results file does not.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_IMAGE = re.compile(r"^!\[[^\]]*\]\(([^)]+)\)\s*$")
_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


@dataclass
class Section:
    """One headed part of a report."""

    title: str  # heading text; "" for what comes before the first heading
    level: int  # markdown heading level; 0 for the untitled opening
    blocks: list[dict] = field(default_factory=list)  # {"text": str} | {"table": {"columns", "rows"}} | {"image": file}


@dataclass
class BenchmarkResult:
    """One run of one benchmark, as it is stored in `benchmarks/results/`."""

    benchmark: str  # the script's name without `.py`; also the json file's stem
    command: str  # the command line that produced the run, as typed from the repository root
    date: str  # when the run finished (ISO 8601 when the script wrote it itself)
    commit: str  # git commit of the code that ran ("" when unknown)
    sections: list[Section]  # the report, in order
    note: str = ""  # provenance remarks, e.g. that the run predates json output


def _split_row(line: str) -> list[str]:
    cells = line.strip()
    if cells.startswith("|"):
        cells = cells[1:]
    if cells.endswith("|"):
        cells = cells[:-1]
    return [c.strip() for c in cells.split("|")]


def parse_markdown(text: str) -> list[Section]:
    """Headings, paragraphs, pipe tables and images of a markdown report, in order.

    Fenced code and lists are kept as text blocks. A table is a header row, a `---` rule and
    the rows that follow; a row with a different number of cells than the header is an error,
    since it would shift every later column in the rendered doc.
    """
    sections = [Section(title="", level=0)]
    lines = text.splitlines()
    i, para = 0, []

    def flush() -> None:
        if any(s.strip() for s in para):
            sections[-1].blocks.append({"text": "\n".join(para).strip("\n")})
        para.clear()

    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            para.append(line)
            i += 1
            continue
        if in_fence:
            para.append(line)
            i += 1
            continue
        head = _HEADING.match(line)
        if head:
            flush()
            sections.append(Section(title=head.group(2), level=len(head.group(1))))
            i += 1
            continue
        image = _IMAGE.match(line.strip())
        if image:
            flush()
            sections[-1].blocks.append({"image": image.group(1)})
            i += 1
            continue
        if line.lstrip().startswith("|") and i + 1 < len(lines) and _RULE.match(lines[i + 1].strip()):
            flush()
            columns = _split_row(line)
            rows, i = [], i + 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                row = _split_row(lines[i])
                if len(row) != len(columns):
                    raise ValueError(f"table row {i + 1} has {len(row)} cells where the header "
                                     f"{columns!r} has {len(columns)}: {lines[i]!r}")
                rows.append(row)
                i += 1
            sections[-1].blocks.append({"table": {"columns": columns, "rows": rows}})
            continue
        if not line.strip():
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    if not sections[0].blocks:
        sections.pop(0)
    return sections


def render_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_sections(sections: list[Section], shift: int = 0, image_prefix: str = "") -> str:
    """Markdown for `sections`, headings moved `shift` levels down (capped at 6)."""
    out: list[str] = []
    for section in sections:
        if section.level > 0:
            out += ["#" * min(6, section.level + shift) + " " + section.title, ""]
        for block in section.blocks:
            if "text" in block:
                out += [block["text"], ""]
            elif "table" in block:
                out += [render_table(block["table"]["columns"], block["table"]["rows"]), ""]
            elif "image" in block:
                out += [f"![{Path(block['image']).stem}]({image_prefix}{block['image']})", ""]
            else:
                raise ValueError(f"unknown block in section {section.title!r}: {sorted(block)}")
    return "\n".join(out).rstrip() + "\n"


def to_json(result: BenchmarkResult) -> str:
    return json.dumps(asdict(result), indent=1, ensure_ascii=False) + "\n"


def from_json(text: str, where: str = "<string>") -> BenchmarkResult:
    try:
        raw = json.loads(text)
        sections = [Section(**s) for s in raw.pop("sections")]
        return BenchmarkResult(sections=sections, **raw)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: not a benchmark result ({exc})") from exc


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def current_commit(repo: Path | None = None) -> str:
    """The checked-out commit, with `+dirty` when tracked files differ from it; "" outside git."""
    cwd = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")


def save_run(benchmark: str, markdown: str, out_dir: Path | str, argv: list[str] | None = None) -> Path:
    """Write a benchmark's markdown report as `<out_dir>/<benchmark>.json`; returns its path.

    Images the report links to are looked up beside the json when it is added to
    `benchmarks/results/` (`benchmarks/make_docs.py --add`).
    """
    argv = sys.argv if argv is None else argv
    result = BenchmarkResult(
        benchmark=benchmark,
        command=".venv/bin/python " + shlex.join(argv),
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        commit=current_commit(),
        sections=parse_markdown(markdown),
    )
    path = Path(out_dir) / f"{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, to_json(result))
    return path


def add_result(run_json: Path | str, results_dir: Path | str) -> Path:
    """Make `run_json` the latest result of its benchmark in `results_dir`, with its images.

    Images are renamed `<benchmark>_<name>` so that two benchmarks' plots cannot collide,
    and the previous run's images of that benchmark are removed.
    """
    run_json, results_dir = Path(run_json), Path(results_dir)
    result = from_json(run_json.read_text(), str(run_json))
    results_dir.mkdir(parents=True, exist_ok=True)
    for old in results_dir.glob(f"{result.benchmark}_*.png"):
        old.unlink()
    for section in result.sections:
        for block in section.blocks:
            if "image" in block:
                source = run_json.parent / block["image"]
                if not source.is_file():
                    raise FileNotFoundError(f"{run_json}: image {block['image']!r} is not beside it ({source})")
                name = f"{result.benchmark}_{Path(block['image']).name}"
                shutil.copyfile(source, results_dir / name)
                block["image"] = name
    path = results_dir / f"{result.benchmark}.json"
    _atomic_write(path, to_json(result))
    return path


def load_results(results_dir: Path | str) -> list[BenchmarkResult]:
    """Every `<benchmark>.json` in `results_dir`, sorted by benchmark name."""
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        result = from_json(path.read_text(), str(path))
        if result.benchmark != path.stem:
            raise ValueError(f"{path}: holds benchmark {result.benchmark!r}, not {path.stem!r}")
        out.append(result)
    return out


def render_doc(results: list[BenchmarkResult], image_prefix: str = "../benchmarks/results/") -> str:
    """docs/benchmarks.md: an index of the latest runs, then each run's report."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `.venv/bin/python benchmarks/make_docs.py` from `benchmarks/results/*.json`,",
        "the latest accepted run of each benchmark; do not edit by hand. Earlier runs are in git",
        "history. A new run becomes the latest with `benchmarks/make_docs.py --add <run>.json`.",
        "",
        render_table(["benchmark", "run", "commit", "command"],
                     [[f"[{r.benchmark}](#{r.benchmark.replace('_', '-')})", r.date, r.commit or "unknown",
                       f"`{r.command}`"] for r in results]),
        "",
    ]
    for r in results:
        lines += [f"## {r.benchmark.replace('_', '-')}", "",
                  f"Command: `{r.command}`  ", f"Run: {r.date}, commit {r.commit or 'unknown'}.", ""]
        if r.note:
            lines += [r.note, ""]
        lines.append(render_sections(r.sections, shift=2, image_prefix=image_prefix))
    return "\n".join(lines).rstrip() + "\n"
