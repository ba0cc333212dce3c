"""Dictionaries: the encoders that turn a hook point's activations into latents, read from the layouts people
publish them in, with `safetensors` directly (no sae-lens or sparsify import).

SAELens (a folder: `cfg.json` + `sae_weights.safetensors`):
    cfg: d_in, d_sae, architecture ('standard' | 'jumprelu' | 'topk' | 'transcoder' | 'jumprelu_transcoder' |
    'skip_transcoder'; older files say `activation_fn_str` instead), k (topk; older: activation_fn_kwargs.k),
    apply_b_dec_to_input, normalize_activations, hook_name (top level, or under `metadata` / `meta`)
    weights: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], threshold [d_sae] (jumprelu)
    latents = act((norm(x) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc); transcoders never subtract b_dec
EleutherAI sparsify (a folder per hook point, named by the module: `layers.3`, `layers.3.mlp`; each holds
`cfg.json` + `sae.safetensors`):
    cfg: d_in, k, num_latents (0: d_in * expansion_factor), activation ('topk'), transcode
    weights: encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    latents = topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias)); a transcoder (transcode) skips - b_dec
Directions (a .safetensors or .npy file of [n, d_model]): latent i = x . d_i / |d_i|, signed.

TopK keeps the k largest pre-activations per token, ReLU'd (SAELens: topk then ReLU; sparsify: ReLU then topk;
the same values). JumpReLU: pre * (pre > threshold), ReLU'd.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from workers.units import UnitsError

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
CFG_FILE = "cfg.json"
# SAELens architecture -> (activation, is a transcoder)
SAELENS_ARCHITECTURES = {
    "standard": ("relu", False), "jumprelu": ("jumprelu", False), "topk": ("topk", False),
    "transcoder": ("relu", True), "skip_transcoder": ("relu", True), "jumprelu_transcoder": ("jumprelu", True),
}
INPUT_NORMS = ("none", "constant_norm_rescale", "layer_norm")


@dataclass
class Dictionary:
    """One dictionary's encoder. `encode(x)` maps [..., d_in] activations to [..., d_sae] latents."""
    kind: str  # sae | transcoder | direction
    format: str  # saelens | sparsify | directions
    path: str
    activation: str  # relu | jumprelu | topk | linear
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    b_pre: torch.Tensor | None = None  # [d_in], subtracted from the input first
    threshold: torch.Tensor | None = None  # [d_sae] (jumprelu)
    k: int | None = None  # (topk)
    input_norm: str = "none"  # none | constant_norm_rescale | layer_norm (SAELens normalize_activations)
    scale: torch.Tensor | None = None  # [d_sae] multiplies the latents (decoder norms, when folded)
    W_dec: torch.Tensor | None = None  # [d_sae, d_out]; only its row norms are used (`fold_decoder_norm`)
    hook: str | None = None  # the hook point the files name, if any

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.input_norm == "constant_norm_rescale":
            x = x * (self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
        elif self.input_norm == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        if self.b_pre is not None:
            x = x - self.b_pre
        pre = x @ self.W_enc + self.b_enc
        if self.activation == "relu":
            out = pre.relu()
        elif self.activation == "jumprelu":
            assert self.threshold is not None  # set by every loader of a jumprelu dictionary
            out = pre.relu() * (pre > self.threshold)
        elif self.activation == "topk":
            assert self.k is not None  # set by every loader of a topk dictionary
            top = pre.topk(self.k, dim=-1)
            out = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        else:
            out = pre
        return out if self.scale is None else out * self.scale

    def to(self, device=None, dtype: torch.dtype | None = None) -> Dictionary:
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return replace(self, W_enc=move(self.W_enc), b_enc=move(self.b_enc), b_pre=move(self.b_pre),
                       threshold=move(self.threshold), scale=move(self.scale), W_dec=move(self.W_dec))

    def fold_decoder_norm(self) -> Dictionary:
        """Latents scaled by their decoder rows' norms (as SAELens' fold_W_dec_norm does to relu and jumprelu
        SAEs; for topk the selection is made before the scaling, so the same latents stay active)."""
        if self.W_dec is None:
            raise UnitsError(f"units.fold_decoder_norm: {self.path} has no decoder weights to take norms of")
        return replace(self, scale=self.W_dec.float().norm(dim=1).to(self.W_enc.dtype))


# --- reading ----------------------------------------------------------------------------------------------------
def detect_format(folder: Path) -> str:
    """'saelens' or 'sparsify', by the weights file the folder holds."""
    if (folder / SAELENS_WEIGHTS).exists():
        return "saelens"
    if (folder / SPARSIFY_WEIGHTS).exists():
        return "sparsify"
    raise UnitsError(f"units.path: {folder} holds neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} "
                     f"(sparsify)")


def load_dictionary(folder: str | Path, fmt: str = "auto", kind: str = "sae", weights: bool = True) -> Dictionary:
    """The dictionary in one folder (SAELens or sparsify layout); weights=False: shapes only (`_tensors`)."""
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file():
        raise UnitsError(f"units.path: no {CFG_FILE} in {folder}")
    fmt = detect_format(folder) if fmt == "auto" else fmt
    cfg = _read_cfg(folder / CFG_FILE)
    if fmt == "saelens":
        return _saelens(folder, cfg, kind, weights)
    if fmt == "sparsify":
        return _sparsify(folder, cfg, kind, weights)
    raise UnitsError(f"units.format: {fmt!r} is not a dictionary format (allowed: auto, saelens, sparsify)")


def _read_cfg(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnitsError(f"units.path: cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise UnitsError(f"units.path: {path} must hold a JSON object")
    return cfg


def _tensors(path: Path, weights: bool = True) -> dict[str, torch.Tensor]:
    """The file's tensors; with weights=False only their shapes, as empty tensors on the meta device (the
    header alone is read: a driver checks a 131k-latent dictionary without loading it)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if weights:
            return load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: torch.empty(f.get_slice(name).get_shape(), device="meta") for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise UnitsError(f"units.path: cannot read {path}: {e}") from None


def _need(tensors: dict, name: str, shape: tuple, path: Path) -> torch.Tensor:
    if name not in tensors:
        raise UnitsError(f"units.path: {path} has no tensor {name!r} (it has: {', '.join(sorted(tensors))})")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise UnitsError(f"units.path: {path}: {name} has shape {list(t.shape)}, expected {list(shape)} from its "
                         f"{CFG_FILE}")
    return t


def _hook_name(cfg: dict) -> str | None:
    for section in (cfg, cfg.get("metadata") or {}, cfg.get("meta") or {}):
        if isinstance(section, dict) and section.get("hook_name"):
            return str(section["hook_name"])
    return None


def _saelens(folder: Path, cfg: dict, kind: str, weights: bool = True) -> Dictionary:
    path = folder / SAELENS_WEIGHTS
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise UnitsError(f"units.path: {folder / CFG_FILE} needs integer d_in and d_sae (SAELens layout)") from None
    arch = cfg.get("architecture") or {"relu": "standard", "topk": "topk"}.get(cfg.get("activation_fn_str", "relu"))
    if arch not in SAELENS_ARCHITECTURES:
        raise UnitsError(f"units.path: {folder}: SAELens architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SAELENS_ARCHITECTURES)})")
    activation, transcoder = SAELENS_ARCHITECTURES[arch]
    norm = cfg.get("normalize_activations") or "none"
    if norm not in INPUT_NORMS:
        raise UnitsError(f"units.path: {folder}: normalize_activations={norm!r} needs a scaling factor that is not "
                         f"in the files; fold it into W_enc (SAELens fold_activation_norm_scaling_factor) and save "
                         f"again (readable: {', '.join(INPUT_NORMS)})")
    t = _tensors(path, weights)
    W_enc = _need(t, "W_enc", (d_in, d_sae), path)
    b_enc = _need(t, "b_enc", (d_sae,), path)
    W_dec = t.get("W_dec")
    threshold = _need(t, "threshold", (d_sae,), path) if activation == "jumprelu" else None
    k = None
    if activation == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if not k or not 1 <= int(k) <= d_sae:
            raise UnitsError(f"units.path: {folder}: a topk SAE needs k in 1..{d_sae} in its {CFG_FILE}")
        k = int(k)
    b_pre = None
    if kind == "sae" and not transcoder and cfg.get("apply_b_dec_to_input", True):
        b_pre = _need(t, "b_dec", (d_in,), path)
    return Dictionary("transcoder" if transcoder else kind, "saelens", str(folder), activation, W_enc, b_enc,
                      b_pre, threshold, k, norm, W_dec=W_dec, hook=_hook_name(cfg))


def _sparsify(folder: Path, cfg: dict, kind: str, weights: bool = True) -> Dictionary:
    path = folder / SPARSIFY_WEIGHTS
    try:
        d_in = int(cfg["d_in"])
        d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
        k = int(cfg.get("k", 32))
    except (KeyError, TypeError, ValueError):
        raise UnitsError(f"units.path: {folder / CFG_FILE} needs integer d_in, k and num_latents or "
                         f"expansion_factor (sparsify layout)") from None
    if cfg.get("activation", "topk") != "topk":
        raise UnitsError(f"units.path: {folder}: sparsify activation {cfg.get('activation')!r} is not supported "
                         f"(supported: topk)")
    if not 1 <= k <= d_sae:
        raise UnitsError(f"units.path: {folder}: k={k} must be in 1..{d_sae}")
    transcoder = bool(cfg.get("transcode", False))
    t = _tensors(path, weights)
    W_enc = _need(t, "encoder.weight", (d_sae, d_in), path).T.contiguous()
    b_enc = _need(t, "encoder.bias", (d_sae,), path)
    b_pre = None if transcoder or kind == "transcoder" else _need(t, "b_dec", (d_in,), path)
    return Dictionary("transcoder" if transcoder else kind, "sparsify", str(folder), "topk", W_enc, b_enc, b_pre,
                      None, k, W_dec=t.get("W_dec"), hook=folder.name)


def load_directions(file: str | Path) -> Dictionary:
    """Directions from a .npy file, or a .safetensors file holding one tensor (or one named 'directions'), of
    shape [n, d_model] ([d_model]: one direction); latent i is the projection on unit direction i."""
    file = Path(file)
    if not file.is_file():
        raise UnitsError(f"units.path: {file} is not a file")
    if file.suffix == ".npy":
        import numpy as np

        try:
            d = torch.from_numpy(np.load(file, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise UnitsError(f"units.path: cannot read {file}: {e}") from None
    elif file.suffix == ".safetensors":
        t = _tensors(file)
        if "directions" in t:
            d = t["directions"]
        elif len(t) == 1:
            d = next(iter(t.values()))
        else:
            raise UnitsError(f"units.path: {file} holds {len(t)} tensors; name the directions 'directions'")
    else:
        raise UnitsError(f"units.path: {file} must be a .npy or .safetensors file of [n, d_model] directions")
    d = d.float()
    if d.dim() == 1:
        d = d[None]
    if d.dim() != 2 or d.shape[0] == 0:
        raise UnitsError(f"units.path: {file} holds shape {list(d.shape)}; expected [n, d_model]")
    norms = d.norm(dim=1)
    if not bool(torch.isfinite(d).all()) or bool((norms == 0).any()):
        raise UnitsError(f"units.path: {file}: every direction must be finite and non-zero")
    unit = (d / norms[:, None]).T.contiguous()
    return Dictionary("direction", "directions", str(file), "linear", unit, torch.zeros(d.shape[0]))


# --- writing (tests, examples/train_sae.py) ------------------------------------------------------------------------
def save_saelens(folder: str | Path, *, W_enc, b_enc, W_dec, b_dec, hook_name: str, architecture: str = "standard",
                 k: int | None = None, threshold=None, apply_b_dec_to_input: bool = True,
                 model_name: str | None = None, normalize_activations: str = "none") -> Path:
    """Write a dictionary in the SAELens layout (the cfg fields SAELens' loaders read). `normalize_activations`
    'constant_norm_rescale': the encoder reads each token's activations rescaled to norm sqrt(d_in)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if threshold is not None:
        tensors["threshold"] = threshold
    save_file({n: v.detach().float().contiguous().clone() for n, v in tensors.items()}, str(folder / SAELENS_WEIGHTS))
    d_in, d_sae = W_enc.shape
    cfg = {"architecture": architecture, "d_in": int(d_in), "d_sae": int(d_sae), "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": apply_b_dec_to_input,
           "normalize_activations": normalize_activations, "hook_name": hook_name,
           "metadata": {"hook_name": hook_name, "model_name": model_name}}
    if k is not None:
        cfg["k"] = int(k)
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    return folder


def save_sparsify(root: str | Path, hookpoint: str, *, encoder_weight, encoder_bias, W_dec, b_dec, k: int,
                  transcode: bool = False) -> Path:
    """Write a dictionary in the sparsify layout: `root/<hookpoint>/{cfg.json, sae.safetensors}`."""
    from safetensors.torch import save_file

    folder = Path(root) / hookpoint
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": encoder_weight, "encoder.bias": encoder_bias, "W_dec": W_dec, "b_dec": b_dec}
    save_file({n: v.detach().float().contiguous().clone() for n, v in tensors.items()}, str(folder / SPARSIFY_WEIGHTS))
    d_sae, d_in = encoder_weight.shape
    cfg = {"activation": "topk", "expansion_factor": 0, "normalize_decoder": True, "num_latents": int(d_sae),
           "k": int(k), "multi_topk": False, "skip_connection": False, "transcode": transcode, "d_in": int(d_in)}
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    return folder
