"""Names from untrusted places: each must be one plain entry of its folder."""

from __future__ import annotations

import os

import pytest

from dresd.storage.names import escape_problem, is_inside, name_problem


@pytest.mark.parametrize("name,problem", [
    ("", "is empty"),
    ("..", "climbs out of its folder"),
    ("../x", "climbs out of its folder"),
    ("a/../../x", "climbs out of its folder"),
    ("/etc/passwd", "is an absolute path"),
    ("\\\\server\\share", "is an absolute path"),
    ("C:\\x", "is an absolute path"),
    ("sub/x.npy", "contains a path separator"),
    ("x\\y", "contains a path separator"),
    (".", "the folder itself"),
    ("a\x00b", "NUL byte"),
    (3, "not a string"),
])
def test_name_problem_names_each_problem(name, problem):
    assert problem in name_problem(name)


@pytest.mark.parametrize("name", ["v1", "20260101-120000-abc123", ".tmp-v2", "tokens.npy", "a..b"])
def test_plain_names_pass(name):
    assert name_problem(name) is None


def test_a_symlink_out_of_the_root_is_named_with_its_target(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "in").mkdir()
    (root / "link").symlink_to(outside)
    (root / "inner-link").symlink_to(root / "in")
    assert is_inside(root / "in", root) and is_inside(root, root)
    assert escape_problem(root / "inner-link", root) is None
    assert escape_problem(root / "link", root) == f"is a symlink leading outside {root} (to {os.path.realpath(outside)})"
    assert not is_inside(tmp_path / "root-sibling", root)  # a shared prefix is not containment
