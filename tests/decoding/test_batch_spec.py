"""Batched speculative decoding on a tiny model: each row's drafts verified in one shared
forward give every sequence exactly what it gets decoded alone (greedy and seeded sampling),
with rows of different lengths, per-row EOS, and requests joining freed slots."""

from __future__ import annotations

import pytest
import torch

from dresd.config import SamplingParams, SpeculativeConfig
from dresd.decoding.batch_spec import BatchedSpeculativeDecoder, BatchRequest
from dresd.decoding.loop import SpeculativeDecoder
from fake_drafters import FakeDrafter, continuation
from tests_support import one_torch_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

NEW = 14
SPEC = SpeculativeConfig(method="dresd", budget="off")  # every proposed node is verified


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    # Different lengths, a 1-token prompt included, so columns, positions and masks differ per row.
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in (9, 1, 23, 4, 14)]


def _alone(lm, prompts, eos, spec=SpeculativeConfig(method="greedy"), drafter=None, sampling=None, new=NEW):
    dec = SpeculativeDecoder(lm.model, eos, lm.max_context, spec, drafter)
    return [dec.generate_ids(p, new, sampling) for p in prompts]


def _eos_for(lm, prompts):
    """A token that some greedy continuations emit early and others not at all, so rows stop apart."""
    ref = [g.token_ids for g in _alone(lm, prompts, eos=-1)]
    return ref[0][3]


def test_batched_greedy_without_drafts_equals_one_at_a_time(tiny_lm, prompts):
    eos = _eos_for(tiny_lm, prompts)
    alone = [g.token_ids for g in _alone(tiny_lm, prompts, eos)]
    assert any(len(t) < NEW for t in alone) and any(len(t) == NEW for t in alone)  # rows stop apart
    for max_batch in (5, 2):  # 2: three requests wait and join freed slots
        dec = BatchedSpeculativeDecoder(tiny_lm.model, eos, tiny_lm.max_context, SpeculativeConfig(method="greedy"),
                                        max_batch=max_batch)
        out = dec.generate([BatchRequest(p, NEW) for p in prompts])
        assert [g.token_ids for g in out] == alone


@pytest.fixture(scope="module")
def hf_lm(tmp_path_factory):
    """The tiny model without the CPU fast path: transformers' own forward, as on a GPU."""
    from dresd.config import ModelConfig
    from dresd.model.fastpath import lean_forward
    from dresd.model.loading import load_model
    from tiny_models import make_tiny_llama
    from tests_support import TINY_VOCAB

    folder = make_tiny_llama(tmp_path_factory.mktemp("tiny-hf") / "m", vocab_size=TINY_VOCAB, init_std=0.5)
    lm = load_model(ModelConfig(path=str(folder), device="cpu", dual_layout=False))
    assert not lean_forward.applies(lm.model)
    return lm


@pytest.mark.parametrize("forward", ["lean", "transformers"])
def test_each_row_accepts_its_own_drafts_and_stays_identical(request, prompts, forward):
    tiny_lm = request.getfixturevalue("tiny_lm" if forward == "lean" else "hf_lm")
    eos = -1
    ref = [g.token_ids for g in _alone(tiny_lm, prompts, eos)]

    def oracle_or_noise(request):
        # Right drafts for even prompts, a wrong one for odd prompts: rows accept different amounts.
        for i, p in enumerate(prompts):
            text = p + ref[i]
            if request.context[: len(p)] == p and len(request.context) >= len(p):
                if i % 2 == 0:
                    return continuation(text, 4, strict=False)(request)
                return [[(request.context[-1] + 1) % 259 + 3] * 3]
        return []

    drafters = []

    def factory():
        drafters.append(FakeDrafter(oracle_or_noise))
        return drafters[-1]

    dec = BatchedSpeculativeDecoder(tiny_lm.model, eos, tiny_lm.max_context, SPEC, factory, max_batch=3)
    out = dec.generate([BatchRequest(p, NEW) for p in prompts])
    assert [g.token_ids for g in out] == ref
    accepted = [g.metrics.accepted for g in out]
    assert all(accepted[i] > 0 for i in (0, 2, 4)) and accepted[1] == accepted[3] == 0
    assert out[0].metrics.target_calls < NEW  # drafts saved forwards
    assert len(drafters) == 3  # one per slot, reused by the requests that joined
    assert sorted(map(tuple, (b for d in drafters for b in d.begun))) == sorted(map(tuple, prompts))
    assert sorted(map(tuple, (e for d in drafters for e in d.ended))) == sorted(map(tuple, ref))


