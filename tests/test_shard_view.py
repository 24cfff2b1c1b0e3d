"""The shard view the Airflow plugin serves, over real HTTP handling (FastAPI's test client)
against a real state DB."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from test_select import build_all

from facecaption.core.pipeline import Pipeline
from facecaption.core.stage import stage_registry

STAGES = list(stage_registry())


@pytest.fixture
def client(tmp_path, settings, settings_env, sample, sample_site, monkeypatch, airflow_db):
    from facecaption_airflow.shard_view import create_app
    from facecaption_plugin import FacecaptionPlugin

    assert FacecaptionPlugin.fastapi_apps[0]["url_prefix"] == "/facecaption"
    settings, shard_ids, _ = build_all(tmp_path, settings, sample, sample_site)
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    with Pipeline.open(settings) as pipeline:
        state = pipeline.state
        with state.claim(shard_ids[1], "caption"):
            attempt = state.mark_running(shard_ids[1], "caption", "fp", "worker-7")
            state.mark_failed(shard_ids[1], "caption", attempt, "RuntimeError: GPU fell over")
    return TestClient(create_app()), shard_ids


def test_shard_view_lists_every_shard_and_stage_status(client):
    http, shard_ids = client
    page = http.get("/shards")
    assert page.status_code == 200
    rows = re.findall(r'<tr data-shard="([^"]+)">', page.text)
    assert rows == shard_ids
    statuses = re.findall(r'<span class="status"[^>]*>([^<]+)</span>', page.text)
    assert len(statuses) == 3 * len(STAGES) and statuses.count("failed") == 1
    assert "done 7/8" in statuses
    assert "RuntimeError: GPU fell over" in page.text  # the last error, on hover


def test_shard_view_filters_by_status_stage_and_id(client):
    http, shard_ids = client
    failed = http.get("/shards", params={"status": "failed", "stage": "caption"}).text
    assert re.findall(r'<tr data-shard="([^"]+)">', failed) == [shard_ids[1]]
    assert "1 of 3 shards" in failed
    by_id = http.get("/shards", params={"q": shard_ids[2][-9:]}).text
    assert re.findall(r'<tr data-shard="([^"]+)">', by_id) == [shard_ids[2]]


def test_shard_history_shows_attempts_and_the_rerun_conf(client):
    http, shard_ids = client
    page = http.get(f"/shards/{shard_ids[1]}").text
    assert "worker-7" in page and "GPU fell over" in page
    assert page.count("<tr>") >= 2 * 4  # started + done for each stage, and more
    assert f"&quot;shard_ids&quot;: [&quot;{shard_ids[1]}&quot;]" in page
    assert f'data-shard="{shard_ids[1]}"' in page  # the re-run form
    assert re.findall(r'name="stage" value="([a-z]+)"', page) == STAGES
    assert http.get("/shards/no-such-shard").status_code == 404


@pytest.fixture
def served(client):
    """The plugin's app on a loopback port, served by uvicorn as the api-server would."""
    import threading

    import uvicorn

    http, shard_ids = client
    server = uvicorn.Server(
        uvicorn.Config(http.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", shard_ids
    server.should_exit = True
    thread.join(10)


def test_shard_view_renders_in_chromium(served, browser, page_errors):
    base, shard_ids = served
    with browser() as chromium:
        page = chromium.new_page()
        errors = page_errors(page)
        page.goto(f"{base}/shards")
        rows = page.locator("tr[data-shard]").evaluate_all(
            "rows => rows.map(row => row.dataset.shard)"
        )
        statuses = page.locator("span.status").all_inner_texts()
        page.locator(f"tr[data-shard='{shard_ids[1]}'] a").first.click()
        page.wait_for_selector("form#rerun")
        heading = page.locator("h1").inner_text()
        history = page.locator("table tbody tr").count()
        boxes = page.locator("form#rerun input[name=stage]:checked").count()
        # No Airflow API behind this server: the form says so instead of failing silently.
        page.locator("form#rerun button").click()
        page.wait_for_function(
            "document.getElementById('rerun-result').textContent.startsWith('Airflow said')"
        )
        result = page.locator("#rerun-result").inner_text()
    assert rows == shard_ids
    assert len(statuses) == 3 * len(STAGES)
    assert statuses.count("failed") == 1 and any(s.startswith("done") for s in statuses)
    assert heading == shard_ids[1] and history >= 2 * len(STAGES) and boxes == len(STAGES)
    assert result.startswith("Airflow said 404")
    assert [e for e in errors if "404" not in e] == []  # the browser logs the failed POST
