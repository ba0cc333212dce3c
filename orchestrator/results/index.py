"""The run's neuron index and what is computed from it: pure functions over Arrow tables, no files.

`build_index` joins the ledger (each neuron's latest row) with the selected explanation and the headline
score of its positive side, and of its negative side where it has one (docs/method.md §1 "Both signs");
`query_index` pages, filters and searches it; `summarize_progress` counts it against the plan. The
reader (reader.py) feeds them the tables it reads from a run directory; `neuronsweep status/show`, the viewer
and the report share them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.tables import NEGATIVE, POSITIVE, TABLES

HEADLINE_SCORER = "correlation"
SCORE_COLUMNS = ["score", "score_top", "score_random", "r2", "absdev", "null_reason", "simulator_model",
                 "simulator_mode"]
SORTABLE = ("score", "layer", "neuron", "score_top", "score_random", "r2", "absdev", "cost_usd", "negative_score")
SPEND_COLUMNS = ("prompt_tokens", "completion_tokens", "cost_usd")  # summed over a neuron's ledger rows


def last_per_key(table: pa.Table, keys: list[str], order: list[str]) -> pa.Table:
    """For each distinct value of `keys`, the row that sorts last by `order` (ascending, nulls first)."""
    if table.num_rows == 0:
        return table
    sort = [(k, "ascending", "at_start") for k in keys + order]
    t = table.take(pc.sort_indices(table, sort_keys=sort))
    same_as_next = np.ones(t.num_rows, dtype=bool)
    for k in keys:
        col = t.column(k).to_numpy(zero_copy_only=False)
        same_as_next[:-1] &= col[:-1] == col[1:]
    same_as_next[-1] = False
    return t.filter(pa.array(~same_as_next))


def latest_ledger(ledger: pa.Table) -> pa.Table:
    """Each neuron's latest ledger row; at equal times a done row wins over a failed one."""
    rank = pc.if_else(pc.equal(ledger["status"], "done"), 2, pc.if_else(pc.equal(ledger["status"], "skipped"), 1, 0))
    return last_per_key(ledger.append_column("_rank", rank), ["layer", "neuron"], ["updated_at", "_rank"]) \
        .drop_columns(["_rank"])


def _prefer_ledger_shard(table: pa.Table, ledger: pa.Table, keys: list[str], order: list[str]) -> pa.Table:
    """One row per `keys`, preferring rows written by the shard the ledger's latest row names (a neuron swept
    again, e.g. after an import, has rows in two shards), then the last by `order`."""
    shards = ledger.select(["layer", "neuron", "shard_id"])
    t = table.join(shards, ["layer", "neuron"], join_type="left outer")
    match = pc.fill_null(pc.equal(t["shard"], t["shard_id"]), False)
    t = t.append_column("_match", match).drop_columns(["shard_id"])
    return last_per_key(t, keys, ["_match", *order]).drop_columns(["_match"])


def side(table: pa.Table, polarity: str) -> pa.Table:
    """The rows of one side of the units (`polarity`); a row without one (a table from before schema 1.4, when
    only the positive side was explained) is positive."""
    if "polarity" not in table.column_names:
        return table if polarity == POSITIVE else table.slice(0, 0)
    return table.filter(pc.equal(pc.fill_null(table["polarity"], POSITIVE), polarity))


