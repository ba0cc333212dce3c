"""Extraction overhead: plain forward vs forward + capture + per-neuron summaries of ALL layers.

Both run in this process on the same windows, interleaved in blocks of --block batches (plain block i, extract
block i, in alternating order), so that load from other processes hits both alike even on a shared machine.
Blocks, not single batches: a plain batch right after an extraction batch runs with the extraction's data in
the caches and was measured ~30% slower than in a plain pass, which flattered the ratio. Each repeat is one
pass over all windows with a fresh collector, so block i does the same work in every repeat; the headline
ratio takes each block's median time over the repeats (a median of paired, repeated measurements filters most
of a shared machine's noise) and sums them. The plain forward is the same
trunk call the extractor makes (no LM head: extraction never needs logits); the full-LM forward is printed for
reference. By default it takes the default corpus as the default config cuts it (up to 2,000 windows of 64
tokens: 1,767 from the pydoc corpus): the top reservoirs take most windows early in a run and few later, so
short runs overstate the cost.

    .venv/bin/python bench/extract.py [--windows 2000] [--batch 32] [--block 8] [--repeats 3] [--eager]
    .venv/bin/python bench/extract.py --shape gpt2-xl --batch 256 --repeats 2    # on a GPU
--eager: no torch.compile (the reductions run as separate eager ops). --bottom-k: bottom records per neuron
(default: the config's default for the model's family: 20 for a gated MLP like SmolLM2's, 0 for GPT-2's);
--quantiles: also keep the quantile sketch (2 windows per bin), as `records.quantiles: true` does.
--shape gpt2-xl: a randomly initialised model of GPT-2 XL's shape (48 layers x 6,400 neurons, 1.5B
parameters; bf16 on a GPU) instead of the default model, on the same windows (SmolLM2's token ids, all below
GPT-2's vocabulary size); it also prints the fraction of the GPU's dense bf16 peak that the extraction reaches
(--peak-tflops, or known from the GPU's name). --layers N keeps the first N layers of that shape (a smoke test
on a CPU).
--units sae: SAE latents instead of neurons: a TopK SAE of --width latents (k --k) with random weights, saved in
the SAELens layout in a temporary folder and loaded as a sweep loads it, read at the last layer's
hook_resid_post (so both passes run the whole trunk); it also prints the memory per 10^4 latents (the collector's
state, the encoder's weights and one batch's latents, per 10,000 latents) and ends with
sae_extract_overhead_ratio=<extract tokens/s / plain tokens/s>.

    .venv/bin/python bench/extract.py --units sae --width 16384 --windows 256

Last line: extract_overhead_ratio=<extract tokens/s / plain tokens/s>.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.extraction.plan import bottom_k_for  # noqa: E402
from schemas.config import Corpus, SweepConfig  # noqa: E402
from workers.extract.capture import compiled_summaries, window_summaries  # noqa: E402
from workers.extract.collectors import ActivationCollector, CollectorSpec  # noqa: E402
from workers.extract.corpus import iter_windows  # noqa: E402
from workers.extract.forward import ActivationExtractor  # noqa: E402
from workers.models.loading import load_subject  # noqa: E402


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# dense bf16 tensor-core peak, TFLOP/s, by a substring of the GPU's name (vendor data sheets, SXM parts)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def gpt2_xl_shaped(n_layers: int, device: str, tokenizer):
    """GPT-2 XL's shape with random weights (no download needed), wrapped like a loaded model."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from workers.models.loading import wrap

    config = GPT2Config(n_embd=1600, n_layer=n_layers, n_head=25, n_positions=1024, vocab_size=50257)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    return wrap(model, tokenizer, f"gpt2-xl-shaped ({n_layers} layers, random weights)")


