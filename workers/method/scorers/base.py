"""What a scorer is (docs/method.md §6): one class with a `name`, what it needs, and `score(ctx)`, which
returns rows for the `scores` table. `workers.method.neuron` builds the context once per neuron, runs every
configured scorer and adds the neuron's identity (layer, neuron, candidate, simulator_model) to each row; a
row's own keys win, so a scorer may set `simulator_model` itself.
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from schemas.config import SweepConfig
from workers.llm.backends.base import LLMBackend, Usage
from workers.method.explainer import explainer_records
from workers.method.records import ActivationRecord, NeuronRecords
from workers.method.simulator import NeuronSimulator, Simulation


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray: ...  # (n, d), rows of unit length


@dataclass
class ScoreContext:
    """Everything a scorer may use for one neuron. The simulations are filled only when a configured scorer
    sets `needs_simulation`."""
    explanation: str  # the selected candidate's text
    records: NeuronRecords
    splits: dict[str, list[ActivationRecord]]  # train / calibration / valid / test (docs/method.md §2)
    cfg: SweepConfig
    seed: int  # stable per neuron: shuffles windows reproducibly
    simulator: NeuronSimulator
    judge: LLMBackend  # answers the detection/fuzzing questions (the simulator's backend)
    embedder: Embedder | None = None
    valid_simulation: Simulation | None = None  # the explanation simulated on the valid split
    calibration_simulation: Simulation | None = None  # ... and on the calibration split
    candidate_scores: dict[str, float | None] = field(default_factory=dict)  # best-of-k calibration correlations
    spent: list[Usage] = field(default_factory=list)  # usage of every judge call, failed ones included

    @property
    def valid(self) -> list[ActivationRecord]:
        return self.splits["valid"]

    @property
    def activating(self) -> list[ActivationRecord]:
        """The valid split's top records."""
        return [r for r in self.valid if r.kind == "top"]

    @property
    def quiet(self) -> list[ActivationRecord]:
        """Windows where the neuron stays at or below 0 on every token (from all its random records)."""
        return non_activating(self.records.random)

    def classifier_windows(self) -> ClassifierWindows:
        """The activating and non-activating windows of detection, fuzzing and embedding (`classifier_windows`)."""
        return classifier_windows(self.records, self.splits, self.cfg)


@dataclass
class ClassifierWindows:
    """What detection, fuzzing and embedding label (docs/method.md §6), and how it was chosen (`settings`)."""
    activating: list[ActivationRecord]
    non_activating: list[ActivationRecord]
    settings: dict


def classifier_windows(records: NeuronRecords, splits: dict[str, list[ActivationRecord]],
                       cfg: SweepConfig) -> ClassifierWindows:
    """`classifier.examples: stratified` with classifier windows in the records: the stratified windows (less any
    the explainer was shown) against the extracted non-activating ones. Otherwise (`top`, or records without
    classifier windows: an older run, a negative side) the valid split's top records against the random records
    whose every activation is below `non_activating_below` x the neuron's maximum (its top record's max)."""
    c = cfg.classifier
    settings: dict = {"non_activating_below": c.non_activating_below, "n_non_activating_wanted": c.n_non_activating}
    shown = {r.seq_id for r in explainer_records(records, splits, cfg)}
    if c.examples == "stratified" and (records.stratified or records.non_activating):
        activating = [r for r in records.stratified if r.seq_id not in shown]
        settings.update(protocol="stratified", bins=c.bins, per_bin=c.per_bin,
                        shown_to_explainer_left_out=len(records.stratified) - len(activating))
        return ClassifierWindows(activating, records.non_activating[:c.n_non_activating], settings)
    neuron_max = max((r.max_activation for r in records.top), default=-math.inf)
    cut = c.non_activating_below * neuron_max
    quiet = [r for r in records.random
             if neuron_max > 0 and r.activations and all(x < cut for x in r.activations)]  # NaN: not below
    settings["protocol"] = "top"
    if c.examples == "stratified":
        settings["fallback"] = "the records hold no classifier windows"
    return ClassifierWindows([r for r in splits["valid"] if r.kind == "top" and r.seq_id not in shown],
                             quiet[:c.n_non_activating], settings)


class Scorer(ABC):
    name: ClassVar[str]  # the value of `scorers:` in the config and of the `scorer` column
    needs_simulation: ClassVar[bool] = False  # the valid and calibration splits simulated with the explanation
    needs_judge: ClassVar[bool] = False  # asks `ctx.judge` questions (LLM calls)
    needs_embedder: ClassVar[bool] = False  # uses `ctx.embedder`; the caller must load one
    uses_classifier_windows: ClassVar[bool] = False  # reads `ctx.classifier_windows()` (extraction picks them)

    @abstractmethod
    async def score(self, ctx: ScoreContext) -> list[dict]:
        """Rows for the `scores` table (columns of schemas/tables.py SCORES); an undefined score is None
        with a `null_reason`. LLMError propagates and fails the neuron."""


def non_activating(records: list[ActivationRecord]) -> list[ActivationRecord]:
    """Windows where the neuron stays at or below 0 on every token (a NaN is not "at or below 0")."""
    return [r for r in records if r.activations and all(x <= 0 for x in r.activations)]


def settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=float)


def score_row(scorer: str, mode: str, settings: dict, usage: Usage | None = None, **columns) -> dict:
    """One row: the scorer's name, how it scored (`simulator_mode`), its settings as JSON, its columns, and
    the tokens it spent when it called an LLM."""
    row = {"scorer": scorer, "simulator_mode": mode, "settings": settings_json(settings), **columns}
    if usage is not None:
        row.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
    return row
