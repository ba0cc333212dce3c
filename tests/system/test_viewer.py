"""The viewer: its pages through FastAPI's test client, then the real thing in a headless Chromium."""
from __future__ import annotations

import os
import re
import shutil
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from orchestrator.results.reader import neuron_detail
from orchestrator.results.viewer import create_app
from orchestrator.results.viewer.app import heat, score_histogram
from support.localnet import free_port
from support.runfactory import make_run
from support.system_tools import require_tool

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("viewer") / "run")


@pytest.fixture(scope="module")
def client(facts):
    return TestClient(create_app(facts.store.root, refresh_s=0))


def _row_keys(html: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r'data-layer="(\d+)" data-neuron="(\d+)"', html)]


def test_index_lists_every_processed_neuron_best_score_first(client, facts):
    html = client.get("/").text
    keys = _row_keys(html)
    assert set(keys) == facts.done | facts.failed | facts.skipped
    scores = [float(s) for s in re.findall(r'data-score="([^"]+)"', html)]
    defined = [s for s in scores if s == s]
    assert defined == sorted(defined, reverse=True) and scores[:len(defined)] == defined  # nulls last


def test_index_filters_by_layer_score_and_words(client, facts):
    keys = _row_keys(client.get("/", params={"layer": "1", "min_score": "0.9", "max_score": ""}).text)
    index = facts.store.read_table("scores").to_pylist()
    expected = {(r["layer"], r["neuron"]) for r in index if r["layer"] == 1 and (r["score"] or -2) >= 0.9}
    assert set(keys) == expected and expected
    keys = _row_keys(client.get("/", params={"q": "WORD code"}).text)
    assert keys and all(facts.topic(*k) == " code" for k in keys)
    assert client.get("/", params={"min_score": "abc"}).status_code == 400


def test_neuron_page_heat_map_cells_carry_the_true_and_simulated_values(client, facts):
    layer, neuron = sorted(facts.done - facts.undefined)[0]
    html = client.get(f"/neuron/{layer}/{neuron}").text
    d = neuron_detail(facts.store, layer, neuron)
    top_section = html[html.index('id="records-top"'):html.index('id="records-random"')]
    acts = [float(x) for x in re.findall(r'data-act="([^"]+)"', top_section)]
    assert acts == [a for r in d["records"]["top"] for a in r["activations"]]
    sims = [float(x) for x in re.findall(r'data-sim="([^"]+)"', html)]
    assert sims == [v for r in d["scored"]["correlation"] for v in r["simulated"]]
    assert d["explanations"][0]["explanation"] in html


def test_unknown_neuron_is_404_and_run_api_counts(client, facts):
    assert client.get("/neuron/99/0").status_code == 404
    run = client.get("/api/run").json()
    assert (run["progress"]["done"], run["progress"]["failed"], run["progress"]["skipped"]) == \
        (len(facts.done), len(facts.failed), len(facts.skipped))
    assert sum(run["histogram"]["counts"]) == len(facts.done - facts.undefined)


@pytest.mark.parametrize("url", ["/neuron/99999999999999999999/0", "/api/neuron/99999999999999999999/0",
                                 "/neuron/40000/0", "/neuron/0/99999999999", "/neuron/-1/0"])
def test_a_layer_or_neuron_no_table_can_hold_is_404(client, url):
    assert client.get(url).status_code == 404


def test_a_layer_filter_no_table_can_hold_is_400(client):
    assert client.get("/", params={"layer": "99999999999999999999"}).status_code == 400
    assert client.get("/api/neurons", params={"layer": "40000"}).status_code == 400


def test_heat_and_histogram_helpers():
    assert heat(2.0, 4.0) == "rgba(34, 139, 34, 0.500)"
    assert heat(-1.0, 4.0) == "transparent" and heat(1.0, 0.0) == "transparent"
    h = score_histogram([-1.0, 0.05, 0.95, 1.0])
    assert h["counts"][0] == 1 and h["counts"][10] == 1 and h["counts"][-1] == 2


# --- the real browser -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(facts):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(facts.store.root, refresh_s=0), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the viewer did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_in_chromium_search_open_a_neuron_and_read_its_heat_map(served, browser, facts, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(served + "/")
    assert page.locator("tr.neuron-row").count() == len(facts.done | facts.failed | facts.skipped)

    page.fill("#q", "river")
    page.click("#apply")
    page.wait_for_url(re.compile(r"q=river"))
    rows = page.locator("tr.neuron-row")
    found = {(int(rows.nth(i).get_attribute("data-layer")), int(rows.nth(i).get_attribute("data-neuron")))
             for i in range(rows.count())}
    assert found and all(facts.topic(*k) == " river" for k in found)
    assert found == {k for k in facts.done if facts.topic(*k) == " river"}

    layer, neuron = sorted(found)[0]
    page.click(f'tr[data-layer="{layer}"][data-neuron="{neuron}"] a')
    page.wait_for_url(re.compile(rf"/neuron/{layer}/{neuron}$"))
    d = neuron_detail(facts.store, layer, neuron)
    first = page.locator('#records-top .record[data-rank="0"] .tok')
    assert first.count() == len(d["records"]["top"][0]["tokens"])
    got = [float(first.nth(i).get_attribute("data-act")) for i in range(first.count())]
    assert got == d["records"]["top"][0]["activations"]
    peak = max(range(len(got)), key=got.__getitem__)
    assert first.nth(peak).inner_text() == d["records"]["top"][0]["tokens"][peak]
    assert first.nth(peak).evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
    sims = page.locator("#scored-correlation .tokens.simulated .tok")
    assert sims.count() == sum(len(r["simulated"]) for r in d["scored"]["correlation"])
    shot = tmp_path / "neuron.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page.goto(served + "/run")
    page.wait_for_function("window.chartsReady === true")
    assert page.locator("#done").inner_text() == str(len(facts.done))
    assert page.locator("canvas#histogram").bounding_box()["height"] > 50
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)
    if os.environ.get("NEURONSWEEP_SCREENSHOTS"):  # keep them for a human to look at
        for name in ("neuron.png", "run.png"):
            shutil.copy(tmp_path / name, os.path.join(os.environ["NEURONSWEEP_SCREENSHOTS"], name))
    assert errors == []
