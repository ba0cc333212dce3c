"""A dictionary with planted latents for the tiny llama (testing/models.py): latents that fire exactly on one
known token each at the residual stream before layer 0 (there, the token embedding), a dead latent, and random
ones; the SAE tests save it in the SAELens or sparsify layout."""
from __future__ import annotations

import torch


def planted_encoder(tiny, windows: torch.Tensor, d_sae: int, dead: int, n_planted: int = 3):
    """(W_enc [d_model, d_sae], b_enc [d_sae], planted tokens): latent j < n_planted fires exactly where the
    input embedding is its token's (every position but the first of `windows`), latent `dead` never fires."""
    emb = tiny.model.get_input_embeddings().weight.detach()
    torch.manual_seed(1)
    w, b = torch.randn(emb.shape[1], d_sae) * 0.5, torch.full((d_sae,), -0.02)
    planted: list[int] = []
    ids, counts = windows[:, 1:].reshape(-1).unique(return_counts=True)
    for tok in ids[counts.argsort(descending=True)].tolist():
        unit = emb[tok] / emb[tok].norm()
        proj = emb @ unit
        others = torch.cat([proj[:tok], proj[tok + 1:]]).max()
        if proj[tok] > others + 1e-3:  # a bias between the two separates this token from every other
            j = len(planted)
            w[:, j], b[j] = unit, -(proj[tok] + others) / 2
            planted.append(tok)
        if len(planted) == n_planted:
            break
    w[:, dead], b[dead] = 0.0, -1.0
    return w, b, planted
