"""Prompt layout: the ONE function used at build time (records) and decode time (prompts).

A datastore built with one layout and queried with another retrieves from the wrong
contexts, so the build records `format_fingerprint` and decode time compares it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from dresd.datastore.corpus import RecordError

PROMPT_FORMATS = ("chat", "qa")
FINGERPRINT_PROBE = "<<PROMPT>>"
# Two very different prompts: their common formatted prefix is the template's fixed part.
# A probe starting with whitespace: it can merge with the template's last fixed token.
_PREFIX_PROBES = ("a", "Zebra 123?", "\n\nhi")


def _as_id_list(out: Any) -> list[int]:
    """Normalise tokenizer output (list, BatchEncoding/dict, tensor, batch of one) to list[int]."""
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and (isinstance(out[0], (list, tuple)) or hasattr(out[0], "tolist")):
        if len(out) != 1:
            raise ValueError(f"expected one token sequence, got a batch of {len(out)}")
        out = list(out[0].tolist() if hasattr(out[0], "tolist") else out[0])
    return [int(t) for t in out]


def _text_ids(tokenizer, text: str) -> list[int]:
    return _as_id_list(tokenizer(text, add_special_tokens=False))


def format_prompt_ids(tokenizer, prompt: str, prompt_format: str) -> list[int]:
    """Token ids of `prompt` laid out as `prompt_format`, ending where the response starts.

    "chat": the tokenizer's chat template with one user message and the generation prompt;
    "qa":   "Question: {prompt}\\nAnswer:\\n" (the reference layout), no special tokens.
    """
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template; "
                             "this tokenizer has none (use prompt_format 'qa')")
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        return _as_id_list(out)
    if prompt_format == "qa":
        return _text_ids(tokenizer, f"Question: {prompt}\nAnswer:\n")
    raise ValueError(f"unknown prompt_format {prompt_format!r}; expected one of {PROMPT_FORMATS}")


def record_ids(tokenizer, example, prompt_format: str, max_tokens: int | None,
               eos_id: int) -> list[int]:
    """Token ids of one corpus example, ending with `eos_id`, at most `max_tokens` long.

    prompt/response: format_prompt_ids(prompt) + response ids + [eos]; when too long the
    response is cut (the prompt and the final eos are kept). A prompt that leaves no room
    for a single response token raises RecordError(reason="too_long").
    text: text ids + [eos], the text cut to fit.
    """
    # Examples carry no file/row of their own: name the record by its source id
    # (by default "<file basename>:<row>").
    file, row = str(getattr(example, "source_id", "?")), None
    if example.prompt is None:
        body = _text_ids(tokenizer, example.text)
        if max_tokens is not None:
            if max_tokens < 2:
                raise RecordError("too_long", f"max_tokens={max_tokens} leaves no room for text",
                                  file, row, "text")
            body = body[: max_tokens - 1]
        return body + [int(eos_id)]
    prompt_ids = format_prompt_ids(tokenizer, example.prompt, prompt_format)
    response_ids = _text_ids(tokenizer, example.response)
    if max_tokens is not None and len(prompt_ids) + len(response_ids) + 1 > max_tokens:
        if len(prompt_ids) >= max_tokens - 1:
            raise RecordError("too_long", f"formatted prompt is {len(prompt_ids)} tokens, "
                              f"max_tokens={max_tokens} leaves no room for the response",
                              file, row, "prompt")
        response_ids = response_ids[: max_tokens - 1 - len(prompt_ids)]
    return prompt_ids + response_ids + [int(eos_id)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_len(tokenizer, prompt_format: str) -> int:
    """Leading token ids identical in every formatted prompt (the template's fixed head).

    Computed as the common prefix of `format_prompt_ids` for very different prompts. A prompt
    that starts with whitespace may merge with the template's last fixed token and share one
    token fewer.
    """
    ids = [format_prompt_ids(tokenizer, p, prompt_format) for p in _PREFIX_PROBES]
    return min(_common_prefix(ids[0], other) for other in ids[1:])


def response_header(tokenizer, prompt_format: str) -> list[int]:
    """Trailing token ids identical in every formatted prompt: where a response starts.

    For the chat template this is the end of the user turn and the assistant header; a
    record of the corpus splits into (prompt, response) right after its first occurrence.
    """
    ids = [format_prompt_ids(tokenizer, p, prompt_format)[::-1] for p in _PREFIX_PROBES]
    n = min(_common_prefix(ids[0], other) for other in ids[1:])
    return ids[0][:n][::-1]


def split_record(record: list[int], header: list[int], start: int = 0) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a corpus record: the cut follows the first `header` at or
    after `start` (the whole record is the response when no header is found)."""
    n = len(header)
    for i in range(start, len(record) - n + 1):
        if record[i : i + n] == header:
            return record[: i + n], record[i + n :]
    return [], record


def format_fingerprint(tokenizer, prompt_format: str) -> str:
    """sha256 hex of the ids of a probe prompt in this format plus the chat template text."""
    ids = format_prompt_ids(tokenizer, FINGERPRINT_PROBE, prompt_format)
    template = getattr(tokenizer, "chat_template", None) if prompt_format == "chat" else ""
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True) if template is not None else ""
    payload = json.dumps(ids) + "\n" + template
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
