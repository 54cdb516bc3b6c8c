"""DReSD inside Hugging Face `generate()`: a decoding loop for `custom_generate`.

    from dresd.decoding.hf_generate import DresdGenerate

    dresd = DresdGenerate()  # holds open datastores, drafters and the planner's calibration
    out = model.generate(**inputs, custom_generate=dresd, datastore="stores/sgpt", max_new_tokens=128)

transformers prepares the inputs, the generation config and the stopping criteria, then
hands the loop to this callable (the callable form of `custom_generate`). The loop is
dresd.decoding.loop.SpeculativeDecoder with the method's drafter: greedy, so the output is
token-identical to greedy `generate()`. `max_new_tokens` / `max_length`, `eos_token_id`
(one or several), stop strings and any other stopping criteria are checked after every
committed token, and a streamer receives each step's tokens as they are committed. A batch
is decoded one row at a time (left padding removed through the attention mask) and returned
padded with `pad_token_id` as `generate()` pads finished rows. Sampling, beams, logits
processors (repetition penalty, ...) and scores are refused with a message saying which.
"""

from __future__ import annotations

import os
import sys
from dataclasses import astuple, replace
from pathlib import Path
from typing import Any

import torch

from dresd.config import SpeculativeConfig
from dresd.datastore.store import Datastore
from dresd.decoding.budget import CostModel
from dresd.decoding.calibration import cached_cost_model
from dresd.decoding.loop import SpeculativeDecoder
from dresd.drafters.registry import make_drafter
from dresd.model.loading import model_identity

NO_EOS = -1  # an id no model emits: the loop's own EOS stop when the config names none
_GENERATE_FILE = os.path.join("transformers", "generation", "utils.py")


def _streamer_of_generate() -> Any:
    """The streamer handed to the `generate()` that called us.

    transformers calls a `custom_generate` callable without the streamer (it puts the prompt
    into it itself, then passes the callable only the keywords `_sample` does not have), so it
    is read from `generate()`'s frame, a few frames up."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_code.co_name == "generate" and frame.f_code.co_filename.endswith(_GENERATE_FILE):
            return frame.f_locals.get("streamer")
        frame = frame.f_back
    return None


def _refuse_unsupported(generation_config, logits_processor, input_ids: torch.Tensor, streamer) -> None:
    """What the greedy speculative loop cannot honour, refused before any work."""
    where = "generate(custom_generate=DresdGenerate)"
    gc = generation_config
    if gc.do_sample:
        raise ValueError(f"{where} decodes greedily: do_sample=True is not supported (pass do_sample=False; "
                         "`dresd generate --temperature` samples speculatively)")
    if (gc.num_beams or 1) > 1 or (gc.num_return_sequences or 1) > 1:
        raise ValueError(f"{where}: num_beams={gc.num_beams} and num_return_sequences={gc.num_return_sequences} "
                         "are not supported (both must be 1)")
    if logits_processor:
        names = ", ".join(type(p).__name__ for p in logits_processor)
        raise ValueError(f"{where}: logits processors change the greedy tokens and are not supported: {names} "
                         "(from the generation config or the call, e.g. repetition_penalty)")
    if gc.return_dict_in_generate and (gc.output_scores or gc.output_logits or gc.output_attentions
                                       or gc.output_hidden_states):
        raise ValueError(f"{where}: output_scores, output_logits, output_attentions and output_hidden_states "
                         "are not available (only sequences are returned)")
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError(f"{where}: a streamer needs batch size 1, got a batch of {input_ids.shape[0]} "
                         "(as transformers' TextStreamer does)")


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's prompt tokens without its left padding; right padding is refused."""
    if attention_mask is None:
        return input_ids.tolist()
    rows = []
    for i, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        start = next((j for j, m in enumerate(mask) if m), len(mask))
        if not all(mask[start:]) or start == len(mask):
            raise ValueError(f"generate(custom_generate=DresdGenerate): row {i} of the batch is not left-padded "
                             "(its attention mask has a 0 after a 1, or is all 0): tokenize with padding_side='left'")
        rows.append(ids[start:])
    return rows


