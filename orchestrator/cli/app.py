"""The `neuronsweep` command line. This is the edge: the only place that reads the environment.

Every config field can be set three ways, later winning: the config file (`--config`), `--set a.b=value`
(any field, dotted), and the named flags below for the common ones.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from schemas.config import ConfigError, SweepConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Explain and score every MLP neuron of a language model, at cluster scale.")
console = Console(stderr=True)
out = Console(soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="sweep config YAML file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override any field: a.b=value")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="subject model: hub id, path or smollm2-135m")]
CorpusOpt = Annotated[str | None, typer.Option("--corpus", help="pydoc | file/folder | hf:NAME")]
LayersOpt = Annotated[str | None, typer.Option("--layers", help="'all' or e.g. 0,3-5")]
NeuronsOpt = Annotated[str | None, typer.Option("--neurons", help="'all' or e.g. 0-99")]
OutOpt = Annotated[str | None, typer.Option("--out", "-o", help="run directory or s3:// URI")]
SeqLenOpt = Annotated[int | None, typer.Option("--seq-len", help="tokens per window")]
WindowsOpt = Annotated[int | None, typer.Option("--max-windows", help="cap on corpus windows")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster address (else RAY_ADDRESS, "
                                                                    "else in-process)")]


class CLIError(Exception):
    """A user-facing problem: printed as one line, exit code 2, no traceback."""


def parse_set(items: list[str] | None) -> dict[str, Any]:
    out_: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value (e.g. corpus.seq_len=32)")
        key, raw = item.split("=", 1)
        out_[key.strip()] = yaml.safe_load(raw) if raw != "" else None
    return out_


def build_config(config: Path | None = None, sets: list[str] | None = None, **flags: Any) -> SweepConfig:
    """Config file, then --set overrides, then the named flags that were given."""
    named = {"model": "model.name", "corpus": "corpus.source", "layers": "layers", "neurons": "neurons",
             "out": "output", "seq_len": "corpus.seq_len", "max_windows": "corpus.max_windows",
             "address": "ray_address"}
    overrides = parse_set(sets)
    for flag, value in flags.items():
        if value is not None:
            overrides[named[flag]] = value
    cfg = SweepConfig.load(config, overrides)
    from workers.method import check_config

    check_config(cfg)
    if cfg.ray_address is None and os.environ.get("RAY_ADDRESS"):
        cfg.ray_address = os.environ["RAY_ADDRESS"]
    return cfg


def checked_against_model(cfg: SweepConfig):
    """Resolve the subject model's shape and check the config against it, before any work starts."""
    from workers.models.loading import model_info

    info = model_info(cfg.model.name)
    cfg.check_against_model(info.n_layers, info.n_neurons, info.max_positions)
    return info


def env() -> dict[str, str]:
    """The environment, handed down explicitly to the parts that need a secret (never stored)."""
    return dict(os.environ)


def s3_options_from_env(e: dict) -> dict | None:
    """S3 endpoint and keys for s3:// outputs, from the environment only (never stored in run.json)."""
    endpoint = e.get("NEURONSWEEP_S3_ENDPOINT") or e.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    scheme, _, host = endpoint.rpartition("://")
    opts = {"endpoint_override": host or endpoint, "scheme": scheme or "https",
            "region": e.get("AWS_REGION", "us-east-1"), "allow_bucket_creation": True}
    if e.get("AWS_ACCESS_KEY_ID"):
        opts.update(access_key=e["AWS_ACCESS_KEY_ID"], secret_key=e.get("AWS_SECRET_ACCESS_KEY", ""))
    return opts


def open_run(run: str, *, create: bool = False):
    """The run store at a path or URI, with S3 options from the environment (every command opens runs here)."""
    from orchestrator.store import RunStore

    return RunStore.open(run, create=create, s3_options=s3_options_from_env(env()))


@app.command()
def info(model: ModelOpt = None, config: ConfigOpt = None, sets: SetOpt = None) -> None:
    """Print a model's architecture, layers and neurons (the default: the embedded SmolLM2-135M)."""
    cfg = build_config(config, sets, model=model)
    from workers.models.loading import model_info

    with console.status(f"resolving {escape(cfg.model.name)} (the first use converts the embedded model once)"):
        i = model_info(cfg.model.name)
    out.print(f"model         {i.name}", markup=False)
    out.print(f"architecture  {i.architecture}", markup=False)
    out.print(f"layers        {i.n_layers}")
    out.print(f"neurons/layer {i.n_neurons:,}")
    out.print(f"total neurons {i.total_neurons:,}  ({i.n_layers} x {i.n_neurons:,})")
    out.print(f"context       {i.max_positions}")


@app.command("config")
def config_cmd(config: ConfigOpt = None, sets: SetOpt = None, model: ModelOpt = None, corpus: CorpusOpt = None,
               layers: LayersOpt = None, neurons: NeuronsOpt = None, out_dir: OutOpt = None,
               print_: Annotated[bool, typer.Option("--print", help="print the resolved config as YAML")] = True,
               check: Annotated[bool, typer.Option("--check/--no-check",
                                                   help="also check layers/neurons against the model")] = False,
               ) -> None:
    """Resolve a config (file + overrides + flags) and print it as YAML."""
    cfg = build_config(config, sets, model=model, corpus=corpus, layers=layers, neurons=neurons, out=out_dir)
    if check:
        checked_against_model(cfg)
    if print_:
        out.print(cfg.to_yaml(), end="", markup=False, highlight=False)


def _register_commands() -> None:
    """Each capability keeps its commands in its own module; importing it adds them to `app`."""
    import importlib

    for name in ("orchestrator.cli.extract", "orchestrator.cli.sweep", "orchestrator.cli.view"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def main(argv: list[str] | None = None) -> int:
    from schemas.tables import SchemaVersionError
    from workers.extract.corpus import CorpusError
    from workers.extract.errors import ExtractError
    from workers.models.loading import ModelLoadError

    _register_commands()
    try:
        app(args=argv, standalone_mode=False)
    except (ConfigError, CLIError, CorpusError, ExtractError, ModelLoadError, SchemaVersionError) as e:
        # escaped: a message may hold brackets (`pip install 'neuronsweep[viewer]'`) that are not markup
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        return 130
    except SystemExit as e:  # typer/click usage errors already printed
        return int(e.code or 0)
    except Exception as e:
        # usage errors (unknown option, bad value) from typer's bundled click: print them, no traceback
        show, exit_code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            return exit_code
        raise
    return 0


if __name__ == "__main__":
    # run as `python -m orchestrator.cli.app`: go through the importable module, where the commands register
    from orchestrator.cli.app import main as _main

    sys.exit(_main())
