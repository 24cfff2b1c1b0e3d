"""The shard view as Airflow serves it: the plugin mounted by Airflow's own api-server app
(`airflow.api_fastapi.app.create_app`, plugins from this repo, the simple auth manager, the
SQLite metadata DB), over real HTTP handling (FastAPI's test client, or uvicorn for Chromium),
against a real state DB; task instances from real `dag.test()` runs of the build DAG."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support.sampledata import write_source
from test_select import build_all

from facecaption.core.pipeline import Pipeline
from facecaption.core.stage import StageInputError, stage_registry

STAGES = list(stage_registry())
REPO = Path(__file__).resolve().parents[1]
SHARD_ROW = re.compile(r'<tr data-shard="([^"]+)">')


@pytest.fixture(scope="module")
def airflow_app(airflow_db):
    """Airflow's api-server app (plugins included) and a JWT of its admin user, as the UI's
    login leaves in the `_token` cookie."""
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    app = create_app()
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    return app, token


@pytest.fixture
def state_env(settings_env, monkeypatch):
    """The api-server's environment: the state DB's settings (as the compose file gives it)."""
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def built(tmp_path, settings, state_env, sample, sample_site):
    """Three shards with every stage done, a caption failed on the second, and a fourth shard
    (another source) whose every URL fails: its fetch is done, with a warning."""
    settings, shard_ids, _ = build_all(tmp_path, settings, sample, sample_site)
    dead = write_source(sample[:8], sample_site.url("gone").rstrip("/"), tmp_path / "dead.parquet")
    with Pipeline.open(settings) as pipeline:
        state = pipeline.state
        with state.claim(shard_ids[1], "caption"):
            attempt = state.mark_running(shard_ids[1], "caption", "fp", "worker-7")
            state.mark_failed(shard_ids[1], "caption", attempt, "RuntimeError: GPU fell over")
        [dead_shard] = pipeline.select_shards([str(dead)])
        pipeline.run("fetch", dead_shard)
    return settings, shard_ids, dead_shard


@pytest.fixture
def http(airflow_app):
    app, token = airflow_app
    client = TestClient(app)
    client.cookies.set("_token", token)
    return client


def cells(page: str, shard_id: str) -> dict[str, str]:
    """stage -> the HTML of its cell, in one shard's row."""
    row = page.split(f'<tr data-shard="{shard_id}">', 1)[1].split("</tr>", 1)[0]
    return dict(re.findall(r'<td class="stage[^"]*" data-stage="([a-z]+)"(.*?)</td>', row))


def test_shard_view_refuses_requests_without_an_airflow_session(airflow_app, built):
    app, token = airflow_app
    _, shard_ids, _ = built
    anonymous = TestClient(app)
    for path in ("/facecaption/shards", f"/facecaption/shards/{shard_ids[0]}"):
        refused = anonymous.get(path)
        assert refused.status_code == 401 and shard_ids[0] not in refused.text
        forged = anonymous.get(path, cookies={"_token": token[:-4] + "AAAA"})
        assert forged.status_code == 403 and shard_ids[0] not in forged.text
    # the same token as a bearer (what REST clients send) is a session too
    bearer = anonymous.get("/facecaption/shards", headers={"Authorization": f"Bearer {token}"})
    assert bearer.status_code == 200


def test_shard_view_lists_every_shard_and_stage_status(http, built):
    _, shard_ids, dead_shard = built
    page = http.get("/facecaption/shards")
    assert page.status_code == 200
    assert SHARD_ROW.findall(page.text) == [*shard_ids, dead_shard]
    statuses = re.findall(r'<span class="status">([^<]+)</span>', page.text)
    assert len(statuses) == 4 * len(STAGES) and statuses.count("failed") == 1
    assert "done 7/8" in statuses
    assert "RuntimeError: GPU fell over" in cells(page.text, shard_ids[1])["caption"]
    assert "1-4 of 4 matching shards" in page.text
    assert "badge stale" not in page.text  # nothing changed since the build


def test_every_request_shares_one_state_engine_per_process(airflow_app, http, built):
    """One engine (and pool) per api-server process and state DB, not one per request: ten
    pages leave one engine open, holding at most its pool's connections."""
    import sqlalchemy as sa

    app, _ = airflow_app
    mounted = next(
        route.app for route in app.routes if getattr(route, "path", "") == "/facecaption"
    )
    states = mounted.state.facecaption
    before = states.engines
    _, shard_ids, _ = built
    for _ in range(5):
        assert http.get("/facecaption/shards").status_code == 200
        assert http.get(f"/facecaption/shards/{shard_ids[0]}").status_code == 200
    assert states.engines == before + 1
    settings, _, _ = built
    with Pipeline.open(settings) as pipeline, pipeline.state.engine.connect() as connection:
        open_connections = connection.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    assert open_connections == 1  # the shared engine's one pooled connection, kept


