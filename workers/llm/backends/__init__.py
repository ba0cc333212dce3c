"""LLM backends: `local` (in-process Hugging Face model) and `openai` (any OpenAI-compatible endpoint).

`make_backend` is the one place a config becomes a backend. The environment comes in as a mapping from the
edge (the CLI passes `os.environ`); nothing below reads `os.environ` itself.
"""
from __future__ import annotations

from collections.abc import Mapping

from schemas.config import Backend
from workers.llm.backends.base import LLMBackend


def make_backend(cfg: Backend, *, env: Mapping[str, str]) -> LLMBackend:
    """A missing API key fails here (before any work), naming the variable, never showing a value."""
    if cfg.kind == "local":
        from workers.llm.backends.local import LocalBackend

        return LocalBackend.from_name(cfg.model, dtype=cfg.dtype, max_batch=cfg.max_batch, threads=cfg.threads)
    if cfg.kind == "openai":
        from workers.llm.backends.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(cfg, env=env)
    raise ValueError(f"unknown backend kind {cfg.kind!r}")
