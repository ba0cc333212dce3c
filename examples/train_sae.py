"""Train a small TopK sparse autoencoder on the embedded model's residual stream and save it in the SAELens
layout, for `make sae-demo` (examples/sae-demo.yaml sweeps a slice of its latents).

There is no public SAE for SmolLM2-135M, so this makes one: the residual stream after one layer over the
default corpus (the standard library's help text, the windows a sweep cuts), a TopK SAE (k latents active per
token) trained with Adam on plain torch, the decoder rows kept at unit norm. A few minutes on a laptop CPU.

    python examples/train_sae.py --out runs/sae-demo-sae --layer 6 --latents 2048 --k 32 --steps 400
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


def residual_stream(model_name: str, hook: str, seq_len: int, max_windows: int, batch: int = 32) -> torch.Tensor:
    """[tokens, d_model] activations at `hook` over the default corpus' windows, position 0 of each window left
    out (the attention sink, which a sweep of units drops too)."""
    loaded = load_subject(model_name, dtype="float32", device="cpu")
    cfg = SweepConfig.from_dict({"corpus": {"seq_len": seq_len, "max_windows": max_windows}})
    ids = torch.tensor([w.token_ids for w in iter_windows(cfg.corpus, loaded.tokenizer)])
    hp = resolve_hook(loaded.model, hook)
    caught: list[torch.Tensor] = []
    handle = register_capture(loaded.model, hp, lambda x: caught.append(x[:, 1:].reshape(-1, x.shape[-1]).clone()))
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                loaded.model.base_model(input_ids=ids[i:i + batch], use_cache=False)
    finally:
        handle.remove()
    return torch.cat(caught)


def train_topk(x: torch.Tensor, n_latents: int, k: int, steps: int, batch: int = 1024, lr: float = 1e-3,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """A TopK SAE (latents = topk(relu((x - b_dec) @ W_enc + b_enc))) fit to x by mean squared error."""
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    W_dec = torch.randn(n_latents, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.clone().requires_grad_(), "b_enc": torch.zeros(n_latents, requires_grad=True),
              "W_dec": W_dec.requires_grad_(), "b_dec": x.mean(0).clone().requires_grad_()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    variance = (x - x.mean(0)).pow(2).sum(1).mean()
    t0 = time.monotonic()
    for step in range(steps):
        xb = x[torch.randint(len(x), (batch,), generator=g)]
        pre = (xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        loss = (z @ params["W_dec"] + params["b_dec"] - xb).pow(2).sum(1).mean()
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
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--windows", type=int, default=1200, help="corpus windows to train on")
    args = ap.parse_args()
    out = Path(args.out)
    if (out / "cfg.json").exists():
        print(f"{out} holds an SAE already; delete it to train again")
        return
    hook = f"blocks.{args.layer}.hook_resid_post"
    x = residual_stream(args.model, hook, args.seq_len, args.windows)
    print(f"{len(x)} tokens of {hook}, width {x.shape[1]}", flush=True)
    p = train_topk(x, args.latents, args.k, args.steps)
    save_saelens(out, W_enc=p["W_enc"], b_enc=p["b_enc"], W_dec=p["W_dec"], b_dec=p["b_dec"], hook_name=hook,
                 architecture="topk", k=args.k, model_name=args.model)
    print(f"saved a TopK SAE ({args.latents} latents, k={args.k}) at {hook} to {out}")


if __name__ == "__main__":
    main()
