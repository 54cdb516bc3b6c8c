"""The package's shape: imports point down the layers of docs/architecture.md, no import
cycles (function-level imports included), and Ray only where Ray runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dresd", "pipelines", "jobs")

# Bottom to top, as docs/architecture.md draws them. A module imports from its own layer's
# package and from lower layers only; packages that share a layer do not import each other.
LAYERS = (
    ("dresd.config", "dresd.storage"),
    ("dresd.model", "dresd.datastore"),
    ("dresd.drafters",),
    ("dresd.decoding",),
    ("dresd.evaluation", "dresd.serving", "pipelines"),
    ("dresd.cli", "jobs"),
)


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its body (relative imports resolved)."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def layer_of(module: str) -> tuple[int, str]:
    for level, group in enumerate(LAYERS):
        for pkg in group:
            if module == pkg or module.startswith(pkg + "."):
                return level, pkg
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS and docs/architecture.md")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_find_cycles_sees_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_imports_point_down_the_layers():
    wrong = []
    graph = import_graph()
    assert graph.pop("dresd") == set()  # the root package imports nothing: no layer hides there
    for module, targets in sorted(graph.items()):
        level, pkg = layer_of(module)
        for target in sorted(targets):
            t_level, t_pkg = layer_of(target)
            if t_level > level or (t_level == level and t_pkg != pkg):
                wrong.append(f"{module} (layer {level}) imports {target} (layer {t_level})")
    assert wrong == []


def test_library_imports_no_ray():
    """Everything in dresd/ but the Ray actor pool and the Ray Serve app's modules imports
    without Ray (and without pipelines/)."""
    code = (
        "import importlib, pkgutil, sys, dresd\n"
        "skip = {'dresd.serving.pool', 'dresd.serving.app', 'dresd.serving.ingress', 'dresd.serving.decode_server',"
        " 'dresd.serving.hub', 'dresd.cli.__main__'}\n"
        "names = [m.name for m in pkgutil.walk_packages(dresd.__path__, 'dresd.') if m.name not in skip]\n"
        "for n in names: importlib.import_module(n)\n"
        "print(len(names), sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'pipelines', 'jobs')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    count, loaded = out.stdout.split(" ", 1)
    assert int(count) > 30 and loaded.strip() == "[]"


# Modules whose tests live under another name, and why.
TESTED_ELSEWHERE = {
    "dresd/cli/__main__.py": "two lines that call main(); tests/cli/test_main.py",
    "jobs/build.py": "tests/jobs/test_build_job.py (test_build.py is the pipeline's)",
    "jobs/decode.py": "tests/jobs/test_decode_job.py (test_decode.py is the pipeline's)",
    "jobs/update.py": "tests/jobs/test_update_job.py (test_update.py is the pipeline's)",
    "jobs/common.py": "the job command line, run by both job tests",
    "pipelines/runtime.py": "connecting to Ray, run by every Ray test of pipelines/",
}


def test_every_module_has_its_mirrored_test_module():
    """dresd/<pkg>/<mod>.py is tested in tests/<pkg>/test_<mod>.py (pipelines/, jobs/ likewise)."""
    missing = []
    for top in ("dresd", "pipelines", "jobs"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path.name == "__init__.py" or rel in TESTED_ELSEWHERE:
                continue
            folder = path.parent.relative_to(ROOT / "dresd") if top == "dresd" else path.parent.relative_to(ROOT)
            if not (ROOT / "tests" / folder / f"test_{path.name}").is_file():
                missing.append(f"{rel} -> tests/{folder.as_posix()}/test_{path.name}")
    assert not missing, "modules without a mirrored test module:\n" + "\n".join(missing)
    for rel in TESTED_ELSEWHERE:
        assert (ROOT / rel).is_file(), f"TESTED_ELSEWHERE names {rel}, which no longer exists"
