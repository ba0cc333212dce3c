"""Extraction overhead: plain forward vs forward + capture + per-neuron summaries of ALL layers.

Both run in this process on the same windows, interleaved batch by batch (plain batch i, extract batch i, in
alternating order), so that load from other processes hits both alike even on a shared machine; each repeat
is one pass over all windows with a fresh collector, and the ratio uses the median repeat. The plain forward is
the same trunk call the extractor makes (no LM head: extraction never needs logits); the full-LM forward is
printed for reference. Use about as many windows as a real run (default config: 2,000): the top reservoirs
take most windows early in a run and few later, so short runs overstate the cost.

    .venv/bin/python bench/extract.py [--windows 1024] [--batch 32] [--repeats 3] [--eager]
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

from schemas.config import Corpus  # noqa: E402
from workers.corpus import iter_windows  # noqa: E402
from workers.extract import (ActivationCollector, ActivationExtractor, CollectorSpec,  # noqa: E402
                             compiled_summaries, window_summaries)
from workers.models import load_subject  # noqa: E402


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="do not fuse the per-window reductions (torch.compile)")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    m = load_subject(args.model, dtype=args.dtype)
    device = next(m.model.parameters()).device
    ws = list(iter_windows(Corpus(seq_len=args.seq_len, max_windows=args.windows), m.tokenizer))
    ids = torch.tensor([w.token_ids for w in ws])
    seq_ids = torch.tensor([w.seq_id for w in ws])
    n_tokens = ids.numel()
    spec = CollectorSpec(list(range(m.info.n_layers)), m.info.n_neurons, args.seq_len, top_k=20, n_random=15, seed=0,
                         corpus=seq_ids.tolist())
    summarize = window_summaries if args.eager else compiled_summaries()
    print(f"model {m.info.name}: {m.info.n_layers} layers x {m.info.n_neurons} neurons, {m.info.dtype} on {device}; "
          f"{len(ws)} windows x {args.seq_len} tokens, batch {args.batch}, torch threads {torch.get_num_threads()}")

    def plain_batch(i):
        with torch.no_grad():
            m.model.base_model(input_ids=ids[i:i + args.batch].to(device), use_cache=False)

    def full_lm():
        with torch.no_grad():
            for i in range(0, len(ws), args.batch):
                m.model(input_ids=ids[i:i + args.batch].to(device), use_cache=False)

    def one_repeat(r: int) -> tuple[float, float]:
        """(plain seconds, extract seconds) over all windows, measured batch by batch side by side."""
        collector = ActivationCollector(spec, dtype=m.model.dtype, device=device, summarize=summarize)
        ex = ActivationExtractor(m, collector)
        t_plain = t_extract = 0.0
        try:
            for j, i in enumerate(range(0, len(ws), args.batch)):
                def ext(i=i):
                    ex.run_batch(ids[i:i + args.batch], seq_ids[i:i + args.batch])
                if (j + r) % 2:
                    t_extract += timed(ext)
                    t_plain += timed(lambda: plain_batch(i))
                else:
                    t_plain += timed(lambda: plain_batch(i))
                    t_extract += timed(ext)
        finally:
            ex.close()
        return t_plain, t_extract

    # warm-up (and the compilation for the full and the last partial batch shapes)
    with torch.no_grad():
        m.model.base_model(input_ids=ids[:args.batch].to(device), use_cache=False)
    warm = ActivationCollector(spec, dtype=m.model.dtype, device=device, summarize=summarize)
    wex = ActivationExtractor(m, warm)
    wex.run(ids[:args.batch], seq_ids[:args.batch], args.batch)
    if len(ws) % args.batch:
        tail = len(ws) % args.batch
        wex.run(ids[-tail:], seq_ids[-tail:], args.batch)
    wex.close()

    plain_s, extract_s = [], []
    for r in range(args.repeats):
        p, e = one_repeat(r)
        plain_s.append(p)
        extract_s.append(e)
        print(f"repeat {r}: plain {n_tokens / p:,.0f} tokens/s, extract {n_tokens / e:,.0f} tokens/s, "
              f"ratio {p / e:.3f}", flush=True)
    full_s = timed(full_lm)
    ratios = [p / e for p, e in zip(plain_s, extract_s)]
    mid = ratios.index(statistics.median_low(ratios))
    plain_tps, extract_tps = n_tokens / plain_s[mid], n_tokens / extract_s[mid]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"full LM forward (with head):      {n_tokens / full_s:,.0f} tokens/s (one run, reference)")
    print(f"plain forward (trunk):            {plain_tps:,.0f} tokens/s (the median repeat of {args.repeats})")
    print(f"forward+capture+summaries (all {m.info.n_layers} layers): {extract_tps:,.0f} tokens/s")
    print(f"peak memory: {peak_rss:,.0f} MiB resident" + (
        f", {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB GPU" if torch.cuda.is_available() else ""))
    print(f"extract_overhead_ratio={extract_tps / plain_tps:.3f}")


if __name__ == "__main__":
    main()
