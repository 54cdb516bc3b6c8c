"""An engine: one loaded model, optionally one open datastore, and decoders over them.

The engine formats prompts with the datastore's recorded prompt format (the same function
that formatted the corpus at build time) and refuses a datastore built for another model.
"""

from __future__ import annotations

from dataclasses import astuple
from typing import TYPE_CHECKING

from dresd.config import ModelConfig, SpeculativeConfig
from dresd.datastore.store import Datastore
from dresd.decoding.loop import Generation, SpeculativeDecoder
from dresd.decoding.budget import CostModel
from dresd.decoding.batch_plan import BatchCostModel
from dresd.decoding.calibration import cached_batch_cost_model, cached_cost_model
from dresd.drafters.registry import drafter_factory, make_drafter
from dresd.datastore.formatting import format_fingerprint, format_prompt_ids
from dresd.model.loading import LoadedModel, load_model

if TYPE_CHECKING:
    from dresd.config import SamplingParams


class Engine:
    """Model + datastore + prompt format, ready to generate with any method."""

    def __init__(self, lm: LoadedModel, datastore: Datastore | None = None, prompt_format: str = "chat",
                 cost: CostModel | None = None):
        self.lm = lm
        self.datastore = datastore
        if datastore is not None:
            prompt_format = datastore.manifest["prompt_format"]["name"]
            datastore.check_compatible(lm.identity, format_fingerprint(lm.tokenizer, prompt_format), lm.dtype)
        self.prompt_format = prompt_format
        self._decoders: dict[tuple, SpeculativeDecoder] = {}
        self._cost = cost  # None = read from the on-disk cache (or measured) when first needed

    @classmethod
    def open(cls, model: ModelConfig, datastore: str | None = None, prompt_format: str = "chat") -> "Engine":
        """Load the model and open the datastore (its CURRENT version when given a root)."""
        return cls(load_model(model), Datastore(datastore) if datastore else None, prompt_format)

    def cost_model(self) -> CostModel:
        """The measured forward cost per verified positions on this machine (cached on disk)."""
        if self._cost is None:
            self._cost = cached_cost_model(self.lm.model)
        return self._cost

    def batch_cost_model(self) -> BatchCostModel:
        """The measured forward cost per batch size and positions per row (cached on disk); its
        batch-1 curve is cost_model()'s."""
        return cached_batch_cost_model(self.lm.model)

    def decoder(self, spec: SpeculativeConfig) -> SpeculativeDecoder:
        """A decoder for `spec` (cached: drafters hold indexes and the planner its calibration)."""
        key = astuple(spec)
        if key not in self._decoders:
            drafter = make_drafter(spec, self.datastore, self.lm.tokenizer, self.lm.eos_token_id)
            needs_cost = drafter is not None and spec.budget == "auto" and spec.verify == "tree"
            self._decoders[key] = SpeculativeDecoder(
                self.lm.model, self.lm.eos_token_id, self.lm.max_context, spec, drafter,
                self.cost_model() if needs_cost else None,
            )
        return self._decoders[key]

    def batched_decoder(self, spec: SpeculativeConfig, max_batch: int):
        """A new dresd.decoding.batch_spec.BatchedSpeculativeDecoder for `spec` over this
        engine's model and datastore (one drafter per slot; the measured cost when budgeted).
        Not cached: a batch holds its requests' state, and its owner keeps it."""
        from dresd.decoding.batch_spec import BatchedSpeculativeDecoder

        lm, store = self.lm, self.datastore
        factory = None
        if spec.method != "greedy":
            # The first slot's drafter is made now, so a method that cannot draft fails here;
            # the other slots' share what it built (drafter_factory).
            factory = drafter_factory(spec, store, lm.tokenizer, lm.eos_token_id)
        cost = self.batch_cost_model() if factory is not None and spec.budget == "auto" else None
        return BatchedSpeculativeDecoder(lm.model, lm.eos_token_id, lm.max_context, spec, factory, cost, max_batch)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt laid out in this engine's prompt format."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty")
        return format_prompt_ids(self.lm.tokenizer, prompt, self.prompt_format)

    def generate(self, prompt: str, spec: SpeculativeConfig, max_new_tokens: int,
                 sampling: SamplingParams | None = None) -> Generation:
        """Generate a reply to `prompt`; the result carries token ids, text and metrics."""
        gen = self.decoder(spec).generate_ids(self.prompt_ids(prompt), max_new_tokens, sampling)
        gen.text = self.lm.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        return gen
