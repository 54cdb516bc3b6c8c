"""Tests for dresd.evaluation.code_prompts: the code scenario's functions, read from package sources."""

from __future__ import annotations

import ast
import importlib.util
import json
import textwrap
import warnings
from pathlib import Path

import pytest

from dresd.evaluation.code_prompts import (CODE_PACKAGES, CodeFunction, code_functions, file_functions, package_files,
                                           split_functions)

DOC = "Return the running total of `values`, starting from `start`, as a new list of the same length."

MODULE = f'''
import os


def running_total(values: list[int], start: int = 0) -> list[int]:
    """{DOC}

    Args:
        values: the numbers.
    """
    out, total = [], start
    for v in values:
        total += v
        out.append(total)
    return out


def _private(values):
    """{DOC}"""
    a = 1
    return a


def short_doc(values):
    """Too short."""
    a = 1
    return a


def one_liner(values):
    """{DOC} (one statement)"""
    return values


class Holder:
    def method(self, values):
        """{DOC} (a method)"""
        a = 1
        return a
'''


def write_package(root, name: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / name / "__init__.py").touch()


def function(name: str, doc: str) -> str:
    return textwrap.dedent(f'''
        def {name}(x):
            """{doc} {"and more words to pass the minimum length of a docstring " * 2}"""
            y = x + 1
            return y
        ''')


def test_only_public_documented_module_functions_with_a_body_make_prompts(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(MODULE)
    (fn,) = file_functions("pkg.sub.mod", path)
    assert fn.id == "pkg:pkg.sub.mod:running_total"
    assert fn.prompt.startswith("Implement this Python function from the pkg package (module pkg.sub.mod).")
    block = fn.prompt.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
    # The signature keeps annotations and defaults; the docstring is there, the body is not.
    assert block.startswith("def running_total(values: list[int], start: int=0) -> list[int]:\n    \"\"\"" + DOC)
    assert "Args:" in block and "total += v" not in block
    parsed = ast.parse(block).body[0]  # a valid function: signature and docstring alone
    assert ast.get_docstring(parsed).startswith(DOC)
    assert fn.source.startswith("def running_total(") and fn.source.rstrip().endswith("return out")
    assert "total += v" in fn.source


def test_unparsable_files_give_no_functions(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def broken(:\n")
    assert file_functions("pkg.bad", path) == []


def test_order_is_deterministic_takes_turns_and_skips_tests_and_twins(tmp_path, monkeypatch):
    write_package(tmp_path, "alpha", {f"m{i}.py": function(f"a{i}", f"Alpha {i}.") + function(f"b{i}", f"Beta {i}.")
                                      + function(f"c{i}", f"Gamma {i}.") for i in range(3)}
                  | {"tests/test_x.py": function("in_tests", "Test helper."),
                     "twin.py": function("a0", "Another doc, same name.") + function("other", "Alpha 0.")})
    write_package(tmp_path, "beta", {"only.py": function("z", "Zeta.")})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [m for m, _ in package_files("alpha")] == ["alpha", "alpha.m0", "alpha.m1", "alpha.m2", "alpha.twin"]
    fns = code_functions(7, ("alpha", "beta"), per_file=2)
    assert fns == code_functions(7, ("alpha", "beta"), per_file=2)
    names = [f.id.rsplit(":", 1)[1] for f in fns]
    # Packages take turns while they last: beta's one function comes second.
    assert fns[0].id.startswith("alpha:") and names[1] == "z"
    assert "in_tests" not in names and "c0" not in names and "c1" not in names  # tests/ skipped, 2 per file
    assert len(set(names)) == 7  # a name or docstring seen before is skipped
    assert not ({"a0", "b0", "a1", "b1", "a2", "b2"} - set(names))
    with pytest.raises(ValueError, match="hold 7 eligible functions, fewer than the 8"):
        code_functions(8, ("alpha", "beta"), per_file=2)
    held, rest = split_functions(fns, 3)
    assert held == fns[:3] and rest == fns[3:]
    with pytest.raises(ValueError, match="none for a store"):
        split_functions(fns, 7)


def test_missing_package_is_named():
    with pytest.raises(ModuleNotFoundError, match="no_such_package_xyz"):
        code_functions(1, ("no_such_package_xyz",))


def test_installed_packages_give_the_benchmark_functions():
    fns = code_functions(24)
    assert len({f.id for f in fns}) == 24
    assert {f.id.split(":")[0] for f in fns} == set(CODE_PACKAGES)  # every package takes its turn
    for f in fns:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # backslashes of raw docstrings (LaTeX) in a prompt
            ast.parse(f.prompt.split("```python\n", 1)[1].rsplit("\n```", 1)[0])
        assert ast.parse(f.source).body[0].name == f.id.rsplit(":", 1)[1]


@pytest.fixture(scope="module")
def spec_bench():
    """benchmarks/spec_bench.py as a module (the benchmark builds the code scenario from these functions)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "spec_bench.py"
    spec = importlib.util.spec_from_file_location("spec_bench_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_code_scenario_holds_out_evaluation_functions(spec_bench, tmp_path, monkeypatch, byte_tokenizer):
    fns = [CodeFunction(f"pkg:pkg.m:f{i}", f"Write f{i}.", f"def f{i}(x):\n    return x + {i}\n") for i in range(30)]
    monkeypatch.setattr(spec_bench, "CODE_HELD_OUT", 4)
    monkeypatch.setattr(spec_bench, "CODE_ID_ROWS", 6)
    monkeypatch.setattr(spec_bench, "MIN_CODE_ID_RECORDS", 5)
    assert spec_bench.eval_sets(["code"], fns) == {"code": [f.prompt for f in fns[:4]]}
    decoded = []

    def fake_decode(workdir, raw, name, overrides):
        # The decode job's corpus: an answer to every prompt it was given, one left empty.
        prompts = [json.loads(line) for line in (workdir / "corpora" / "code_prompts.jsonl").read_text().splitlines()]
        decoded.append((name, overrides))
        raw.write_text("".join(json.dumps({"id": p["id"], "prompt": p["prompt"], "response": "" if i == 2 else "ok"})
                               + "\n" for i, p in enumerate(prompts)))

    monkeypatch.setattr(spec_bench, "decode_answers", fake_decode)
    path = spec_bench.code_id_corpus(tmp_path, fns, banned=set())
    kept = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    # The 6 functions after the 4 held out, the empty answer dropped.
    assert kept == [f.id for f in fns[4:10] if f.id != fns[6].id]
    assert decoded[0][0] == "code-id" and "id_field=id" in decoded[0][1] and "limit=6" in decoded[0][1]
    # The OOD store: the functions' own sources, as many as the token target takes.
    records = [(f.id, f.prompt, f.source) for f in fns[4:]]
    one = spec_bench.corpus_tokens(spec_bench.ood_corpus(tmp_path, set(), byte_tokenizer, 0, 10 ** 6, records[:1],
                                                         "code-ood"), byte_tokenizer, 0)
    ood = spec_bench.ood_corpus(tmp_path, {spec_bench.norm(fns[5].prompt)}, byte_tokenizer, 0, 3 * one, records,
                                "code-ood")
    rows = [json.loads(line) for line in ood.read_text().splitlines()]
    assert [r["id"] for r in rows] == [fns[4].id, fns[6].id, fns[7].id]  # a banned prompt is skipped
    assert rows[0]["response"] == fns[4].source
