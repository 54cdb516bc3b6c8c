"""Kill points (issue 25): a job killed at a named fault point (dresd.storage.faults) leaves
what it was changing whole, a rerun gives exactly what an uninterrupted run gives, and no
debris stays. The CI subset of the matrix that scripts/reliability.py runs in full and
renders into docs/reliability.md (tests/kill_points.py holds the shared logic).

Deletes run on a store made without a model, so only the decode case starts Ray.
"""

from __future__ import annotations

import pytest

from kill_points import CI_CASES, Bench, Case, Outcome, run_case

pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return Bench(tmp_path_factory.mktemp("kill-points"), synthetic=True)


def _recovered(bench: Bench, case: Case) -> Outcome:
    assert case in CI_CASES
    outcome = run_case(bench, case)
    assert (outcome.fired, outcome.killed) == (True, True), outcome.detail
    assert outcome.result == "recovered", outcome.detail
    assert outcome.debris == []
    return outcome


def test_a_delete_killed_after_its_version_rename_leaves_current_and_its_orphan_is_removed(bench):
    _recovered(bench, Case("delete", "after_version_rename"))


def test_a_delete_killed_during_the_current_write_leaves_the_old_pointer_whole(bench):
    _recovered(bench, Case("delete", "during_current_write"))


def test_a_delete_killed_before_publishing_changes_nothing(bench):
    _recovered(bench, Case("delete", "during_delete"))


@pytest.mark.ray
def test_a_decode_killed_mid_part_write_keeps_finished_parts_and_redoes_the_torn_one(bench):
    _recovered(bench, Case("decode", "during_part_write", 2))
