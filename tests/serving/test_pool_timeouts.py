"""Nothing in the decoder pool waits forever (issue 25): starting, generating and control
calls each end in a clear error after their timeout. The actors are stand-ins that hang on
cue (no model loads), run by the real pool on a real local Ray."""

from __future__ import annotations

import time

import pytest
import ray

import dresd.serving.pool as pool_mod
from dresd.config import ModelConfig
from dresd.serving.decoder import DecodeRequest, DecodeResponse
from dresd.serving.pool import DecoderPool


def hanging_decoder_class():
    """A Decoder stand-in (made in a function so Ray ships the class itself to its workers):
    its root names what hangs; a request whose prompt is "hang" never finishes."""

    class HangingDecoder:
        def __init__(self, name, model, root, speculative):
            self.name, self.root = name, root

        def info(self) -> dict:
            if self.root == "hang-start":
                time.sleep(300)
            return {"actor": self.name, "version": None}

        def serve(self, request, pin):
            if request.prompt == "hang":
                time.sleep(300)
            return DecodeResponse(request.request_id, True, text="ok", actor=self.name)

        def pin(self, version):
            if version == "hang":
                time.sleep(300)
            return version

        def refresh(self):
            return None

    return HangingDecoder


@pytest.fixture
def fake_actors(ray_session, monkeypatch):
    cls = ray.remote(max_concurrency=4)(hanging_decoder_class())
    monkeypatch.setattr(pool_mod, "decoder_actor", lambda: cls)


def test_a_pool_whose_actors_never_start_fails_within_its_start_timeout(fake_actors):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"dresd-decoder-\w+-0 did not start \(load the model and datastore\) within 1 s"):
        DecoderPool(ModelConfig(), "hang-start", size=1, num_cpus=0.25, start_timeout_s=1)
    assert time.monotonic() - t0 < 30


def test_generate_answers_a_hung_request_with_a_timeout_and_control_calls_fail_clearly(fake_actors, tmp_path):
    # A root of its own: pinning records the pin under it (dresd.storage.pins).
    with DecoderPool(ModelConfig(), str(tmp_path / "root"), size=1, num_cpus=0.25, timeout_s=1) as pool:
        t0 = time.monotonic()
        fast, hung = pool.generate([DecodeRequest("fine"), DecodeRequest("hang")])
        assert fast.ok and fast.text == "ok"
        assert not hung.ok and f"timed out: no request finished within 1 s (this one was on {pool.names[0]})" in hung.error
        with pytest.raises(TimeoutError, match=rf"{pool.names[0]} did not pin hang within 1 s"):
            pool.pin("hang")
        assert time.monotonic() - t0 < 30
        assert pool.refresh() == {pool.names[0]: None}  # the pool still answers what does finish
