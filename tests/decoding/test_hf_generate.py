"""Tests for dresd.decoding.hf_generate: `model.generate(custom_generate=DresdGenerate(), ...)`
gives greedy generate()'s tokens with every method, honours max_new_tokens, one or several
EOS ids and a streamer, decodes a left-padded batch row by row, and refuses what it cannot
honour (tiny random Llama; one test on the packaged SmolLM2 as a user loads it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from dresd.config import SpeculativeConfig
from dresd.datastore.store import Datastore, DatastoreError
from dresd.decoding.budget import CostModel
from dresd.decoding.hf_generate import DresdGenerate
from dresd.drafters import Candidates, DraftRequest
from dresd.drafters import registry
from dresd.drafters.registry import register_method
from tests_support import one_torch_thread, publish_for_model

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

N = 24
FLAT_COST = CostModel([1, 64], [0.01, 0.012])  # a cheap wide forward: the planner verifies drafts


class Recorder(BaseStreamer):
    """A streamer that keeps what it is given: the prompt's put, then the new tokens."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1


class Oracle:
    """A drafter that knows greedy's continuation and drafts its next 5 tokens: every step
    commits several tokens, so stops and streaming inside a step are exercised."""

    name = "oracle"

    def __init__(self, seq: list[int]):
        self.seq = seq

    def begin(self, prompt_ids):
        pass

    def propose(self, request: DraftRequest) -> Candidates:
        n, out = len(request.context), Candidates()
        if request.context == self.seq[:n]:
            out.add(self.seq[n: n + min(5, request.max_len)], 1.0, self.name)
        return out

    def end(self, generated):
        pass


@pytest.fixture(scope="module")
def case(tiny_lm, tmp_path_factory):
    """A prompt, a datastore the tiny model accepts, greedy generate()'s N tokens, an EOS id
    greedy never emits, and the method "oracle" (registered while the module runs)."""
    prompt = np.random.default_rng(3).integers(3, 259, 9).tolist()
    root = tmp_path_factory.mktemp("hfgen") / "store"
    publish_for_model(root, tiny_lm)
    never = next(t for t in range(3, 259) if t not in prompt)
    ref = greedy(tiny_lm.model, prompt, N, never)
    never = next(t for t in range(3, 259) if t not in prompt + ref)
    register_method("oracle", lambda spec, store, tokenizer, eos_id: Oracle(prompt + ref), replace=True)
    yield {"prompt": prompt, "ref": ref, "no_eos": never, "store": str(root)}
    registry._METHODS.pop("oracle", None)


ORACLE = SpeculativeConfig(method="oracle", budget="off")


def greedy(model, prompt, n, eos, **kw) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def ours(model, prompt, n, eos, dresd: DresdGenerate, **kw) -> torch.Tensor:
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=0, custom_generate=dresd, **kw)


@pytest.mark.parametrize("method", ["auto", "dresd", "hybrid", "pld", "greedy", "oracle"])
def test_same_tokens_as_greedy_generate(tiny_lm, case, method):
    dresd = DresdGenerate(SpeculativeConfig(method=method), cost=FLAT_COST)
    for _ in range(2):  # the second call reuses the decoder and its learned calibration
        out = ours(tiny_lm.model, case["prompt"], N, case["no_eos"], dresd, datastore=case["store"])
        assert out[0, : len(case["prompt"])].tolist() == case["prompt"]
        assert out[0, len(case["prompt"]):].tolist() == case["ref"]
    assert len(dresd._decoders) == 1 and len(dresd._stores) == 1  # opened once, checked against the model
    decoder = next(iter(dresd._decoders.values()))
    if method != "greedy":
        assert decoder.drafter is not None and decoder.planner.cost is FLAT_COST


def test_drafts_are_verified_in_multi_token_steps(tiny_lm, case):
    """Drafts are verified and accepted several at a time behind the callable (it is the
    speculative loop, not plain decoding)."""
    steps = []
    dresd = DresdGenerate(ORACLE)
    decoder = dresd.decoder(tiny_lm.model, case["no_eos"], dresd.spec, None)
    inner = decoder.generate_ids

    def spy(prompt, n, sampling=None, on_tokens=None):
        return inner(prompt, n, sampling, lambda toks: steps.append(len(toks)) or on_tokens(toks))

    decoder.generate_ids = spy
    out = ours(tiny_lm.model, case["prompt"], N, case["no_eos"], dresd)
    assert out[0, len(case["prompt"]):].tolist() == case["ref"]
    assert sum(steps) == N and steps[:4] == [6, 6, 6, 6]


