"""Train a small TopK sparse autoencoder on the embedded model's residual stream and save it in the SAELens
layout, for `make sae-demo` (examples/sae-demo.yaml sweeps a slice of its latents).

There is no public SAE for SmolLM2-135M, so this makes one: the residual stream after one layer over the
windows the demo sweeps (the standard library's help text, cut as its config cuts it), each forward stopped at
that layer, each token's activations rescaled to one norm; a TopK SAE (k latents active per token) trained
with Adam on plain torch, its decoder rows started at tokens' own (centred) activations and kept at unit norm,
so that a couple of hundred steps give latents that each pick out one kind of token. A few minutes on a
laptop CPU in float32.

    python examples/train_sae.py --out runs/sae-demo-sae --layer 6 --latents 1024 --k 16 --steps 200
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from schemas.config import SweepConfig
from workers.extract.corpus import iter_windows
from workers.models.loading import load_subject
from workers.units.dictionaries import save_saelens
from workers.units.hooks import register_capture, resolve_hook


class _Caught(Exception):
    """Raised by the capture once it has the hook's activations: the layers above it are not needed."""


def residual_stream(model_name: str, hook: str, seq_len: int, max_windows: int, batch: int = 32) -> torch.Tensor:
    """[tokens, d_model] activations at `hook` over the default corpus' windows, position 0 of each window left
    out (the attention sink, which a sweep of units drops too). Each forward stops at the hook."""
    loaded = load_subject(model_name, dtype="float32", device="cpu")
    cfg = SweepConfig.from_dict({"corpus": {"seq_len": seq_len, "max_windows": max_windows}})
    ids = torch.tensor([w.token_ids for w in iter_windows(cfg.corpus, loaded.tokenizer)])
    hp = resolve_hook(loaded.model, hook)
    caught: list[torch.Tensor] = []

    def capture(x: torch.Tensor) -> None:
        caught.append(x[:, 1:].reshape(-1, x.shape[-1]).clone())
        raise _Caught

    handle = register_capture(loaded.model, hp, capture)
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                try:
                    loaded.model.base_model(input_ids=ids[i:i + batch], use_cache=False)
                except _Caught:
                    pass
    finally:
        handle.remove()
    return torch.cat(caught)


def rescaled(x: torch.Tensor) -> torch.Tensor:
    """Each token's activations at norm sqrt(d), as SAELens' `constant_norm_rescale` feeds its encoder: a few
    tokens' residual stream is ten times the median's, and would otherwise take most of the training."""
    return x * (x.shape[1] ** 0.5 / x.norm(dim=1, keepdim=True))


def topk_latents(x: torch.Tensor, params: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def train_topk(x: torch.Tensor, n_latents: int, k: int, steps: int, batch: int = 1024, lr: float = 2e-3,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """A TopK SAE (latents = topk(relu((x - b_dec) @ W_enc + b_enc))) fit to x by mean squared error. The decoder
    starts at randomly drawn tokens' centred activations (unit norm) and the encoder at its transpose, scaled so
    that the first reconstructions have the right size: each latent starts out firing on tokens like its own,
    which a short training then sharpens (a random start needs many more steps before its latents mean
    anything)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = x[torch.randperm(len(x), generator=g)[:n_latents]] - x.mean(0)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(n_latents), "W_dec": W_dec, "b_dec": x.mean(0)}
    sample = x[torch.randperm(len(x), generator=g)[:4096]] - params["b_dec"]
    recon = topk_latents(sample + params["b_dec"], params, k) @ W_dec
    params["W_enc"] *= float((recon * sample).sum() / (recon * recon).sum())  # least squares: the best scale
    params = {name: p.clone().requires_grad_() for name, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    variance = (x - x.mean(0)).pow(2).sum(1).mean()
    t0 = time.monotonic()
    for step in range(steps):
        xb = x[torch.randint(len(x), (batch,), generator=g)]
        loss = (topk_latents(xb, params, k) @ params["W_dec"] + params["b_dec"] - xb).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  fraction of variance unexplained {loss.item() / variance.item():.3f}  "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
    return {name: p.detach() for name, p in params.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sae-demo-sae", help="folder to save the SAE in (SAELens layout)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=6, help="the SAE reads blocks.LAYER.hook_resid_post")
    ap.add_argument("--latents", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1024, help="tokens per step")
    ap.add_argument("--seq-len", type=int, default=32, help="as examples/sae-demo.yaml")
    ap.add_argument("--windows", type=int, default=600, help="corpus windows to train on (the demo sweeps these)")
    args = ap.parse_args()
    t0 = time.monotonic()
    out = Path(args.out)
    if (out / "cfg.json").exists():
        print(f"{out} holds an SAE already; delete it to train again")
        return
    hook = f"blocks.{args.layer}.hook_resid_post"
    x = residual_stream(args.model, hook, args.seq_len, args.windows)
    print(f"{len(x)} tokens of {hook}, width {x.shape[1]} ({time.monotonic() - t0:.0f} s)", flush=True)
    if args.latents > len(x):
        raise SystemExit(f"--latents {args.latents}: at most one per token ({len(x)}); use more --windows")
    p = train_topk(rescaled(x), args.latents, args.k, args.steps, args.batch)
    save_saelens(out, W_enc=p["W_enc"], b_enc=p["b_enc"], W_dec=p["W_dec"], b_dec=p["b_dec"], hook_name=hook,
                 architecture="topk", k=args.k, model_name=args.model, normalize_activations="constant_norm_rescale")
    print(f"saved a TopK SAE ({args.latents} latents, k={args.k}) at {hook} to {out} "
          f"({time.monotonic() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
