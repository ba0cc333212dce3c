"""Validation of an OpenAI neuron-explainer layout folder before `import_openai` writes anything: pydantic models of
the two file kinds it reads (a NeuronRecord `.json`, a NeuronSimulationResults `.jsonl`), the exact file names it
expects, and `validate_openai`, which checks every file and raises one `OpenAIImportError` listing each bad file
with its reason.

Strict where the importer relies on it: tokens are strings, activations finite numbers (no null, no NaN), as many
activations as tokens, the required keys present, the top level an object. The statistics and scores may be NaN or
null (the published GPT-2 XL files hold `NaN` there); `Infinity` literals are rejected everywhere. Extra keys (such
as `dataclass_name`) are ignored."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NUMBER = re.compile(r"[0-9]+")
RECORD_FILE = re.compile(r"([0-9]+)\.json")
EXPLANATION_FILE = re.compile(r"([0-9]+)\.jsonl")
MAX_LISTED = 50  # problems shown in the error message (all of them stay on `OpenAIImportError.problems`)

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
StatFloat = Annotated[float, Field(strict=True)] | None  # NaN allowed (the importer stores it as null)
Token = Annotated[str, Field(strict=True)]


class OpenAIImportError(ValueError):
    """Files of an OpenAI-layout folder that cannot be imported; `problems` holds one "path: reason" each."""

    def __init__(self, src: Path | str, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_LISTED]
        more = [f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else []
        super().__init__("\n  ".join([f"{src}: {len(problems)} invalid file(s), nothing imported:", *shown, *more]))


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ActivationRecord(_Model):
    tokens: list[Token]
    activations: list[FiniteFloat]

    @model_validator(mode="after")
    def _same_length(self) -> ActivationRecord:
        if len(self.activations) != len(self.tokens):
            raise ValueError(f"{len(self.activations)} activations for {len(self.tokens)} tokens")
        return self


class NeuronRecord(_Model):
    most_positive_activation_records: list[ActivationRecord]
    random_sample: list[ActivationRecord] | None = None
    random_sample_by_quantile: list[list[ActivationRecord]] | None = None
    mean: StatFloat = None
    variance: StatFloat = None


class SequenceSimulation(_Model):
    tokens: list[Token]
    expected_activations: list[FiniteFloat | None]

    @model_validator(mode="after")
    def _same_length(self) -> SequenceSimulation:
        if len(self.expected_activations) != len(self.tokens):
            raise ValueError(f"{len(self.expected_activations)} expected_activations for {len(self.tokens)} tokens")
        return self


class ScoredSequenceSimulation(_Model):
    simulation: SequenceSimulation
    true_activations: list[FiniteFloat | None] | None = None
    ev_correlation_score: StatFloat = None

    @model_validator(mode="after")
    def _same_length(self) -> ScoredSequenceSimulation:
        if self.true_activations and len(self.true_activations) != len(self.simulation.tokens):
            raise ValueError(f"{len(self.true_activations)} true_activations for "
                             f"{len(self.simulation.tokens)} tokens")
        return self


class ScoredSimulation(_Model):
    scored_sequence_simulations: list[ScoredSequenceSimulation] | None = None
    ev_correlation_score: StatFloat = None
    rsquared_score: StatFloat = None
    absolute_dev_explained_score: StatFloat = None


class ScoredExplanation(_Model):
    explanation: Annotated[str, Field(strict=True)]
    scored_simulation: ScoredSimulation | None = None


class NeuronSimulationResults(_Model):
    scored_explanations: list[ScoredExplanation] | None = None


def _reject_constant(name: str) -> float:
    if name == "NaN":
        return float("nan")  # only where the models allow it (statistics, scores)
    raise ValueError(f"non-finite number literal {name}")


def load_json(text: str) -> Any:
    """`json.loads`, with NaN read as float NaN (for the models to accept or refuse) and Infinity refused."""
    return json.loads(text, parse_constant=_reject_constant)


def _reason(e: ValidationError) -> str:
    def one(err) -> str:
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        return f"{loc}: {msg}" if loc else msg
    errors = e.errors()
    return "; ".join(one(err) for err in errors[:3]) + (f"; ... ({len(errors)} errors)" if len(errors) > 3 else "")


def _check(path: Path, model: type[_Model], text: str | None = None) -> str | None:
    """The reason `path` (or the given text of it) is not a valid `model`, or None."""
    try:
        doc = load_json(path.read_text() if text is None else text)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        return f"invalid JSON: {e}"
    if not isinstance(doc, dict):
        return f"expected a JSON object at the top level, got {type(doc).__name__}"
    try:
        model.model_validate(doc)
    except ValidationError as e:
        return _reason(e)
    return None


def numbered(path: Path, pattern: re.Pattern[str] | None, problems: list[str]) -> list[tuple[int, Path]]:
    """The entries of `path` named `<int>` (directories, pattern None) or matching `pattern` (files), sorted by the
    number; every other entry is added to `problems` as unexpected (a stray `3.json.orig` likely duplicates records)."""
    out: list[tuple[int, Path]] = []
    if not path.is_dir():
        return out
    for p in sorted(path.iterdir()):
        m = (NUMBER if pattern is None else pattern).fullmatch(p.name)
        if m and (p.is_dir() if pattern is None else p.is_file()):
            out.append((int(m.group(0) if pattern is None else m.group(1)), p))
        else:
            want = "a <layer> folder" if pattern is None else f"a file named like {pattern.pattern}"
            problems.append(f"{p}: unexpected {'folder' if p.is_dir() else 'file'} (expected {want})")
    return sorted(out)


def validate_openai(rec_dir: Path, expl_dir: Path | None, src: Path | str) -> None:
    """Check every file under the records (and explanations) folder; raise one OpenAIImportError naming each bad
    file and why, before anything is written."""
    problems: list[str] = []
    for _, layer_dir in numbered(rec_dir, None, problems):
        for _, path in numbered(layer_dir, RECORD_FILE, problems):
            if (why := _check(path, NeuronRecord)) is not None:
                problems.append(f"{path}: {why}")
    if expl_dir is not None:
        for _, layer_dir in numbered(expl_dir, None, problems):
            for _, path in numbered(layer_dir, EXPLANATION_FILE, problems):
                try:
                    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
                except (OSError, UnicodeDecodeError) as e:
                    problems.append(f"{path}: unreadable: {e}")
                    continue
                if lines and (why := _check(path, NeuronSimulationResults, lines[0])) is not None:
                    problems.append(f"{path}: {why}")
    if problems:
        raise OpenAIImportError(src, problems)
