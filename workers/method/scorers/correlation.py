"""correlation (docs/method.md §6): simulated vs true activations on the valid split (overall, top part,
random part, per record), with r2/absdev calibrated on the calibration split."""
from __future__ import annotations

from workers.method.records import ActivationRecord
from workers.method.scorers.base import ScoreContext, Scorer, score_row
from workers.method.scoring import calibrated_scores, correlation_score, undefined_reason


def _reasons(**named: str | None) -> str | None:
    return "; ".join(f"{k}: {v}" for k, v in named.items() if v) or None


def correlation_columns(valid: list[ActivationRecord], simulated: list[list[float]],
                        calibration: list[ActivationRecord], cal_simulated: list[list[float]]) -> dict:
    """score (one correlation over the concatenated valid split), score_top, score_random, per_sequence,
    r2 and absdev (calibrated on the calibration split), with a null_reason naming every null column.
    `_calibration` holds the fit (a, b); the scorer moves it into the settings."""
    true = [r.activations for r in valid]

    def part(kind: str) -> tuple[float | None, str | None]:
        idx = [i for i, r in enumerate(valid) if r.kind == kind]
        if not idx:
            return None, f"no {kind} records in the split"
        t, s = [true[i] for i in idx], [simulated[i] for i in idx]
        return correlation_score(t, s), undefined_reason(t, s)

    top, top_reason = part("top")
    rnd, rnd_reason = part("random")
    cal = calibrated_scores([r.activations for r in calibration], cal_simulated, true, simulated)
    cal_reason = cal["null_reason"]
    return {
        "score": correlation_score(true, simulated),
        "score_top": top, "score_random": rnd,
        "r2": cal["r2"], "absdev": cal["absdev"],
        "per_sequence": [correlation_score([t], [s]) for t, s in zip(true, simulated, strict=True)],
        "seq_ids": [r.seq_id for r in valid],
        "simulated": [[float(x) for x in s] for s in simulated],
        "null_reason": _reasons(score=undefined_reason(true, simulated),
                                score_top=top_reason if top is None else None,
                                score_random=rnd_reason if rnd is None else None,
                                calibration=cal_reason),
        "_calibration": {"a": cal["a"], "b": cal["b"]},
    }


class CorrelationScorer(Scorer):
    name = "correlation"
    needs_simulation = True

    async def score(self, ctx: ScoreContext) -> list[dict]:
        sim, cal_sim = ctx.valid_simulation, ctx.calibration_simulation
        assert sim is not None and cal_sim is not None, "the method simulates both splits for this scorer"
        cols = correlation_columns(ctx.valid, sim.values, ctx.splits["calibration"], cal_sim.values)
        settings = {**ctx.simulator.settings(), "split": "valid", "calibration": cols.pop("_calibration"),
                    "best_of": ctx.cfg.explainer.best_of, "candidate_calibration_scores": ctx.candidate_scores}
        return [score_row(self.name, ctx.simulator.mode, settings, sim.usage + cal_sim.usage, **cols)]
