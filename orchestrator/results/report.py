"""`neuronsweep report RUN`: PNG plots and a Markdown summary of a run's results.

    paths = write_report(RunStore.open("runs/demo"), "runs/demo-report")

Writes score_distribution.png, score_by_layer.png, top_vs_random.png and summary.md (neurons done, the share
scoring >= 0.8 and >= 0.5, the best neurons per layer, failures by reason, tokens and cost per neuron). Shares
and means count only defined scores (an undefined score is null and is left out, docs/method.md §6).

Scores, shares and plots are the positive side's. A neuron's negative side (docs/method.md §1 "Both signs") is
a unit of its own, never averaged in: the summary reports it in its own lines (how many neurons have one, its
shares and mean), and tokens and cost cover both sides.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from orchestrator.results.index import Progress  # noqa: E402
from orchestrator.results.reader import RunReader  # noqa: E402
from orchestrator.store import RunStore  # noqa: E402
from orchestrator.units import recorded_source, units_line  # noqa: E402

THRESHOLDS = (0.8, 0.5)
BEST_PER_LAYER = 3


def _done_scores(index: pa.Table) -> pa.Table:
    done = index.filter(pc.equal(index["status"], "done"))
    return done.filter(pc.is_valid(done["score"]))


def plot_score_distribution(scores: list[float], path: Path, headline: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    # matplotlib's stubs type `bins` as a Sequence[float], which an ndarray of edges is not (it works at run time)
    ax.hist(scores, bins=cast(Sequence[float], np.linspace(-1, 1, 41)), color="#2e8b57")
    for t in THRESHOLDS:
        ax.axvline(t, color="#999", linestyle="--", linewidth=1)
    ax.set(xlabel=f"{headline} score", ylabel="neurons", title=f"Score distribution ({len(scores)} neurons)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_score_by_layer(by_layer: dict[int, list[float]], path: Path, headline: str) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(by_layer)), 4))
    layers = sorted(by_layer)
    if layers:
        ax.boxplot([by_layer[k] for k in layers], positions=layers, widths=0.6, showfliers=False)
        ax.plot(layers, [np.mean(by_layer[k]) for k in layers], "o-", color="#4682b4", label="mean")
        ax.legend()
    ax.set(xlabel="layer", ylabel=f"{headline} score", title="Score by layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_top_vs_random(top: list[float], random: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(top, random, s=8, alpha=0.6, color="#6a5acd")
    ax.plot([-1, 1], [-1, 1], color="#999", linewidth=1)
    ax.set(xlim=(-1, 1), ylim=(-1, 1), xlabel="score on top records", ylabel="score on random records",
           title=f"Top vs random ({len(top)} neurons)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_markdown(index: pa.Table, progress: Progress, *, run: str, headline: str,
                     best_per_layer: int = BEST_PER_LAYER, units: str | None = None) -> str:
    """The Markdown summary (pure: from the index and the progress; `units`: the run's units in one line,
    orchestrator/units.py `units_line`)."""
    scored = _done_scores(index)
    scores = scored["score"].to_numpy() if scored.num_rows else np.array([])
    p = progress
    lines = [f"# neuronsweep report: {run}", ""]
    if units:
        lines.append(f"- units: {units}")
    planned = f" of {p.planned} planned" if p.planned is not None else ""
    lines += [f"- neurons done: **{p.done}**{planned} (failed {p.failed}, skipped {p.skipped}, "
              f"pending {p.pending if p.pending is not None else 'unknown'})",
              f"- neurons with a defined {headline} score: {len(scores)}"]
    lines += _score_lines(scores)
    lines += _negative_lines(index, headline)
    per = p.processed or 0
    lines += [f"- tokens: {p.prompt_tokens:,} prompt + {p.completion_tokens:,} completion"
              + (f" = {(p.prompt_tokens + p.completion_tokens) / per:,.0f} per processed neuron" if per else ""),
              f"- cost: ${p.cost_usd:,.4f}" + (f" = ${p.cost_usd / per:.6f} per processed neuron" if per else ""), ""]

    lines += ["## Best neurons per layer", "", "| layer | neuron | score | explanation |", "|---|---|---|---|"]
    for layer in sorted(set(scored["layer"].to_pylist())) if scored.num_rows else []:
        part = scored.filter(pc.equal(scored["layer"], layer))
        order = pc.sort_indices(part, sort_keys=[("score", "descending"), ("neuron", "ascending")])
        for r in part.take(order.slice(0, best_per_layer)).to_pylist():
            text = (r.get("explanation") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {layer} | {r['neuron']} | {r['score']:.3f} | {text} |")
    lines += ["", "## Failures by reason", ""]
    if p.failures:
        lines += ["| reason | neurons |", "|---|---|"] + [f"| {k} | {v} |" for k, v in p.failures.items()]
    else:
        lines.append("none")
    lines += ["", "## Plots", "", "![score distribution](score_distribution.png)",
              "![score by layer](score_by_layer.png)", "![top vs random](top_vs_random.png)", ""]
    return "\n".join(lines)


def _negative_lines(index: pa.Table, headline: str) -> list[str]:
    """The negative sides' own figures (never mixed into the positive side's above)."""
    if "negative_explanation" not in index.column_names:
        return []
    done = index.filter(pc.equal(index["status"], "done"))
    sides = done.filter(pc.or_(pc.is_valid(done["negative_explanation"]), pc.is_valid(done["negative_null_reason"])))
    if not sides.num_rows:
        return ["- negative sides explained: 0 (docs/method.md §1 \"Both signs\"; the figures above are the "
                "positive side's)"]
    neg = [s for s in sides["negative_score"].to_pylist() if s is not None]
    failed = sides.num_rows - pc.sum(pc.is_valid(sides["negative_explanation"])).as_py()  # no explanation: failed
    scores = np.array(neg)
    lines = [f"- negative sides explained: **{sides.num_rows}** neurons ({failed} failed), with a defined "
             f"{headline} score: {len(neg)}; reported apart, the figures above are the positive side's"]
    return lines + _score_lines(scores, "negative side: ")


def _score_lines(scores: np.ndarray, side: str = "") -> list[str]:
    """The share of scores at each threshold, and their mean and median."""
    lines = []
    for t in THRESHOLDS:
        share = f"{(scores >= t).mean():.1%}" if len(scores) else "n/a"
        lines.append(f"- {side}share with score ≥ {t}: **{share}** ({int((scores >= t).sum())} neurons)")
    if len(scores):
        lines.append(f"- {side}mean score {scores.mean():.3f}, median {np.median(scores):.3f}")
    return lines


def write_report(store: RunStore, out_dir: str | Path, *, run_name: str | None = None) -> dict[str, Path]:
    """Write the plots and summary.md into `out_dir`; returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = RunReader(store)
    index, progress, headline = reader.index(), reader.progress(), reader.headline()
    scored = _done_scores(index)
    paths = {name: out / f"{name}.png" for name in ("score_distribution", "score_by_layer", "top_vs_random")}
    plot_score_distribution(scored["score"].to_pylist(), paths["score_distribution"], headline)
    by_layer: dict[int, list[float]] = {}
    for layer, s in zip(scored["layer"].to_pylist(), scored["score"].to_pylist()):
        by_layer.setdefault(layer, []).append(s)
    plot_score_by_layer(by_layer, paths["score_by_layer"], headline)
    both = scored.filter(pc.and_(pc.is_valid(scored["score_top"]), pc.is_valid(scored["score_random"]))) \
        if scored.num_rows else scored
    plot_top_vs_random(both["score_top"].to_pylist(), both["score_random"].to_pylist(), paths["top_vs_random"])
    paths["summary"] = out / "summary.md"
    paths["summary"].write_text(summary_markdown(index, progress, run=run_name or store.root, headline=headline,
                                                 units=units_line(recorded_source(store))))
    return paths
