"""Benchmark results: markdown <-> json, adding a run, and the generated docs page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dresd.evaluation.results import (add_result, from_json, load_results, parse_markdown, render_doc,
                                      render_sections, save_run, to_json)

ROOT = Path(__file__).resolve().parents[2]

REPORT = """# A run

2 cores, greedy.

## mtbench

| method | tok/s |
|---|---|
| greedy | 67.48 |
| dresd | 76.40 |

- a note
- another

![speed](speedup.png)
"""


def test_markdown_tables_become_columns_and_rows():
    sections = parse_markdown(REPORT)
    assert [(s.title, s.level) for s in sections] == [("A run", 1), ("mtbench", 2)]
    table = sections[1].blocks[0]["table"]
    assert table["columns"] == ["method", "tok/s"]
    assert table["rows"] == [["greedy", "67.48"], ["dresd", "76.40"]]
    assert sections[1].blocks[1] == {"text": "- a note\n- another"}
    assert sections[1].blocks[2] == {"image": "speedup.png"}


def test_render_gives_back_the_same_markdown_structure():
    sections = parse_markdown(REPORT)
    again = parse_markdown(render_sections(sections))
    assert again == sections
    shifted = render_sections(sections, shift=2)
    assert shifted.startswith("### A run") and "#### mtbench" in shifted


def test_a_ragged_table_row_is_refused_naming_the_row():
    with pytest.raises(ValueError, match="row 4 has 3 cells"):
        parse_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n| 1 | 2 | 3 |\n")


def test_code_fences_are_text_not_tables_or_headings():
    sections = parse_markdown("```\n# not a heading\n| a |\n|---|\n```\n")
    assert len(sections) == 1 and "table" not in sections[0].blocks[0]
    assert "# not a heading" in sections[0].blocks[0]["text"]


def test_a_saved_run_is_added_with_its_images_and_rendered(tmp_path):
    run_dir, results = tmp_path / "run", tmp_path / "results"
    run_dir.mkdir()
    (run_dir / "speedup.png").write_bytes(b"png")
    path = save_run("toy_bench", REPORT, run_dir, argv=["benchmarks/toy_bench.py", "--quick"])
    saved = from_json(path.read_text())
    assert saved.command == ".venv/bin/python benchmarks/toy_bench.py --quick"
    assert saved.date[:4].isdigit()

    results.mkdir()
    (results / "toy_bench_old.png").write_bytes(b"old")
    added = add_result(path, results)
    assert added == results / "toy_bench.json"
    assert not (results / "toy_bench_old.png").exists()
    assert (results / "toy_bench_speedup.png").read_bytes() == b"png"
    page = render_doc(load_results(results))
    assert "](../benchmarks/results/toy_bench_speedup.png)" in page
    assert "| dresd | 76.40 |" in page and "`.venv/bin/python benchmarks/toy_bench.py --quick`" in page


def test_adding_a_run_whose_image_is_missing_fails_naming_it(tmp_path):
    path = save_run("toy_bench", REPORT, tmp_path, argv=["x.py"])
    with pytest.raises(FileNotFoundError, match="speedup.png"):
        add_result(path, tmp_path / "results")


def test_a_results_file_named_after_another_benchmark_is_refused(tmp_path):
    path = save_run("toy_bench", "# t\n", tmp_path, argv=["x.py"])
    path.rename(tmp_path / "other.json")
    with pytest.raises(ValueError, match="holds benchmark 'toy_bench', not 'other'"):
        load_results(tmp_path)
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "other"}))
    with pytest.raises(ValueError, match="not a benchmark result"):
        load_results(tmp_path)


def test_the_committed_benchmarks_page_is_generated_from_the_committed_results():
    results = load_results(ROOT / "benchmarks" / "results")
    assert {"spec_bench", "build_bench", "update_bench"} <= {r.benchmark for r in results}
    for r in results:
        assert to_json(from_json(to_json(r))) == to_json(r)
        for s in r.sections:
            for b in s.blocks:
                if "image" in b:
                    assert (ROOT / "benchmarks" / "results" / b["image"]).is_file(), b["image"]
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert page == render_doc(results), "docs/benchmarks.md is stale: run benchmarks/make_docs.py"