def test_a_done_fetch_whose_every_row_failed_is_not_green(http, built):
    _, shard_ids, dead_shard = built
    page = http.get("/facecaption/shards").text
    fetch = cells(page, dead_shard)["fetch"]
    assert 'data-tone="failed"' in fetch and "done 0/8" in fetch
    assert "100% of rows failed" in fetch  # the stage's own warning
    assert 'data-tone="done"' in cells(page, shard_ids[0])["fetch"]


def test_every_failed_row_is_flagged_even_without_the_error_rate_warning():
    """With `fetch.warn_error_rate` at 1 a stage records no warning; the view still says it.
    Rows left out by policy (opted out, robots) are not failures."""
    from facecaption.core.status import stage_alerts, stage_tone
    from facecaption.state import StageState

    dead = StageState("s", "fetch", "done", 1, counts={"rows": 8, "http_error": 8, "ok": 0})
    assert stage_tone("fetch", dead) == "failed"
    assert stage_alerts("fetch", dead) == ["every row failed (8 rows)"]
    policy = StageState("s", "fetch", "done", 1, counts={"rows": 8, "opted_out": 8})
    assert (stage_tone("fetch", policy), stage_alerts("fetch", policy)) == ("done", [])
    no_faces = StageState("s", "detect", "done", 1, counts={"images": 8, "faces_kept": 0})
    assert stage_tone("detect", no_faces) == "done"


def test_a_stage_refused_before_it_starts_says_why(http, built):
    settings, _, dead_shard = built
    with Pipeline.open(settings) as pipeline, pytest.raises(StageInputError):
        pipeline.run("attribute", dead_shard)  # detect never ran on it
    attribute = cells(http.get("/facecaption/shards").text, dead_shard)["attribute"]
    assert "refused before starting: StageInputError" in attribute
    assert "pending" in attribute


def test_a_changed_setting_marks_exactly_that_stage_stale(http, built, monkeypatch):
    _, shard_ids, _ = built
    monkeypatch.setenv("FACECAPTION_ATTRIBUTE__THRESHOLD", "0.9")
    page = http.get("/facecaption/shards").text
    for shard_id in shard_ids:
        stale = [s for s, html in cells(page, shard_id).items() if 'class="badge stale"' in html]
        assert stale == ["attribute"], shard_id


def test_shard_view_filters_by_status_stage_and_id(http, built):
    _, shard_ids, _ = built
    failed = http.get("/facecaption/shards", params={"status": "failed", "stage": "caption"})
    assert SHARD_ROW.findall(failed.text) == [shard_ids[1]]
    assert "of 1 matching shards" in failed.text
    by_id = http.get("/facecaption/shards", params={"q": shard_ids[2][-9:]}).text
    assert SHARD_ROW.findall(by_id) == [shard_ids[2]]
    assert http.get("/facecaption/shards", params={"status": "stuck"}).status_code == 400


def test_shard_history_form_does_not_force_or_publish_by_default(http, built):
    _, shard_ids, _ = built
    page = http.get(f"/facecaption/shards/{shard_ids[1]}").text
    assert "worker-7" in page and "GPU fell over" in page
    assert page.count("<tr>") >= 2 * 4  # started + done for each stage, and more
    form = page.split('<form id="rerun"', 1)[1].split("</form>", 1)[0]
    assert 'action="/api/v2/dags/facecaption_build/dagRuns"' in form
    assert re.findall(r'name="stage" value="([a-z]+)" checked', form) == STAGES
    assert '<input type="checkbox" name="force">' in form
    assert '<input type="checkbox" name="publish">' in form
    assert "&quot;force&quot;: false, &quot;publish&quot;: false" in page
    assert http.get("/facecaption/shards/no-such-shard").status_code == 404


def test_the_plugin_puts_the_view_in_airflow_navigation(http):
    plugins = http.get("/api/v2/plugins").json()["plugins"]
    [ours] = [p for p in plugins if p["name"] == "facecaption"]
    [view] = ours["external_views"]
    assert view["url_route"] == "shards" and view["destination"] == "nav"
    assert view["href"] == "/facecaption/shards"


