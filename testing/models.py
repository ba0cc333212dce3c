"""Tiny random subject models for tests and demos, served under the names `tiny-gpt2` and `tiny-llama`.

Importing this module registers the `tiny-` model source (`workers.models.loading.register_model_source`).
Tests name it in NEURONSWEEP_MODEL_SOURCES (tests/conftest.py), so every process of a test run registers it
before its first model lookup: the pytest process, CLI subprocesses and local Ray workers inherit the variable.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from workers.models.loading import LoadedModel, ModelLoadError, register_model_source, wrap

PREFIX = "tiny-"
KINDS = ("gpt2", "llama")


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A small byte-level BPE trained on the standard library's help text: offline, deterministic, ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from workers.extract.corpus import pydoc_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(pydoc_texts()[:200], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def tiny_model(kind: str = "gpt2", *, seed: int = 0, n_layers: int = 2, width: int = 64,
               max_positions: int = 256) -> LoadedModel:
    """A randomly initialised 2-layer model with `width` neurons per layer, built from a config."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if kind not in KINDS:
        raise ModelLoadError(f"tiny model kind '{kind}' is unknown (allowed: {', '.join(KINDS)})")
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.eos_token_id)
    config: GPT2Config | LlamaConfig
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=max_positions, n_embd=32, n_layer=n_layers, n_head=2,
                            n_inner=width, **special)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=width,
                             num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=max_positions, **special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return wrap(model, tokenizer, f"{PREFIX}{kind}")


def load_tiny(name: str) -> LoadedModel:
    """The model source for `tiny-gpt2` / `tiny-llama` (float32 on the CPU, whatever dtype/device is asked)."""
    return tiny_model(name.removeprefix(PREFIX))


register_model_source(PREFIX, load_tiny)