def build_index(ledger: pa.Table, explanations: pa.Table, scores: pa.Table,
                headline: str = HEADLINE_SCORER) -> pa.Table:
    """One row per neuron in the ledger: its latest status, its positive side's selected explanation, `headline`
    score (columns `score`, `score_top`, ...) and the plain score of every other scorer (`<scorer>_score`), and
    its negative side's selected explanation and `headline` score (`negative_explanation`, `negative_score`,
    null where it has none). Its tokens and cost are the sums over all its ledger rows (both sides; a failed
    attempt that a retry redid was paid for too).

    Every input has `layer`, `neuron` and a `shard` column (the file's shard id, or null)."""
    negative_expl, negative_scores = side(explanations, NEGATIVE), side(scores, NEGATIVE)
    explanations, scores = side(explanations, POSITIVE), side(scores, POSITIVE)
    led = latest_ledger(ledger)
    spend = [c for c in SPEND_COLUMNS if c in ledger.column_names]
    if spend and led.num_rows < ledger.num_rows:  # some neuron has more than one row
        totals = ledger.group_by(["layer", "neuron"]).aggregate([(c, "sum") for c in spend])
        totals = totals.rename_columns([c.removesuffix("_sum") for c in totals.column_names])
        led = led.drop_columns(spend).join(totals.select(["layer", "neuron", *spend]), ["layer", "neuron"])
    idx = led.drop_columns([c for c in ("shard", "updated_at") if c in led.column_names])

    sel = explanations.filter(pc.fill_null(explanations["selected"], True)) if explanations.num_rows else explanations
    if sel.num_rows:
        sel = _prefer_ledger_shard(sel, led, ["layer", "neuron"], ["created_at", "candidate"])
        sel = sel.select(["layer", "neuron", "explanation", "explainer_model"])
        idx = idx.join(sel, ["layer", "neuron"], join_type="left outer")
    else:
        idx = idx.append_column("explanation", pa.nulls(idx.num_rows, pa.string())) \
                 .append_column("explainer_model", pa.nulls(idx.num_rows, pa.string()))

    best = _prefer_ledger_shard(scores, led, ["layer", "neuron", "scorer"], ["candidate"]) if scores.num_rows \
        else scores
    head = best.filter(pc.equal(best["scorer"], headline)) if best.num_rows else best
    if head.num_rows:
        idx = idx.join(head.select(["layer", "neuron", *SCORE_COLUMNS]), ["layer", "neuron"], join_type="left outer")
    else:
        for c in SCORE_COLUMNS:
            idx = idx.append_column(c, pa.nulls(idx.num_rows, TABLES["scores"].field(c).type))
    other = sorted(set(best["scorer"].to_pylist()) - {headline}) if best.num_rows else []
    for scorer in other:
        part = best.filter(pc.equal(best["scorer"], scorer)).select(["layer", "neuron", "score"]) \
            .rename_columns(["layer", "neuron", f"{scorer}_score"])
        idx = idx.join(part, ["layer", "neuron"], join_type="left outer")
    idx = _join_negative(idx, led, negative_expl, negative_scores, headline)
    order = pc.sort_indices(idx, sort_keys=[("layer", "ascending"), ("neuron", "ascending")])
    return idx.take(order).combine_chunks()


def _join_negative(idx: pa.Table, led: pa.Table, expl: pa.Table, scores: pa.Table, headline: str) -> pa.Table:
    """`negative_explanation` and `negative_score` (with its `negative_null_reason`) of each neuron."""
    if expl.num_rows:
        sel = expl.filter(pc.fill_null(expl["selected"], True))
        sel = _prefer_ledger_shard(sel, led, ["layer", "neuron"], ["created_at", "candidate"]) \
            .select(["layer", "neuron", "explanation"]).rename_columns(["layer", "neuron", "negative_explanation"])
        idx = idx.join(sel, ["layer", "neuron"], join_type="left outer")
    else:
        idx = idx.append_column("negative_explanation", pa.nulls(idx.num_rows, pa.string()))
    head = scores.filter(pc.equal(scores["scorer"], headline)) if scores.num_rows else scores
    if head.num_rows:
        head = _prefer_ledger_shard(head, led, ["layer", "neuron"], ["candidate"]) \
            .select(["layer", "neuron", "score", "null_reason"]) \
            .rename_columns(["layer", "neuron", "negative_score", "negative_null_reason"])
        return idx.join(head, ["layer", "neuron"], join_type="left outer")
    return idx.append_column("negative_score", pa.nulls(idx.num_rows, pa.float64())) \
        .append_column("negative_null_reason", pa.nulls(idx.num_rows, pa.string()))