def random_sae(folder: Path, loaded, width: int, k: int):
    """A TopK SAE with random weights at the last layer's hook_resid_post, saved in the SAELens layout and
    loaded back as a sweep's worker loads it (`worker_units`)."""
    from workers.units.dictionaries import save_saelens
    from workers.units.source import worker_units

    d, last = loaded.model.config.hidden_size, loaded.info.n_layers - 1
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(width, d, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    save_saelens(folder, W_enc=w_dec.T.contiguous(), b_enc=torch.zeros(width), W_dec=w_dec, b_dec=torch.zeros(d),
                 hook_name=f"blocks.{last}.hook_resid_post", architecture="topk", k=k)
    return worker_units({"kind": "sae", "path": str(folder)}, loaded)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def forward_flops_per_token(loaded, seq_len: int) -> float:
    """2 x the non-embedding parameters, plus attention over the window (Kaplan et al. 2020's forward count)."""
    cfg = loaded.model.config
    params = sum(p.numel() for name, p in loaded.model.base_model.named_parameters() if "wte" not in name
                 and "wpe" not in name and "embed" not in name)
    return 2 * params + 2 * cfg.num_hidden_layers * seq_len * cfg.hidden_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=Corpus().max_windows)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="do not fuse the per-window reductions (torch.compile)")
    ap.add_argument("--bottom-k", type=int, help="bottom records per neuron (default: by the model's family)")
    ap.add_argument("--quantiles", action="store_true", help="also keep the quantile sketch")
    ap.add_argument("--block", type=int, default=8, help="batches per timed block")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--shape", choices=["gpt2-xl"], help="a random model of this shape instead of --model")
    ap.add_argument("--layers", type=int, default=48, help="with --shape: how many of its layers")
    ap.add_argument("--peak-tflops", type=float, help="the accelerator's dense bf16 peak (default: by GPU name)")
    ap.add_argument("--units", choices=["sae"], help="SAE latents (random weights) instead of neurons")
    ap.add_argument("--width", type=int, default=16384, help="with --units sae: latents of the SAE")
    ap.add_argument("--k", type=int, default=32, help="with --units sae: active latents per token (TopK)")
    args = ap.parse_args()

    m = load_subject(args.model, dtype=args.dtype)
    if args.shape:
        m = gpt2_xl_shaped(args.layers, "cuda" if torch.cuda.is_available() else "cpu", m.tokenizer)
    device = next(m.model.parameters()).device
    ws = list(iter_windows(Corpus(seq_len=args.seq_len, max_windows=args.windows), m.tokenizer))
    ids = torch.tensor([w.token_ids for w in ws])
    seq_ids = torch.tensor([w.seq_id for w in ws])
    n_tokens = ids.numel()
    units = None
    layers, n_units, what = list(range(m.info.n_layers)), m.info.n_neurons, "neurons"
    if args.units:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # the weights are read into memory: the files can go
            units = random_sae(Path(tmp) / "sae", m, args.width, args.k)
        layers, n_units, what = units.layers, units.n_units, f"SAE latents (TopK k={args.k}, random weights)"
    default_bottom = 0 if args.units else bottom_k_for(SweepConfig(), m.info.architecture)  # latents are >= 0
    bottom_k = args.bottom_k if args.bottom_k is not None else default_bottom
    spec = CollectorSpec(layers, n_units, args.seq_len, top_k=20, n_random=15, seed=0,
                         corpus=seq_ids.tolist(), bottom_k=bottom_k, n_per_quantile=2 if args.quantiles else 0)
    compile = not args.eager
    summarize = compiled_summaries() if compile else window_summaries
    captures = {}  # the compiled functions, shared by every repeat's extractor
    print(f"model {m.info.name}: {len(layers)} layers x {n_units} {what}, {m.info.dtype} on {device}; "
          f"{len(ws)} windows x {args.seq_len} tokens, batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"{'eager' if args.eager else 'compiled'}, bottom_k {bottom_k}"
          f"{', quantile sketch' if args.quantiles else ''}, "
          f"blocks of {args.block} batches")
    starts = list(range(0, len(ws), args.batch))
    blocks = [starts[i:i + args.block] for i in range(0, len(starts), args.block)]

    def extractor():
        collector = ActivationCollector(spec, dtype=m.model.dtype, device=device, summarize=summarize)
        return ActivationExtractor(m, collector, compile, captures, units)

    def plain_batch(i):
        with torch.no_grad():
            m.model.base_model(input_ids=ids[i:i + args.batch].to(device), use_cache=False)

    def plain_block(block):
        for i in block:
            plain_batch(i)

    def full_lm():
        with torch.no_grad():
            for i in starts:
                m.model(input_ids=ids[i:i + args.batch].to(device), use_cache=False)

    def one_repeat(r: int) -> tuple[list[float], list[float]]:
        """Seconds per block (plain, extract), measured side by side."""
        ex = extractor()
        plain, extract = [], []
        try:
            for j, block in enumerate(blocks):
                def ext(block=block):
                    for i in block:
                        ex.run_batch(ids[i:i + args.batch], seq_ids[i:i + args.batch])
                if (j + r) % 2:
                    extract.append(timed(ext))
                    plain.append(timed(lambda block=block: plain_block(block)))
                else:
                    plain.append(timed(lambda block=block: plain_block(block)))
                    extract.append(timed(ext))
        finally:
            ex.close()
        return plain, extract

    # warm-up (and the compilation for the full and the last partial batch shapes)
    plain_batch(0)
    warm = extractor()
    warm.run(ids[:args.batch], seq_ids[:args.batch], args.batch)
    if len(ws) % args.batch:
        tail = len(ws) % args.batch
        warm.run(ids[-tail:], seq_ids[-tail:], args.batch)
    warm.close()

    plain_runs, extract_runs = [], []
    for r in range(args.repeats):
        p, e = one_repeat(r)
        plain_runs.append(p)
        extract_runs.append(e)
        print(f"repeat {r}: plain {n_tokens / sum(p):,.0f} tokens/s, extract {n_tokens / sum(e):,.0f} tokens/s, "
              f"ratio {sum(p) / sum(e):.3f}", flush=True)
    full_s = timed(full_lm)
    plain_s = sum(statistics.median(t) for t in zip(*plain_runs))
    extract_s = sum(statistics.median(t) for t in zip(*extract_runs))
    plain_tps, extract_tps = n_tokens / plain_s, n_tokens / extract_s
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"full LM forward (with head):      {n_tokens / full_s:,.0f} tokens/s (one run, reference)")
    print(f"plain forward (trunk):            {plain_tps:,.0f} tokens/s (per-block medians of {args.repeats} repeats)")
    print(f"forward+capture+summaries ({len(layers)} layers x {n_units} {what}): {extract_tps:,.0f} tokens/s")
    print(f"peak memory: {peak_rss:,.0f} MiB resident" + (
        f", {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB GPU" if torch.cuda.is_available() else ""))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        flops = forward_flops_per_token(m, args.seq_len)
        if peak:
            print(f"{name}: {flops / 1e9:.2f} GFLOP/token; extraction reaches {extract_tps * flops / (peak * 1e12):.1%}"
                  f" of the {peak:,.0f} TFLOP/s bf16 peak (plain forward {plain_tps * flops / (peak * 1e12):.1%})")
    if units is not None:
        d = units.by_layer[layers[0]].dictionary
        per = 1e4 / n_units / 2**20  # bytes of the whole width -> MiB per 10^4 latents
        state = tensor_bytes(ActivationCollector(spec, dtype=m.model.dtype, device=device).state_dict()) * per
        encoder = tensor_bytes([d.W_enc, d.b_enc, d.b_pre, d.threshold, d.scale]) * per
        batch = args.batch * args.seq_len * d.W_enc.element_size() * 1e4 / 2**20  # [B, T, 10^4] latents
        total = state + encoder + batch
        print(f"memory per 10^4 latents: {total:,.1f} MiB (collector state {state:,.1f}, encoder weights "
              f"{encoder:,.1f}, one batch's latents {batch:,.1f}: {args.batch} windows x {args.seq_len} tokens)")
        print(f"sae_memory_mib_per_10k_latents={total:.1f}")
        print(f"sae_extract_overhead_ratio={extract_tps / plain_tps:.3f}")
        return
    print(f"extract_overhead_ratio={extract_tps / plain_tps:.3f}")


if __name__ == "__main__":
    main()
