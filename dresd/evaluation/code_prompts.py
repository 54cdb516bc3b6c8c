"""The benchmark's code scenario: functions with docstrings from installed third-party packages.

Each prompt is a function's signature and docstring, asking for the function; the reply a
human wrote is the function's own source. Functions come from the project's pinned
dependencies (CODE_PACKAGES), read with `ast` from their installed sources without
importing them, so the selection is the same wherever the same versions are installed.
HumanEval, the Python standard library and chat corpora are held-out checks and never come
from here.

The order is deterministic and mixes packages: the packages take turns, and within one its
files are taken in order of a hash of (package, module), at most PER_FILE functions each (in
file order), so neighbouring prompts come from different packages and modules. The benchmark holds out the first functions for
evaluation and answers the ones after them for its in-distribution store.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib.util
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

# Pinned in pyproject.toml, so every set-up reads the same sources.
CODE_PACKAGES = ("numpy", "pyarrow", "transformers", "datasets", "matplotlib", "accelerate")
# Folders of tests and vendored code: not the package's own API.
SKIPPED_DIRS = frozenset({"tests", "test", "testing", "test_utils", "_vendor", "vendor", "vendored", "externals", "benchmarks"})
PER_FILE = 2  # functions taken from one file at most: more modules, fewer near-duplicates
MIN_DOC_CHARS = 80  # a docstring shorter than this hardly specifies the function
MAX_DOC_CHARS = 1200  # keeps prompts well under the benchmark's 512-token records
MIN_BODY_STATEMENTS = 2  # statements after the docstring: a one-liner is trivial to draft
MAX_SOURCE_LINES = 60  # keeps the human-written reply about an answer's length

INSTRUCTION = ("Implement this Python function from the {package} package (module {module}). "
               "Reply with the complete function in one Python code block.")


@dataclass(frozen=True)
class CodeFunction:
    """One function: the prompt that asks for it and its own source."""

    id: str  # "package:module:name", unique
    prompt: str  # instruction, then signature and docstring in a code block
    source: str  # the function as the package writes it (decorators left out), dedented


def package_root(package: str) -> Path:
    """The installed source folder of `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"code scenario: package {package!r} is not installed as a package folder "
                                  f"(the benchmark reads {', '.join(CODE_PACKAGES)})")
    return Path(next(iter(spec.submodule_search_locations)))


def package_files(package: str) -> list[tuple[str, Path]]:
    """(module name, file) of every .py file of `package` outside test and vendored folders."""
    root = package_root(package)
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS & set(rel.parts[:-1]):
            continue
        parts = [package, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def signature_and_doc(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The def line (annotations and defaults included) and the docstring, without the body."""
    doc = ast.get_docstring(node, clean=True) or ""
    bare = copy.copy(node)  # shallow: the original keeps its body and decorators
    bare.body, bare.decorator_list, bare.type_comment = [ast.Pass()], [], None
    head = ast.unparse(bare)
    head = head.rsplit("\n", 1)[0]  # drop the placeholder body line
    return f'{head}\n    """{textwrap.indent(doc, "    ").lstrip()}\n    """'


def file_functions(module: str, path: Path) -> list[CodeFunction]:
    """The module-level public functions of one file that make fair prompts, in file order."""
    try:
        text = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # other packages' invalid escapes are not ours to report
            tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # a file the running Python cannot parse (other versions' code paths)
    lines = text.splitlines()
    package = module.split(".")[0]
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or not MIN_DOC_CHARS <= len(doc) <= MAX_DOC_CHARS or '"""' in doc:
            continue
        if len(node.body) - 1 < MIN_BODY_STATEMENTS or node.end_lineno - node.lineno + 1 > MAX_SOURCE_LINES:
            continue
        source = textwrap.dedent("\n".join(lines[node.lineno - 1: node.end_lineno]))
        prompt = (INSTRUCTION.format(package=package, module=module)
                  + f"\n\n```python\n{signature_and_doc(node)}\n```")
        out.append(CodeFunction(f"{package}:{module}:{node.name}", prompt, source))
    return out


def _file_order(package: str, module: str) -> str:
    return hashlib.sha256(f"{package}/{module}".encode()).hexdigest()


def _package_functions(package: str, per_file: int):
    """`package`'s eligible functions: files in hash order, at most `per_file` from each."""
    for module, path in sorted(package_files(package), key=lambda f: _file_order(package, f[0])):
        yield from file_functions(module, path)[:per_file]


def code_functions(count: int, packages: tuple[str, ...] = CODE_PACKAGES, per_file: int = PER_FILE) -> list[CodeFunction]:
    """The first `count` functions of the deterministic order (see the module docstring).

    Packages take turns (one function each per round, while they last), so a package with
    many files does not crowd out the others. A function whose name or docstring an earlier
    one has (re-exports, the per-model copies in transformers) is skipped, so no evaluation
    prompt has a twin in a store. Raises when the packages hold fewer than `count`.
    """
    streams = [_package_functions(pkg, per_file) for pkg in packages]
    out: list[CodeFunction] = []
    seen: set[str] = set()
    while streams and len(out) < count:
        for stream in list(streams):
            for fn in stream:
                doc = " ".join(fn.prompt.split("```python\n", 1)[1].split("\n", 1)[1].split())
                name = fn.id.rsplit(":", 1)[1]
                if name not in seen and doc not in seen:
                    seen.update((name, doc))
                    out.append(fn)
                    break
            else:
                streams.remove(stream)  # this package has no more
            if len(out) == count:
                return out
    if len(out) < count:
        raise ValueError(f"code scenario: {', '.join(packages)} hold {len(out)} eligible functions, fewer than the "
                         f"{count} asked for")
    return out


def split_functions(functions: list[CodeFunction], held_out: int) -> tuple[list[CodeFunction], list[CodeFunction]]:
    """(evaluation functions, the rest for the stores): the first `held_out` are evaluated."""
    if len(functions) <= held_out:
        raise ValueError(f"code scenario: {len(functions)} functions leave none for a store after {held_out} held out")
    return functions[:held_out], functions[held_out:]