def test_seeded_sampling_rows_equal_their_one_sequence_runs(tiny_lm, prompts):
    """Same trees, same seed: a sampled row draws what the one-sequence loop draws."""
    ref = [g.token_ids for g in _alone(tiny_lm, prompts, -1)]
    draft = lambda request: [[t] * 2 for t in set(request.context[-2:])]  # noqa: E731
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=s) for s in range(len(prompts))]
    alone = [_alone(tiny_lm, [p], -1, SPEC, FakeDrafter(draft), params[i])[0].token_ids
             for i, p in enumerate(prompts)]
    assert alone != ref  # sampling, not greedy
    dec = BatchedSpeculativeDecoder(tiny_lm.model, -1, tiny_lm.max_context, SPEC, lambda: FakeDrafter(draft),
                                    max_batch=4)
    out = dec.generate([BatchRequest(p, NEW, params[i]) for i, p in enumerate(prompts)])
    assert [g.token_ids for g in out] == alone


def test_bad_requests_name_the_request(tiny_lm):
    dec = BatchedSpeculativeDecoder(tiny_lm.model, -1, tiny_lm.max_context, SpeculativeConfig(method="greedy"))
    with pytest.raises(ValueError, match="request 1: prompt is empty"):
        dec.generate([BatchRequest([5], 3), BatchRequest([], 3)])
    with pytest.raises(ValueError, match="request 0: max_new_tokens must be >= 0"):
        dec.generate([BatchRequest([5], -1)])
    assert dec.generate([]) == []
    assert [g.token_ids for g in dec.generate([BatchRequest([5, 6], 0)])] == [[]]


@pytest.mark.real_model
def test_packaged_model_rows_equal_their_greedy_decodes(packaged_lm):
    """The real model on this CPU's default layers: batched rows with prompt-lookup drafts (each row
    its own drafter, every draft verified) equal plain greedy decoding."""
    from dresd.datastore.corpus import mtbench_first_turns
    from dresd.decoding.engine import Engine
    from dresd.drafters.registry import make_drafter

    engine = Engine(packaged_lm)
    prompts = [engine.prompt_ids(q) for q in mtbench_first_turns()[:5]]
    greedy = [g.token_ids for g in _alone(packaged_lm, prompts, packaged_lm.eos_token_id, new=32)]
    spec = SpeculativeConfig(method="pld", budget="off")
    dec = BatchedSpeculativeDecoder(packaged_lm.model, packaged_lm.eos_token_id, packaged_lm.max_context, spec,
                                    lambda: make_drafter(spec, None, packaged_lm.tokenizer, packaged_lm.eos_token_id),
                                    max_batch=3)
    out = dec.generate([BatchRequest(p, 32) for p in prompts])
    assert [g.token_ids for g in out] == greedy
    assert sum(g.metrics.accepted for g in out) > 0


def test_requests_join_a_running_batch_between_steps(tiny_lm, prompts):
    """Continuous batching: a request submitted while others decode joins at the next step,
    idle rows are dropped from the forward, and every output is what it is alone."""
    ref = [g.token_ids for g in _alone(tiny_lm, prompts, -1)]
    dec = BatchedSpeculativeDecoder(tiny_lm.model, -1, tiny_lm.max_context, SpeculativeConfig(method="greedy"),
                                    max_batch=4)
    ids = {dec.submit(BatchRequest(prompts[0], NEW)): 0, dec.submit(BatchRequest(prompts[1], NEW)): 1}
    results, sizes = {}, []
    for step in range(200):
        if step == 3:
            ids[dec.submit(BatchRequest(prompts[2], NEW))] = 2
        if step == 5:
            ids.update({dec.submit(BatchRequest(p, NEW)): i for i, p in enumerate(prompts[3:], 3)})
        for rid, gen in dec.step():
            results[ids[rid]] = gen.token_ids
        sizes.append(dec._slots())
        if not dec.busy and len(results) == len(prompts):
            break
    assert [results[i] for i in range(len(prompts))] == ref
    assert sizes[0] == 2 and max(sizes) == 4 and sizes[-1] == 0  # grown on demand, shrunk when idle
    with pytest.raises(ValueError, match="request 5: prompt is empty"):
        dec.submit(BatchRequest([], 3))


