"""The README and docs/ point at things that exist: files, test functions, doc anchors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]*)(#[^)\s]*)?\)")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?")
TEST_CONT = re.compile(r"`::(test_\w+)`")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target, anchor in LINK.findall(page.read_text()):
        if "://" in target:
            continue
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: link to {target} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor[1:] in _anchors(path), f"{page.name}: no heading {anchor} in {path.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_tests_exist(page):
    text = page.read_text()
    for line in text.splitlines():
        refs = TEST_REF.findall(line)
        module = None
        for module, name in refs:
            assert (ROOT / module).is_file(), f"{page.name}: {module} does not exist"
            if name:
                assert re.search(rf"def {name}\b", (ROOT / module).read_text()), f"{page.name}: no {module}::{name}"
        for name in TEST_CONT.findall(line):  # `::test_x` continues the line's last module
            assert module, f"{page.name}: `::{name}` without a module before it on its line"
            assert re.search(rf"def {name}\b", (ROOT / module).read_text()), f"{page.name}: no {module}::{name}"


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


DOC_REF = re.compile(r"docs/([\w\-]+\.md)(#[\w\-]+)?")


def test_doc_sections_named_in_code_exist():
    """A tunable constant names the doc section that measured it: that section must exist."""
    sources = [p for d in ("dresd", "pipelines", "jobs", "benchmarks", "scripts")
               for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh", ".yaml")]
    seen = 0
    for src in sources:
        for page, anchor in DOC_REF.findall(src.read_text()):
            seen += 1
            doc = ROOT / "docs" / page
            assert doc.is_file(), f"{src.relative_to(ROOT)}: names docs/{page}, which does not exist"
            if anchor:
                assert anchor[1:] in _anchors(doc), f"{src.relative_to(ROOT)}: no heading {anchor} in docs/{page}"
    assert seen > 0
