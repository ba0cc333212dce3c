"""`neuronsweep report`: the plots are real PNG images and the summary's numbers are the run's."""
from __future__ import annotations

import struct

import pyarrow as pa

from orchestrator.results.index import Progress
from orchestrator.results.report import summary_markdown, write_report
from support.runfactory import make_run

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_three_plots_and_a_summary(tmp_path):
    facts = make_run(tmp_path / "run")
    paths = write_report(facts.store, tmp_path / "report", run_name="demo")
    for name in ("score_distribution", "score_by_layer", "top_vs_random"):
        w, h = _png_size(paths[name])
        assert w >= 400 and h >= 300 and paths[name].stat().st_size > 5_000
    text = paths["summary"].read_text()
    scores = [r["score"] for r in facts.store.read_table("scores").to_pylist() if r["score"] is not None]
    high = sum(s >= 0.8 for s in scores)
    assert f"neurons done: **{len(facts.done)}** of 24 planned (failed 3, skipped 1, pending 0)" in text
    assert f"share with score ≥ 0.8: **{high / len(scores):.1%}** ({high} neurons)" in text
    assert "| malformed | 2 |" in text and "| rate_limited | 1 |" in text
    best = max((r for r in facts.store.read_table("scores").to_pylist() if r["layer"] == 2 and r["score"]),
               key=lambda r: r["score"])
    assert f"| 2 | {best['neuron']} | {best['score']:.3f} |" in text


def test_report_of_a_run_with_nothing_scored_yet_still_writes_its_files(tmp_path):
    facts = make_run(tmp_path / "run", layers=(0,), commit_layers=())
    paths = write_report(facts.store, tmp_path / "report")
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert "neurons done: **0** of 8 planned" in paths["summary"].read_text()


def test_summary_shares_leave_out_undefined_scores():
    index = pa.table({"layer": pa.array([0, 0, 1, 1, 1], pa.int16()), "neuron": pa.array([0, 1, 0, 1, 2], pa.int32()),
                      "status": ["done", "done", "done", "done", "failed"],
                      "score": pa.array([0.9, 0.6, 0.3, None, None], pa.float64()),
                      "explanation": ["a | b", "c", "d", None, None]})
    p = Progress(planned=10, done=4, failed=1, prompt_tokens=800, completion_tokens=200, cost_usd=0.5,
                 failures={"RateLimitError": 1})
    md = summary_markdown(index, p, run="r", headline="correlation")
    assert "share with score ≥ 0.8: **33.3%** (1 neurons)" in md
    assert "share with score ≥ 0.5: **66.7%** (2 neurons)" in md
    assert "= 200 per processed neuron" in md and "$0.100000 per processed neuron" in md
    assert "| 0 | 0 | 0.900 | a \\| b |" in md and "pending 5" in md


def test_report_and_view_commands(tmp_path, capsys):
    import orchestrator.cli.view  # noqa: F401  (registers the commands)
    from orchestrator.cli.app import main

    facts = make_run(tmp_path / "run", layers=(0,))
    assert main(["report", facts.store.root, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "summary.md").read_text().startswith(f"# neuronsweep report: {facts.store.root}")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["view", str(tmp_path / "missing")]) == 2  # refused before any server starts
    assert "not a neuronsweep run directory" in capsys.readouterr().err