@pytest.mark.slow
def test_links_point_to_each_stage_task_instance_and_its_log(
    tmp_path, settings, state_env, sample, sample_site, http, monkeypatch
):
    """A real build run (dag.test): each stage cell links to its run, its mapped task
    instance (by the shard's map index) and that instance's log in Airflow's UI."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("FACECAPTION_SHARD_SIZE", "8")
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    dag = DagBag(dag_folder=str(REPO / "dags")).get_dag("facecaption_build")
    run = dag.test(run_conf={"source": str(source), "stages": ["fetch"], "publish": False})
    assert run.state == "success"
    tis = {
        (ti.rendered_map_index, ti.task_id): ti
        for ti in run.get_task_instances()
        if ti.task_id.startswith("process_shard.")
    }
    page = http.get("/facecaption/shards").text
    shard_ids = SHARD_ROW.findall(page)
    assert len(shard_ids) == 3
    for shard_id in shard_ids:
        for stage, html in cells(page, shard_id).items():
            ti = tis[(shard_id, f"process_shard.{stage}")]
            instance = (
                f"/dags/facecaption_build/runs/{run.run_id.replace(':', '%3A').replace('+', '%2B')}"
                f"/tasks/process_shard.{stage}/mapped/{ti.map_index}"
            )
            links = dict(re.findall(r'data-link="([a-z]+)" href="([^"]+)"', html))
            assert links["run"] == instance.split("/tasks/")[0], links
            assert links["task"] == f"{instance}/details"
            assert links["log"] == f"{instance}?try_number={ti.try_number}"
            assert f'data-task-state="{ti.state}"' in html
    history = http.get(f"/facecaption/shards/{shard_ids[0]}").text
    assert history.count('data-link="log"') == len(STAGES)


@pytest.fixture
def served(airflow_app, built):
    """Airflow's app on a loopback port, served by uvicorn as the api-server does."""
    import uvicorn

    app, token = airflow_app
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", token, built
    server.should_exit = True
    thread.join(10)


def test_shard_view_renders_in_chromium_inside_airflow_ui(served, browser, page_errors):
    """Airflow's own UI (its React app, served by the same app) at the plugin's nav page, in
    dark mode: the view is in its iframe, takes its colours, and opens links into the UI in
    the UI's window."""
    base, token, (_, shard_ids, dead_shard) = served
    with browser() as chromium:
        context = chromium.new_context(color_scheme="dark")
        context.add_cookies([{"name": "_token", "value": token, "url": base}])
        page = context.new_page()
        errors = page_errors(page)
        page.goto(f"{base}/plugin/shards")
        frame = page.frame_locator("iframe[title='Shards']")
        frame.locator("tr[data-shard]").first.wait_for(timeout=60_000)
        rows = frame.locator("tr[data-shard]").evaluate_all("rs => rs.map(r => r.dataset.shard)")
        dark = frame.locator("html").evaluate("html => html.classList.contains('dark')")
        host_background = page.evaluate(  # Airflow's theme colour for the page background
            "getComputedStyle(document.documentElement).getPropertyValue('--chakra-colors-bg')"
        ).strip()
        background = frame.locator("body").evaluate("b => getComputedStyle(b).backgroundColor")
        dead = frame.locator(f"tr[data-shard='{dead_shard}'] td[data-stage=fetch] .status")
        dead_colour = dead.evaluate("s => getComputedStyle(s).color")
        done = frame.locator(f"tr[data-shard='{shard_ids[0]}'] td[data-stage=fetch] .status")
        done_colour = done.evaluate("s => getComputedStyle(s).color")
        frame.locator(f"a[href='shards/{shard_ids[1]}']").click()
        frame.locator("form#rerun").wait_for()
        ticked = frame.locator("form#rerun input[type=checkbox]:checked").evaluate_all(
            "boxes => boxes.map(b => b.name === 'stage' ? b.value : b.name)"
        )
        # A link into Airflow's UI (as the stage cells and the re-run result have) opens in
        # the UI's window: the UI's sandbox does not let the iframe navigate it itself.
        frame.locator("form#rerun").evaluate(
            "form => form.insertAdjacentHTML('beforeend',"
            ' \'<a id="out" data-ui href="/dags/facecaption_build/runs/r1">run</a>\')'
        )
        with page.expect_navigation():
            frame.locator("#out").click()
        top_url = page.url
    assert rows == [*shard_ids, dead_shard]
    assert dark and host_background and background == host_background
    assert dead_colour != done_colour  # the fetch whose every row failed is not green
    assert ticked == STAGES  # every stage ticked; force and publish not
    assert top_url == f"{base}/dags/facecaption_build/runs/r1"
    assert [e for e in errors if "404" not in e] == []
