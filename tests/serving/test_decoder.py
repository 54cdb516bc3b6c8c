"""Tests for dresd.serving.decoder in-process, on a tiny random Llama: requests checked before
any work, errors answered instead of raised, and the datastore version followed between
requests, pinned, and kept when a new one cannot be opened (the Ray pool: test_pool.py)."""

from __future__ import annotations

import pytest

import dresd.serving.decoder as decoder_mod
from dresd.config import ModelConfig, SpeculativeConfig
from dresd.datastore.publish import set_current
from dresd.drafters.registry import available_methods
from dresd.serving.decoder import DecodeRequest, Decoder, check_request
from tests_support import one_torch_thread, publish_for_model

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

SPEC = SpeculativeConfig(len_drafts=4, top_k=8, num_drafts=4)  # the test stores keep 12-token values


@pytest.mark.parametrize("request_, problem", [
    ({"prompt": "hi"}, "expected a DecodeRequest, got dict"),
    (DecodeRequest(" \n"), "prompt is empty"),
    (DecodeRequest("hi", method="medusa"), f"unknown method 'medusa'; expected one of {available_methods()}"),
    (DecodeRequest("hi", verify="list"), "unknown verify 'list'; expected one of ['tree', 'batch']"),
    (DecodeRequest("hi", max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (DecodeRequest("hi", max_new_tokens=2.5), "max_new_tokens must be an integer >= 1, got 2.5"),
    (DecodeRequest("hi", temperature=-1.0, top_p=0.0),
     "temperature must be a finite number >= 0, got -1.0; top_p must be in (0, 1], got 0.0"),
    (DecodeRequest("hi", temperature=0.5, verify="batch"), "speculative sampling (temperature > 0) needs verify 'tree'"),
])
def test_check_request_names_what_is_wrong(request_, problem):
    assert check_request(request_) == problem


def test_check_request_accepts_what_can_be_served():
    assert check_request(DecodeRequest("hi")) is None
    # Plain sampling has no drafts to verify: any verifier will do.
    assert check_request(DecodeRequest("hi", method="greedy", verify="batch", temperature=0.5)) is None
    assert check_request(DecodeRequest("hi", verify="batch")) is None


@pytest.fixture
def served(tiny_lm, tmp_path, monkeypatch):
    """A Decoder over the session's tiny model and a datastore root holding version v1."""
    monkeypatch.setattr(decoder_mod, "load_model", lambda cfg: tiny_lm)  # loading is tested in tests/model
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))  # verification markers
    root = tmp_path / "store"
    publish_for_model(root, tiny_lm, "v1")
    return Decoder("d0", ModelConfig(), str(root), SPEC), root


def test_bad_requests_come_back_as_errors_and_the_decoder_keeps_serving(served):
    decoder, _ = served
    bad = decoder.generate(DecodeRequest("   ", request_id="r1"))
    assert (bad.ok, bad.error, bad.request_id, bad.token_ids) == (False, "prompt is empty", "r1", [])
    assert bad.datastore_version == "v1" and bad.actor == "d0"
    wrong_type = decoder.generate({"prompt": "hi"})
    assert not wrong_type.ok and wrong_type.request_id == "" and "expected a DecodeRequest" in wrong_type.error
    too_long = decoder.generate(DecodeRequest("x" * 3000))
    assert not too_long.ok and too_long.error.endswith("the model's context is 2048")
    good = decoder.generate(DecodeRequest("question 1?", 12, "dresd"))
    assert good.ok and good.error is None and 1 <= len(good.token_ids) <= 12
    assert good.metrics["new_tokens"] == len(good.token_ids) and good.text
    # Drafting changes no token: the greedy method answers the same.
    assert decoder.generate(DecodeRequest("question 1?", 12, "greedy")).token_ids == good.token_ids
    info = decoder.info()
    assert info["requests_served"] == 5 and info["busy"] is None and info["version"] == "v1"