def test_partial_tokens_stream_and_cancel_frees_the_slot(tiny_lm, prompts):
    """`partial` shows each decoding request's tokens so far (a stream's source); a cancelled
    request is never reported and the others still get exactly their alone decodes."""
    ref = [g.token_ids for g in _alone(tiny_lm, prompts[:3], -1)]
    dec = BatchedSpeculativeDecoder(tiny_lm.model, -1, tiny_lm.max_context, SpeculativeConfig(method="greedy"),
                                    max_batch=2)
    a, b, c = (dec.submit(BatchRequest(p, NEW)) for p in prompts[:3])
    results, seen = {}, {a: [], b: []}
    for _ in range(3):
        for rid, gen in dec.step():
            results[rid] = gen.token_ids
        now = dec.partial()
        for rid in (a, b):
            assert now[rid][: len(seen[rid])] == seen[rid]  # a stream only ever grows
            seen[rid] = now[rid]
    assert seen[a] == ref[0][: len(seen[a])] and len(seen[a]) == 3
    assert dec.cancel(b) and not dec.cancel(b) and c not in dec.partial()
    while dec.busy:
        for rid, gen in dec.step():
            results[rid] = gen.token_ids
    assert results == {a: ref[0], c: ref[2]}


def test_a_replacing_decoder_inherits_the_calibration(tiny_lm, prompts):
    """A decoder for a new datastore version starts from its predecessor's acceptance
    estimates (one per slot) and step-cost factors, copies that its own learning leaves
    the predecessor's untouched; a decoder that has begun cannot be reseeded."""
    from dresd.decoding.batch_plan import BatchCostModel

    flat = BatchCostModel([1, 2], [1, 2], [[0.01, 0.01], [0.01, 0.01]])
    spec = SpeculativeConfig(method="dresd", budget="auto")
    make = lambda: BatchedSpeculativeDecoder(tiny_lm.model, -1, tiny_lm.max_context, spec,  # noqa: E731
                                             lambda: FakeDrafter(lambda r: [[5, 6]]), flat, max_batch=2)
    old = make()
    old.generate([BatchRequest(p, 4) for p in prompts[:2]])
    old.planner.step_scale = [1.3, 0.8]
    learnt = old.calibration()
    assert len(learnt[0]) == 2 and any(a.offered for a in learnt[0])
    new = make()
    new.inherit(learnt)
    assert new.planner.step_scale == [1.3, 0.8]
    new.generate([BatchRequest(prompts[0], 4)])
    assert new._planners[0].acceptance is learnt[0][0] and old._planners[0].acceptance is not learnt[0][0]
    with pytest.raises(RuntimeError, match="before the first request"):
        new.inherit(learnt)


@pytest.mark.parametrize("forward", ["lean", "transformers"])
def test_prompts_that_join_together_share_one_padded_prefill_where_it_pays(request, prompts, forward, monkeypatch):
    """On a device listed in PADDED_PREFILL_DEVICES (a GPU) the joining prompts are prefilled
    in one right-padded forward; every row still decodes what it decodes alone."""
    import dresd.decoding.batch_spec as batch_spec

    lm = request.getfixturevalue("tiny_lm" if forward == "lean" else "hf_lm")
    eos = _eos_for(lm, prompts)
    alone = [g.token_ids for g in _alone(lm, prompts, eos)]
    monkeypatch.setattr(batch_spec, "PADDED_PREFILL_DEVICES", ("cpu",))
    widths = []
    real = batch_spec.padded_prefill
    monkeypatch.setattr(batch_spec, "padded_prefill",
                        lambda model, seqs, pad: widths.append(len(seqs)) or real(model, seqs, pad))
    dec = BatchedSpeculativeDecoder(lm.model, eos, lm.max_context, SpeculativeConfig(method="greedy"), max_batch=3)
    out = dec.generate([BatchRequest(p, NEW) for p in prompts])
    assert [g.token_ids for g in out] == alone
    assert widths and widths[0] == 2  # the first three join at once; the 1-token prompt needs no prefill
