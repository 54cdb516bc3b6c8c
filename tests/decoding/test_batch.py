"""generate_batch on a tiny model: batched greedy == one-at-a-time greedy, per-row EOS,
exact token budgets, seeded sampling."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from dresd.decoding.batch import BatchStats, generate_batch
from dresd.config import SpeculativeConfig
from dresd.decoding.loop import SpeculativeDecoder
from dresd.model.loading import LoadedModel
from tests_support import one_torch_thread


@dataclass
class _EosLM(LoadedModel):
    """The same model with another token playing EOS (a random model rarely emits the real one)."""

    eos: int = 0

    @property
    def eos_token_id(self) -> int:
        return self.eos


# One thread: a tiny model gains nothing from two, and on a busy 2-core machine OpenMP's
# spinning threads make batched forwards many times slower.
single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    # Different lengths (1 token included) so left padding and position ids matter.
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in (9, 1, 23, 4, 14)]


def _greedy_alone(lm, prompts, max_new, eos=None):
    dec = SpeculativeDecoder(lm.model, lm.eos_token_id if eos is None else eos, lm.max_context,
                             SpeculativeConfig(method="greedy"))
    return [dec.generate_ids(p, max_new).token_ids for p in prompts]


def test_batched_greedy_equals_one_at_a_time(tiny_lm, prompts):
    alone = _greedy_alone(tiny_lm, prompts, 12)
    stats = BatchStats()
    batched = generate_batch(tiny_lm, prompts, 12, stats=stats)
    assert batched == alone
    assert stats.rows == 5 and stats.width == 23 and stats.prompt_tokens == sum(map(len, prompts))
    assert stats.new_tokens == sum(map(len, batched))
    # Another grouping of the same prompts gives the same tokens.
    assert generate_batch(tiny_lm, prompts[2:4], 12) == alone[2:4]
    assert generate_batch(tiny_lm, prompts[1:2], 12) == alone[1:2]


def test_padded_batched_prefill_gives_the_same_tokens(tiny_lm, prompts, monkeypatch):
    import dresd.decoding.batch as bd

    per_row = BatchStats()
    alone = generate_batch(tiny_lm, prompts, 12, stats=per_row)
    monkeypatch.setattr(bd, "PADDED_PREFILL_DEVICES", ("cpu", "cuda"))  # the GPU path, here
    padded = BatchStats()
    assert generate_batch(tiny_lm, prompts, 12, stats=padded) == alone
    assert padded.steps == per_row.steps and padded.width == per_row.width == 23


def test_max_new_tokens_is_exact(tiny_lm, prompts):
    for n in (0, 1, 5):
        out = generate_batch(tiny_lm, prompts, n)
        assert [len(o) for o in out] == [n] * len(prompts)  # the real EOS never wins here
    assert generate_batch(tiny_lm, [], 5) == []


def test_per_row_eos_stops_each_row_and_freezes_it(tiny_lm, prompts):
    alone = _greedy_alone(tiny_lm, prompts, 12)
    # Pick as "EOS" a token the greedy outputs emit at different depths: rows then stop at
    # different steps while the others continue.
    first_seen: dict[int, set[int]] = {}
    for row in alone:
        for t in row:
            first_seen.setdefault(t, set()).add(row.index(t))
    eos = max(first_seen, key=lambda t: (len(first_seen[t]), -min(first_seen[t])))
    expect = _greedy_alone(tiny_lm, prompts, 12, eos=eos)
    assert len({len(e) for e in expect}) > 1, "the chosen EOS should end rows at different steps"
    assert any(e and e[-1] == eos for e in expect)
    eos_lm = _EosLM(tiny_lm.model, tiny_lm.tokenizer, tiny_lm.device, tiny_lm.identity, eos=eos)
    stats = BatchStats()
    got = generate_batch(eos_lm, prompts, 12, stats=stats)
    assert got == expect
    for row in got:
        assert eos not in row[:-1]  # nothing after EOS
    assert stats.steps == max(map(len, got)) - 1


def test_budget_is_capped_by_the_context(tiny_lm):
    prompt = [5] * (tiny_lm.max_context - 3)
    assert [len(o) for o in generate_batch(tiny_lm, [prompt, [5, 6]], 10)] == [3, 10]
    with pytest.raises(ValueError, match="context"):
        generate_batch(tiny_lm, [[5] * tiny_lm.max_context], 4)
    with pytest.raises(ValueError, match="empty"):
        generate_batch(tiny_lm, [[5], []], 4)


def test_sampling_is_reproducible_for_a_seed(tiny_lm, prompts):
    a = generate_batch(tiny_lm, prompts, 10, temperature=0.9, top_p=0.95, seed=3)
    b = generate_batch(tiny_lm, prompts, 10, temperature=0.9, top_p=0.95, seed=3)
    c = generate_batch(tiny_lm, prompts, 10, temperature=0.9, top_p=0.95, seed=4)
    assert a == b
    assert a != c
    assert [len(x) for x in a] == [10] * len(prompts)
    # A nucleus this small keeps only the top token: sampling collapses to greedy.
    assert generate_batch(tiny_lm, prompts, 10, temperature=1.0, top_p=1e-6, seed=5) == generate_batch(tiny_lm, prompts, 10)