def test_versions_switch_between_requests_and_a_pin_holds(served, tiny_lm):
    decoder, root = served
    ask = lambda: decoder.generate(DecodeRequest("question 2?", 8, "greedy"))  # noqa: E731
    first = ask()
    publish_for_model(root, tiny_lm, "v2", seed=1)
    assert decoder.version == "v1"  # nothing switches outside a request
    second = ask()
    assert second.datastore_version == "v2" and second.token_ids == first.token_ids
    assert decoder.pin("v1") == "v1" and ask().datastore_version == "v1"  # CURRENT still names v2
    assert decoder.pin(None) == "v2" and ask().datastore_version == "v2"
    # A pool sends its pin state with each request; one it cannot pin is answered, not raised.
    assert decoder.serve(DecodeRequest("hi", 4), "v1").datastore_version == "v1"
    assert decoder.info()["pinned"] == "v1"
    refused = decoder.serve(DecodeRequest("hi", 4, request_id="r9"), "v7")
    assert not refused.ok and refused.request_id == "r9" and refused.error.startswith("cannot pin 'v7'")
    assert decoder.serve(DecodeRequest("hi", 4), None).datastore_version == "v2"
    # A rollback (CURRENT moved back) is followed at the next request, or at once on refresh.
    set_current(root, "v1")
    assert decoder.refresh() == "v1"


def test_a_version_that_cannot_be_opened_is_refused_and_the_old_one_kept(served, tiny_lm):
    decoder, root = served
    publish_for_model(root, tiny_lm, "v2", fingerprint="another model")
    resp = decoder.generate(DecodeRequest("question 3?", 8, "dresd"))
    assert resp.ok and resp.datastore_version == "v1"
    assert decoder.refresh() == "v1"  # refused once, not tried at every request
    publish_for_model(root, tiny_lm, "v3", seed=2)
    assert decoder.generate(DecodeRequest("question 3?", 8, "dresd")).datastore_version == "v3"
    # Without a root: methods that need a datastore are refused, and there is no version to pin.
    bare = Decoder("bare", ModelConfig(), None, SPEC)
    assert bare.version is None and bare.generate(DecodeRequest("hi", 4, "greedy")).ok
    assert "needs a datastore" in bare.generate(DecodeRequest("hi", 4, "dresd")).error
    assert "no datastore root" in bare.serve(DecodeRequest("hi", 4, "greedy"), "v1").error


def test_a_version_that_fails_full_verification_is_refused_and_the_old_one_kept(served, tiny_lm, caplog):
    decoder, root = served
    publish_for_model(root, tiny_lm, "v2", seed=1)
    tokens = root / "versions" / "v2" / "tokens.npy"
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum sees it
    tokens.write_bytes(bytes(data))
    with caplog.at_level("ERROR", logger=decoder_mod.__name__):
        resp = decoder.generate(DecodeRequest("question 4?", 8, "dresd"))
    assert resp.ok and resp.datastore_version == "v1"
    why = decoder.info()["refused"]["v2"]
    assert "full verification failed, so this version is not used: tokens.npy checksum mismatch" in why
    assert "cannot open datastore version v2, staying on v1" in caplog.text
    pinned = decoder.serve(DecodeRequest("hi", 4), "v2")
    assert not pinned.ok and "tokens.npy checksum mismatch" in pinned.error and decoder.version == "v1"


def test_a_decoder_loads_its_model_in_the_configured_dtype(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """model.dtype reaches the serving decoder; a store of float32 keys still serves, with a warning."""
    import logging

    from dresd.model.loading import load_model

    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    publish_for_model(tmp_path / "store", load_model(ModelConfig(path=str(tiny_model_dir), device="cpu")), "v1")
    with caplog.at_level(logging.WARNING, logger="dresd.datastore.store"):
        decoder = Decoder("bf", ModelConfig(path=str(tiny_model_dir), device="cpu", dtype="bfloat16"),
                          str(tmp_path / "store"), SPEC)
    assert decoder.lm.dtype == "bfloat16"
    assert any("keys made in float32 but the model decodes in bfloat16" in r.getMessage() for r in caplog.records)
    out = decoder.generate(DecodeRequest("question 1?", 8, "dresd"))
    assert out.ok and 1 <= len(out.token_ids) <= 8 and out.datastore_version == "v1"