class DresdGenerate:
    """A `custom_generate` callable running speculative decoding with a dresd drafter.

    One instance keeps its open datastores and its decoders (drafters, and the draft
    planner's calibration, which learns across requests) for every later call."""

    def __init__(self, spec: SpeculativeConfig | None = None, tokenizer=None, cost: CostModel | None = None):
        self.spec = spec or SpeculativeConfig()  # the project's default method unless the spec names one
        self.tokenizer = tokenizer  # only drafters that read the prompt format need it (suffix, rest-dr)
        self.cost = cost  # None = measured on this machine once and cached on disk, when the budget needs it
        self._stores: dict[str, Datastore] = {}
        self._decoders: dict[tuple, SpeculativeDecoder] = {}

    def _store(self, model, datastore: str | Path | Datastore | None) -> Datastore | None:
        if datastore is None or isinstance(datastore, Datastore):
            store = datastore
        else:
            key = str(Path(datastore).expanduser().resolve()) if "://" not in str(datastore) else str(datastore)
            if key not in self._stores:
                self._stores[key] = Datastore(str(datastore))
            store = self._stores[key]
        if store is not None:
            # The identity that counts is the weights' (name aside: a folder may be named otherwise).
            store.check_compatible(model_identity(model, store.manifest["model"]["name"]))
        return store

    def _tokenizer(self, model):
        if self.tokenizer is None:
            try:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)
            except (OSError, ValueError, TypeError):
                return None
        return self.tokenizer

    def decoder(self, model, eos_id: int, spec: SpeculativeConfig, store: Datastore | None) -> SpeculativeDecoder:
        """The decoder for this model, EOS, method and datastore version (built once)."""
        key = (id(model), eos_id, astuple(spec), None if store is None else (str(store.path), store.version))
        if key not in self._decoders:
            drafter = make_drafter(spec, store, self._tokenizer(model), eos_id)
            cost = None
            if drafter is not None and spec.budget == "auto" and spec.verify == "tree":
                cost = self.cost if self.cost is not None else cached_cost_model(model)
            max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
            self._decoders[key] = SpeculativeDecoder(model, eos_id, max_context, spec, drafter, cost)
        return self._decoders[key]

    def __call__(self, model, input_ids: torch.LongTensor, logits_processor=None, stopping_criteria=None,
                 generation_config=None, synced_gpus: bool = False, streamer=None,
                 datastore: str | Path | Datastore | None = None, method: str | None = None, **model_kwargs):
        """Called by `generate()`; `datastore` and `method` are keywords of that call."""
        streamer = streamer if streamer is not None else _streamer_of_generate()
        _refuse_unsupported(generation_config, logits_processor, input_ids, streamer)
        cache = model_kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("generate(custom_generate=DresdGenerate): a filled cache (past_key_values) is not "
                             "supported; the loop keeps its own")
        spec = self.spec if method is None else replace(self.spec, method=method)
        eos_ids = generation_config._eos_token_tensor
        eos_ids = [] if eos_ids is None else eos_ids.reshape(-1).tolist()
        pad = generation_config._pad_token_tensor
        pad = int(pad.reshape(-1)[0]) if pad is not None else (eos_ids[0] if eos_ids else 0)
        decoder = self.decoder(model, eos_ids[0] if eos_ids else NO_EOS, spec, self._store(model, datastore))
        budget = generation_config.max_length - input_ids.shape[1]
        outs = []
        for i, prompt in enumerate(_rows(input_ids, model_kwargs.get("attention_mask"))):
            outs.append(self._one(decoder, input_ids[i], prompt, budget, stopping_criteria, streamer))
        if streamer is not None:
            streamer.end()
        width = max(len(o) for o in outs)
        new = torch.full((len(outs), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for i, o in enumerate(outs):
            new[i, : len(o)] = torch.tensor(o, dtype=input_ids.dtype)
        sequences = torch.cat([input_ids, new], dim=1)
        if generation_config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences

    @staticmethod
    def _one(decoder: SpeculativeDecoder, row: torch.Tensor, prompt: list[int], budget: int,
             stopping_criteria, streamer) -> list[int]:
        """One row: speculative decoding, every committed token checked against the stopping
        criteria as `generate()` checks them (on the row as it stands, padding included)."""
        kept: list[int] = []
        seq = row.unsqueeze(0)

        def on_tokens(tokens: list[int]) -> bool:
            nonlocal seq
            step, stop = [], False
            for t in tokens:
                step.append(t)
                seq = torch.cat([seq, seq.new_tensor([[t]])], dim=1)
                if stopping_criteria is not None and bool(stopping_criteria(seq, None).all()):
                    stop = True
                    break
            kept.extend(step)
            if streamer is not None:
                streamer.put(torch.tensor([step]))
            return stop

        if budget > 0:
            decoder.generate_ids(prompt, budget, on_tokens=on_tokens)
        return kept
