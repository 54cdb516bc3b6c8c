"""Tiny random Llama models with a hub-free byte-level tokenizer: the unit tests' target LLM."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_byte_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A hub-free byte-level tokenizer (259 ids: <pad>, <|im_start|>, <|im_end|>, 256 bytes)
    with a ChatML chat template, for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    fast.chat_template = _CHATML_TEMPLATE
    return fast


def make_tiny_llama(
    out_dir,
    vocab_size: int,
    tokenizer=None,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    init_std: float = 0.2,
) -> Path:
    """Save a tiny random LlamaForCausalLM (deterministic per seed) as an HF folder.

    Without `tokenizer`, a byte-level one (make_byte_tokenizer) is saved so the folder
    still loads through load_model; that needs vocab_size >= 259.
    """
    out_dir = Path(out_dir)
    if tokenizer is None:
        tokenizer = make_byte_tokenizer()
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids but vocab_size is {vocab_size}")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private RNG stream: deterministic per seed without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