def query_index(index: pa.Table, *, layer: int | None = None, min_score: float | None = None,
                max_score: float | None = None, text: str | None = None, status: str | None = None,
                sort: str = "score", descending: bool = True, offset: int = 0,
                limit: int = 50) -> tuple[pa.Table, int]:
    """One page of the index and the number of rows that match. `text` matches neurons with an explanation (of
    either side) that contains every one of its words (case-insensitive). A score range leaves out null scores.
    Nulls sort last."""
    mask = None

    def both(m):
        nonlocal mask
        mask = m if mask is None else pc.and_kleene(mask, m)

    if layer is not None:
        both(pc.equal(index["layer"], layer))
    if status:
        both(pc.equal(index["status"], status))
    if min_score is not None:
        both(pc.greater_equal(index["score"], min_score))
    if max_score is not None:
        both(pc.less_equal(index["score"], max_score))
    words = (text or "").split()
    sides = [c for c in ("explanation", "negative_explanation") if c in index.column_names]
    if words and sides:
        masks = []
        for c in sides:
            m = pc.match_substring(index[c], words[0], ignore_case=True)
            for word in words[1:]:
                m = pc.and_kleene(m, pc.match_substring(index[c], word, ignore_case=True))
            masks.append(pc.fill_null(m, False))
        both(masks[0] if len(masks) == 1 else pc.or_(*masks))
    t = index if mask is None else index.filter(pc.fill_null(mask, False))
    if sort not in SORTABLE or sort not in t.column_names:
        sort = "score"
    direction = "descending" if descending else "ascending"
    keys = [(sort, direction)] + [(k, "ascending") for k in ("layer", "neuron") if k != sort]
    top = offset + limit
    if t.num_rows > 4 * top:  # the first pages: a partial sort (select-k) of the rows with a value is cheaper
        valued = t.filter(pc.is_valid(t[sort]))
        if valued.num_rows >= top:
            head = valued.take(pc.select_k_unstable(valued, k=top, sort_keys=keys))
            return head.take(pc.sort_indices(head, sort_keys=keys)).slice(offset, limit), t.num_rows
    order = pc.sort_indices(t, sort_keys=[(k, d, "at_end") for k, d in keys])
    return t.take(order.slice(offset, limit)), t.num_rows


@dataclass
class Progress:
    planned: int | None
    done: int = 0
    failed: int = 0
    skipped: int = 0
    extracted: bool = False
    shards_committed: int = 0
    n_shards: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    scored: int = 0  # done neurons with a defined headline score
    mean_score: float | None = None
    by_layer: dict[int, dict] = field(default_factory=dict)  # layer -> {done, failed, skipped, mean_score}
    failures: dict[str, int] = field(default_factory=dict)   # reason -> count

    @property
    def processed(self) -> int:
        return self.done + self.failed + self.skipped

    @property
    def pending(self) -> int | None:
        return None if self.planned is None else max(0, self.planned - self.processed)

    @property
    def fraction(self) -> float | None:
        return None if not self.planned else self.processed / self.planned

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(processed=self.processed, pending=self.pending, fraction=self.fraction)
        return d


def summarize_progress(index: pa.Table, run: dict | None = None, *, extracted: bool = False,
                       shards_committed: int = 0) -> Progress:
    """Counts, spend and scores of an index (see `build_index`), against the plan in run.json when given."""
    plan = (run or {}).get("plan") or {}
    p = Progress(planned=plan.get("n_neurons"), n_shards=plan.get("n_shards") or
                 (len(plan["shards"]) if isinstance(plan.get("shards"), list) else None),
                 extracted=extracted, shards_committed=shards_committed)
    rows = index.select([c for c in ("layer", "status", "reason", "score", "prompt_tokens", "completion_tokens",
                                     "cost_usd") if c in index.column_names]).to_pylist()
    scores = []
    for r in rows:
        layer = p.by_layer.setdefault(int(r["layer"]), {"done": 0, "failed": 0, "skipped": 0, "_scores": []})
        status = r["status"] if r["status"] in ("done", "failed", "skipped") else "failed"
        layer[status] += 1
        setattr(p, status, getattr(p, status) + 1)
        p.prompt_tokens += r.get("prompt_tokens") or 0
        p.completion_tokens += r.get("completion_tokens") or 0
        p.cost_usd += r.get("cost_usd") or 0.0
        if status == "failed":
            reason = r.get("reason") or "error"  # a ledger written before schema 1.2 stored no reason
            p.failures[reason] = p.failures.get(reason, 0) + 1
        if status == "done" and r.get("score") is not None:
            scores.append(r["score"])
            layer["_scores"].append(r["score"])
    for layer in p.by_layer.values():
        s = layer.pop("_scores")
        layer["mean_score"] = float(np.mean(s)) if s else None
        layer["scored"] = len(s)
    p.by_layer = dict(sorted(p.by_layer.items()))
    p.failures = dict(sorted(p.failures.items(), key=lambda kv: (-kv[1], kv[0])))
    p.scored = len(scores)
    p.mean_score = float(np.mean(scores)) if scores else None
    return p
