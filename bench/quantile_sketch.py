"""Memory of quantile records as the corpus grows: the exact rule (every window's maxima, then `quantile_picks`)
against the sketch (a histogram of window maxima with per-bucket pick candidates, workers/extract/sketch.py).

Synthetic activations (log-normal magnitudes, both signs, a different scale per neuron) are fed in batches to
one layer's collector (`LayerCollector.update`, the path a real run takes: reductions, statistics, a small top
reservoir), for 10^4, 10^5 and 10^6 windows; each (method, size) runs in a fresh process. Per run it prints the
bytes the method keeps (the sketch's counts and candidates; the exact rule's maxima [W, N] float32) and the
peak resident memory above the process's resident memory before the first batch (ru_maxrss; it includes
each batch's temporaries and, for the exact rule, its picking step's [N, W] int64 sorts).

    .venv/bin/python bench/quantile_sketch.py [--neurons 64] [--seq-len 4] [--batch 4096] [--sizes 1e4,1e5,1e6]

The second-to-last line is the sketch's growth from the smallest to the largest size (its kept bytes are
fixed; its peak, batch temporaries included, should stay flat). Last line: sketch_memory_ratio_1e6=<the
sketch's peak memory growth / the exact rule's, at the largest size>.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.extract.collectors import CollectorSpec, LayerCollector  # noqa: E402
from workers.extract.keys import quantile_picks  # noqa: E402

SEED, LAYER, N_PER_QUANTILE = 0, 0, 2


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def batches(n_windows: int, n_neurons: int, seq_len: int, batch: int):
    """Synthetic activations [b, T, N]: neuron n has scale 10**(n % 7 - 3), so the maxima span the sketch's range."""
    g = torch.Generator().manual_seed(SEED)
    scale = 10.0 ** (torch.arange(n_neurons) % 7 - 3).float()
    for lo in range(0, n_windows, batch):
        b = min(batch, n_windows - lo)
        x = torch.randn(b, seq_len, n_neurons, generator=g).exp() * torch.randn(b, 1, n_neurons, generator=g).sign()
        yield x * scale, torch.arange(lo, lo + b)


def one_run(method: str, n_windows: int, n_neurons: int, seq_len: int, batch: int) -> dict:
    spec = CollectorSpec([LAYER], n_neurons, seq_len, top_k=4, n_random=0, seed=SEED,
                         n_per_quantile=N_PER_QUANTILE if method == "sketch" else 0)
    base = resident_bytes()
    t0 = time.perf_counter()
    collector = LayerCollector(LAYER, spec, torch.float32, "cpu")
    maxima, seqs = [], []
    for x, seq_ids in batches(n_windows, n_neurons, seq_len, batch):
        collector.update(x, seq_ids)
        if method == "exact":  # what the exact rule needs: every window's maxima
            maxima.append(x.amax(1))
            seqs.append(seq_ids)
    if method == "exact":
        kept = torch.cat(maxima)
        picks = quantile_picks(SEED, LAYER, torch.cat(seqs), kept, N_PER_QUANTILE)
        kept_bytes = kept.numel() * kept.element_size()
    else:
        picks = collector.quantiles.picks()
        q = collector.quantiles
        kept_bytes = sum(t.numel() * t.element_size() for t in (q.counts, q.keys))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "windows": n_windows, "kept_bytes": kept_bytes, "peak_growth": max(peak - base, 0),
            "seconds": time.perf_counter() - t0, "picked": int((picks >= 0).sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--neurons", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--sizes", default="1e4,1e5,1e6")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "WINDOWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(float(args.one[1])), args.neurons, args.seq_len, args.batch)))
        return
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    print(f"one layer of {args.neurons} neurons, windows of {args.seq_len} tokens in batches of {args.batch}, "
          f"{N_PER_QUANTILE} quantile records per bin; torch threads {torch.get_num_threads()}")
    print(f"{'windows':>9} {'method':>7} {'kept MiB':>10} {'peak MiB':>10} {'seconds':>8} {'picked':>7}")
    runs = {}
    for n in sizes:
        for method in ("exact", "sketch"):
            out = subprocess.run([sys.executable, __file__, "--one", method, str(n), "--neurons", str(args.neurons),
                                  "--seq-len", str(args.seq_len), "--batch", str(args.batch)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[method, n] = r
            print(f"{n:>9,} {method:>7} {r['kept_bytes'] / 2**20:>10.2f} {r['peak_growth'] / 2**20:>10.1f} "
                  f"{r['seconds']:>8.1f} {r['picked']:>7}", flush=True)
    lo, hi = sizes[0], sizes[-1]
    s_lo, s_hi = runs["sketch", lo], runs["sketch", hi]
    print(f"sketch from {lo:,} to {hi:,} windows: kept bytes x{s_hi['kept_bytes'] / s_lo['kept_bytes']:.2f}, "
          f"peak x{s_hi['peak_growth'] / max(s_lo['peak_growth'], 1):.2f}; exact: peak "
          f"x{runs['exact', hi]['peak_growth'] / max(runs['exact', lo]['peak_growth'], 1):.1f}")
    print(f"sketch_memory_ratio_1e6={s_hi['peak_growth'] / max(runs['exact', hi]['peak_growth'], 1):.4f}")


if __name__ == "__main__":
    main()