@pytest.mark.parametrize("n", [1, 2, 7, N])
def test_max_new_tokens_is_honoured(tiny_lm, case, n):
    dresd = DresdGenerate(ORACLE)  # 7: the limit falls inside a step of 6
    out = ours(tiny_lm.model, case["prompt"], n, case["no_eos"], dresd)
    assert out[0, len(case["prompt"]):].tolist() == case["ref"][:n]
    # max_length counts the prompt, as generate() counts it
    out = tiny_lm.model.generate(torch.tensor([case["prompt"]]), max_length=len(case["prompt"]) + n, do_sample=False,
                                 eos_token_id=case["no_eos"], pad_token_id=0, custom_generate=dresd)
    assert out.shape[1] == len(case["prompt"]) + n


def first_new(ref: list[int], start: int) -> int:
    """The first index >= start whose token is new in ref and lies inside an oracle step of 6
    (not its last token), so a stop on it cuts the step."""
    return next(i for i in range(start, len(ref)) if ref[i] not in ref[:i] and i % 6 != 5)


@pytest.mark.parametrize("method", ["oracle", "dresd"])
def test_eos_is_honoured_one_or_several_ids(tiny_lm, case, method):
    ref, prompt = case["ref"], case["prompt"]
    k = first_new(ref, 5)
    eos = ref[k]
    want = greedy(tiny_lm.model, prompt, N, eos)
    assert want == ref[: k + 1]
    dresd = DresdGenerate(SpeculativeConfig(method=method, budget="off"))
    got = ours(tiny_lm.model, prompt, N, eos, dresd, datastore=case["store"])[0, len(prompt):].tolist()
    assert got == want
    # Several ids: the loop stops on the first, the stopping criteria on any (here the second).
    got = ours(tiny_lm.model, prompt, N, [case["no_eos"], eos], dresd, datastore=case["store"])
    assert got[0, len(prompt):].tolist() == want == greedy(tiny_lm.model, prompt, N, [case["no_eos"], eos])


def test_a_streamer_receives_the_tokens(tiny_lm, case):
    prompt, dresd = case["prompt"], DresdGenerate(ORACLE)
    theirs, mine = Recorder(), Recorder()
    greedy(tiny_lm.model, prompt, N, case["no_eos"], streamer=theirs)
    ours(tiny_lm.model, prompt, N, case["no_eos"], dresd, streamer=mine)
    assert mine.puts[0] == theirs.puts[0] == prompt  # generate() itself puts the prompt
    assert sum(mine.puts[1:], []) == sum(theirs.puts[1:], []) == case["ref"]
    assert [len(p) for p in mine.puts[1:5]] == [6, 6, 6, 6]  # a step's tokens in one put
    assert mine.ended == theirs.ended == 1
    # Cut at EOS: the streamer gets no token past it.
    k = first_new(case["ref"], 5)
    cut = Recorder()
    ours(tiny_lm.model, prompt, N, [case["no_eos"], case["ref"][k]], dresd, streamer=cut)
    assert sum(cut.puts[1:], []) == case["ref"][: k + 1] and cut.ended == 1


def test_a_left_padded_batch_is_decoded_row_by_row(tiny_lm, case):
    model, eos = tiny_lm.model, case["ref"][first_new(case["ref"], 5)]
    short = case["prompt"][:7]
    pad = 0
    ids = torch.tensor([case["prompt"], [pad] * (len(case["prompt"]) - len(short)) + short])
    mask = (torch.arange(ids.shape[1]) >= ids.shape[1] - torch.tensor([[len(case["prompt"])], [len(short)]])).long()
    dresd = DresdGenerate(SpeculativeConfig(method="dresd"), cost=FLAT_COST)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, eos_token_id=eos,
                         pad_token_id=pad, custom_generate=dresd, datastore=case["store"])
    rows = [greedy(model, case["prompt"], N, eos), greedy(model, short, N, eos)]
    assert out.shape == (2, ids.shape[1] + max(map(len, rows)))
    for i, row in enumerate(rows):
        new = out[i, ids.shape[1]:].tolist()
        assert new[: len(row)] == row and set(new[len(row):]) <= {pad}  # finished rows padded as generate() pads
    # generate()'s own batched greedy run agrees (same padding, same stopping)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, eos_token_id=eos,
                            pad_token_id=pad)
    assert out.tolist() == theirs.tolist()


