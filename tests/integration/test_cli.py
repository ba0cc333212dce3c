import re
import sys

import pytest

from orchestrator.cli.app import main
from support.cli import run_cli

COMMANDS = {"info", "config", "extract", "sweep", "resume", "status", "show", "explain", "view", "report", "export",
            "import"}


def run(*args):
    return run_cli(*args, timeout=120)


def help_commands(help_text: str) -> list[str]:
    """The command names in the Commands panel of the top-level help (one per row; wrapped rows start blank)."""
    panel = help_text[help_text.index("Commands"):]
    panel = panel[:panel.index("╰")]
    return re.findall(r"^│ ([a-z][a-z-]*) ", panel, flags=re.M)


def test_help_lists_every_command_once():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    names = help_commands(r.stdout)
    assert sorted(names) == sorted(COMMANDS)


def test_info_on_a_tiny_model(capsys):
    assert main(["info", "--model", "tiny-llama"]) == 0
    assert "total neurons 128  (2 x 64)" in capsys.readouterr().out


@pytest.mark.real_model
def test_info_default_model():
    r = run("info")
    assert r.returncode == 0, r.stderr
    assert "total neurons 46,080  (30 x 1,536)" in r.stdout


def test_config_print_resolves_file_sets_and_flags(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\ncorpus: {seq_len: 32}\n")
    assert main(["config", "-c", str(f), "--set", "corpus.max_windows=10", "--layers", "0-1"]) == 0
    text = capsys.readouterr().out
    assert "seed: 3" in text and "seq_len: 32" in text and "max_windows: 10" in text and "layers: 0-1" in text


@pytest.mark.parametrize("args, msg", [
    (["config", "--set", "records.top_k=3"], "records.top_k=3 must be at least"),
    (["config", "--set", "corpus.nope=1"], "corpus.nope: unknown key"),
    (["config", "--model", "tiny-gpt2", "--layers", "9", "--check"], "layers: layer 9 is out of range"),
    (["config", "--model", "tiny-gpt2", "--set", "corpus.seq_len=1000", "--check"], "longer than the model's context"),
])
def test_bad_config_is_one_line_no_traceback(args, msg):
    r = run(*args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command, blocked, extra", [
    ("view", "jinja2", "viewer"), ("view", "fastapi", "viewer"), ("report", "matplotlib", "report")])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys, command, blocked, extra):
    monkeypatch.setitem(sys.modules, blocked, None)  # find_spec (and import) then treat it as not installed
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: `neuronsweep {command}` needs {blocked}: pip install 'neuronsweep[{extra}]'"
