"""Tests for dresd/drafters/__init__.py: the request a drafter gets (its keys compressed once
per compressor), the candidates it returns, and cutting a draft at its length and EOS."""

from __future__ import annotations

import numpy as np
import pytest

from dresd.datastore.compression import compress
from dresd.drafters import Candidates, DraftRequest, truncate_at
from tests_support import identity_compressor

EOS = 2


def test_request_compresses_its_keys_once_per_compressor(monkeypatch):
    import dresd.datastore.compression as compression

    calls = []
    monkeypatch.setattr(compression, "compress", lambda comp, rows: calls.append(id(comp)) or compress(comp, rows))
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(3, 8)).astype(np.float32)
    one, other = identity_compressor(8), identity_compressor(8)
    request = DraftRequest([1, 2, 3], 4, keys[-1], keys)
    first = request.compressed(one)
    assert request.compressed(one) is first and calls == [id(one)]
    # Every new key is compressed, the query's is the last row (rows are L2-normalised).
    assert first.shape == (3, 8)
    np.testing.assert_allclose(first[-1], keys[-1] / np.linalg.norm(keys[-1]), atol=1e-5)
    # Another compressor gets its own rows.
    request.compressed(other)
    assert calls == [id(one), id(other)]


def test_request_without_new_keys_compresses_the_query_alone_and_without_a_query_nothing():
    query = np.arange(1, 9, dtype=np.float32)
    rows = DraftRequest([1], 4, query).compressed(identity_compressor(8))
    assert rows.shape == (1, 8)
    np.testing.assert_allclose(rows[0], query / np.linalg.norm(query), atol=1e-5)
    empty = DraftRequest([1], 4, query, np.zeros((0, 8), np.float32)).compressed(identity_compressor(8))
    assert empty.shape == (1, 8)
    assert DraftRequest([1], 4).compressed(identity_compressor(8)) is None


def test_candidates_keep_non_empty_paths_as_ints():
    c = Candidates()
    c.add([np.int64(5), np.int64(6)], 2, "a")
    c.add([], 9.0, "b")  # nothing to verify: dropped with its weight
    c.add((7,), 0.5, "c")
    assert c.paths == [[5, 6], [7]] and all(type(t) is int for t in c.paths[0])
    assert c.weights == [2.0, 0.5] and c.sources == ["a", "c"] and len(c) == 2


@pytest.mark.parametrize("path, max_len, eos, want", [
    ([5, 6, 7, 8], 2, EOS, [5, 6]),
    ([5, EOS, 7, 8], 4, EOS, [5, EOS]),  # nothing follows an EOS
    ([5, 6, EOS], 2, EOS, [5, 6]),  # an EOS past the cut does not matter
    ([5, EOS, 7], 9, None, [5, EOS, 7]),  # no EOS id: only the length cut
    ([5, 6], 0, EOS, []),
])
def test_truncate_at_cuts_at_the_length_and_after_the_first_eos(path, max_len, eos, want):
    assert truncate_at(path, max_len, eos) == want