@pytest.mark.parametrize("kw, match", [
    (dict(do_sample=True), "do_sample=True is not supported"),
    (dict(num_beams=2), "num_beams=2"),
    (dict(repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor"),
    (dict(return_dict_in_generate=True, output_scores=True), "output_scores"),
])
def test_what_greedy_speculation_cannot_honour_is_refused(tiny_lm, case, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_lm.model.generate(torch.tensor([case["prompt"]]), max_new_tokens=4, eos_token_id=case["no_eos"],
                               pad_token_id=0, custom_generate=DresdGenerate(SpeculativeConfig(method="pld")),
                               **{"do_sample": False, **kw})


def test_batch_refusals_name_the_problem(tiny_lm, case):
    ids = torch.tensor([case["prompt"], case["prompt"]])
    dresd = DresdGenerate(SpeculativeConfig(method="pld"))
    with pytest.raises(ValueError, match="streamer needs batch size 1"):
        tiny_lm.model.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=dresd, streamer=Recorder())
    right = torch.ones_like(ids)
    right[1, -2:] = 0
    with pytest.raises(ValueError, match="row 1 .* not left-padded"):
        tiny_lm.model.generate(ids, attention_mask=right, max_new_tokens=4, do_sample=False, custom_generate=dresd)


def test_return_dict_and_method_keyword(tiny_lm, case):
    dresd = DresdGenerate(SpeculativeConfig(method="greedy"))
    out = ours(tiny_lm.model, case["prompt"], 6, case["no_eos"], dresd, return_dict_in_generate=True, method="pld")
    assert out.sequences[0, len(case["prompt"]):].tolist() == case["ref"][:6]
    assert next(iter(dresd._decoders.values())).spec.method == "pld"


def test_a_store_for_another_model_or_none_is_refused(tiny_lm, case, tmp_path):
    publish_for_model(tmp_path / "other", tiny_lm, fingerprint="f" * 64)
    dresd = DresdGenerate(SpeculativeConfig(method="dresd"), cost=FLAT_COST)
    with pytest.raises(DatastoreError, match="rebuild the datastore for this model"):
        ours(tiny_lm.model, case["prompt"], 4, case["no_eos"], dresd, datastore=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="needs a datastore"):
        ours(tiny_lm.model, case["prompt"], 4, case["no_eos"], dresd)
    # An open Datastore is taken as it is.
    out = ours(tiny_lm.model, case["prompt"], 4, case["no_eos"], dresd, datastore=Datastore(case["store"]))
    assert out[0, len(case["prompt"]):].tolist() == case["ref"][:4]


@pytest.mark.real_model
def test_packaged_model_as_a_user_loads_it(packaged_lm, tmp_path):
    """SmolLM2 from its folder with plain transformers, a chat prompt, a dresd store for it:
    the same tokens as greedy generate(), EOS and max_new_tokens honoured, a streamer fed,
    a batch of two decoded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = packaged_lm.model.name_or_path
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    publish_for_model(tmp_path / "store", packaged_lm)
    dresd = DresdGenerate(SpeculativeConfig(method="dresd"), cost=FLAT_COST)
    texts = ["Write a haiku about the sea.", "Name three primary colours, one per line, then repeat them."]
    chats = [[{"role": "user", "content": t}] for t in texts]
    for chat, n in zip(chats, (32, 24)):
        inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        want = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        rec = Recorder()
        got = model.generate(**inputs, max_new_tokens=n, do_sample=False, custom_generate=dresd,
                             datastore=str(tmp_path / "store"), streamer=rec)
        assert got.tolist() == want.tolist()
        new = got[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(new) == n or new[-1] == model.generation_config.eos_token_id
        assert sum(rec.puts[1:], []) == new and rec.ended == 1
    new = want[0, inputs["input_ids"].shape[1]:].tolist()
    stop = new[next(i for i in range(3, len(new)) if new[i] not in new[:i])]  # an EOS greedy meets mid-way
    eos = [model.generation_config.eos_token_id, stop]
    got = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=eos, custom_generate=dresd,
                         datastore=str(tmp_path / "store"))
    assert got.tolist() == model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=eos).tolist()
    assert got[0, -1] == stop and got.shape[1] < want.shape[1]
    short = model.generate(**inputs, max_new_tokens=3, do_sample=False, custom_generate=dresd,
                           datastore=str(tmp_path / "store"))
    assert short.tolist() == want[:, : inputs["input_ids"].shape[1] + 3].tolist()
    tok.padding_side = "left"
    batch = tok.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                    padding=True)
    got = model.generate(**batch, max_new_tokens=16, do_sample=False, custom_generate=dresd,
                         datastore=str(tmp_path / "store"))
    for i, chat in enumerate(chats):
        one = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        row = model.generate(**one, max_new_tokens=16, do_sample=False)[0, one["input_ids"].shape[1]:].tolist()
        new = got[i, batch["input_ids"].shape[1]:].tolist()
        assert new[: len(row)] == row
