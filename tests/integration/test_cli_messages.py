"""What the CLI prints: paths and names the user gave appear as given, never read as rich markup, and `view`
opens an s3:// run through the same S3 endpoint and keys (from the environment) as every other command."""
from __future__ import annotations

import pyarrow.fs as pafs
import pytest
import uvicorn
from fastapi.testclient import TestClient

from orchestrator.cli.app import main
from support.runfactory import make_run

MARKUP = ["[/draft]", "[bold red]"]  # the first is a closing tag rich cannot match, the second a style


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize("markup", MARKUP)
def test_an_error_names_the_run_path_as_given(tmp_path, capsys, markup):
    run = str(tmp_path / f"runs{markup}x")
    assert main(["status", run]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run} is not a neuronsweep run directory") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("markup", MARKUP)
def test_a_corpus_error_names_the_file_as_given(tmp_path, capsys, markup):
    corpus = tmp_path / f"c{markup}.txt"
    args = ["extract", "--local", "--model", "tiny-gpt2", "--corpus", str(corpus), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert last_line(capsys.readouterr().err) == f"error: corpus.source: {corpus} does not exist"


def test_paths_in_success_messages_print_as_given(tmp_path, capsys):
    run = make_run(tmp_path / "run[bold red]").store.root
    report_dir = tmp_path / "report[/draft]"
    assert main(["report", run, "--out", str(report_dir)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed and all(f" {report_dir}/" in line for line in printed)
    exported = tmp_path / "export[bold]"
    assert main(["export", run, str(exported)]) == 0
    assert last_line(capsys.readouterr().out).endswith(f"explanation files under {exported}")
    imported = tmp_path / "import[/x]"
    assert main(["import", str(exported), "--out", str(imported)]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first.endswith(f"into {imported}") and second.startswith(f"a sweep with --out {imported} now")


def test_view_reads_an_s3_run_through_the_endpoint_the_environment_names(tmp_path, monkeypatch, capsys):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        facts = make_run(tmp_path / "run")
        s3 = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="test",
                               secret_key="test", region="us-east-1", allow_bucket_creation=True)
        s3.create_dir("viewed-runs")  # a bucket no other test uses: moto keeps its state process-wide
        pafs.copy_files(facts.store.root, "viewed-runs/run1", destination_filesystem=s3)
        monkeypatch.setenv("NEURONSWEEP_S3_ENDPOINT", f"http://{host}:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        served = []
        monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
        assert main(["view", "s3://viewed-runs/run1", "--port", "8999"]) == 0
        ((app, kw),) = served
        assert (kw["host"], kw["port"]) == ("127.0.0.1", 8999)
        assert capsys.readouterr().out.startswith("neuronsweep viewer for s3://viewed-runs/run1 at http://127.0.0.1:8999/")
        client = TestClient(app)
        progress = client.get("/api/run").json()["progress"]
        assert (progress["done"], progress["failed"]) == (len(facts.done), len(facts.failed))
        layer, neuron = sorted(facts.done)[0]
        assert client.get(f"/api/neuron/{layer}/{neuron}").status_code == 200
    finally:
        server.stop()
