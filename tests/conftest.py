"""Shared fixtures: a real Postgres per test, isolated settings, a loopback sample site,
and an Airflow home with a migrated SQLite metadata DB for DAG tests.

Postgres: `FACECAPTION_TEST_DB_URL` when set, else the local server on 127.0.0.1:5432, else an
embedded server started for this run. The run gets a migrated template database and every
test a fresh copy of it, dropped afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]

_HF_HOME = Path(tempfile.mkdtemp(prefix="facecaption-hf-"))
# Airflow reads its configuration when first imported: point it at a private home now.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="facecaption-airflow-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}",
    }
)
# huggingface_hub reads these once, at import: no telemetry request, no Xet transfers (the
# loopback Hub speaks plain HTTP), a private HF_HOME (no developer token or cache), and the
# Hub named explicitly by each test (`endpoint=`, or HF_ENDPOINT for subprocesses).
os.environ.update(
    {
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(_HF_HOME),
    }
)
for _name in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(_name, None)
# Airflow puts its plugins folder on sys.path; tests importing our plugins need the same.
sys.path.insert(0, str(REPO / "plugins"))

# Settings under test come from fixtures, never from the developer's own environment.
for _name in [
    k for k in os.environ if k.startswith("FACECAPTION_") and k != "FACECAPTION_TEST_DB_URL"
]:
    del os.environ[_name]
# ... nor from the developer's home: `make demo` leaves {home}/facecaption.toml (the demo's
# models and fetch limits), which every Settings() would read. A private home for the run;
# tests that need a home of their own set FACECAPTION_HOME themselves.
_FACECAPTION_HOME = Path(tempfile.mkdtemp(prefix="facecaption-home-"))
os.environ["FACECAPTION_HOME"] = str(_FACECAPTION_HOME)


from support.processes import settings_environment  # noqa: E402
from support.sampledata import routes_for, sample_rows  # noqa: E402
from support.samplesite import SampleSite  # noqa: E402
from support.statistics_model import build_statistics_model  # noqa: E402

from facecaption.models.loaded import LOADED_MODELS  # noqa: E402
from facecaption.settings import Settings  # noqa: E402
from facecaption.state.db import sqlalchemy_url, upgrade  # noqa: E402

LOCAL_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
# Fetch limits for the loopback sample sites: loopback allowed, short timeouts, quick retries.
LOOPBACK_FETCH = {
    "allow_networks": ["127.0.0.0/8"],
    "per_host_rate": 0,
    "connect_timeout_s": 2,
    "read_timeout_s": 1,
    "total_timeout_s": 3,
    "retries": 2,
    "backoff_base_s": 0.05,
    "backoff_max_s": 0.2,
    # a later run may fetch a transiently failed row at once (test_fetch_retry_budget.py
    # pins the pauses between runs)
    "row_retry_pause_s": 0,
}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The run's private homes go when every test passed; after a failure they stay, so
    that the Airflow metadata DB (every dag.test() run and task instance state) can be read."""
    homes = [_AIRFLOW_HOME, _HF_HOME, _FACECAPTION_HOME]
    if exitstatus == 0:
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"\ntest homes kept for a look: {', '.join(map(str, homes))}")


def _reachable(url: str) -> bool:
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.fixture(autouse=True)
def no_loaded_models() -> Iterator[None]:
    """Each test starts with no model held by the process (`facecaption run` keeps one per
    kind across shards): a test never reuses another's model, and none stays in memory."""
    LOADED_MODELS.clear()
    yield
    LOADED_MODELS.clear()


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL to a database on a server where we may CREATE DATABASE."""
    explicit = os.environ.get("FACECAPTION_TEST_DB_URL")
    if explicit:
        yield sqlalchemy_url(explicit)
        return
    if _reachable(LOCAL_SERVER):
        yield LOCAL_SERVER
        return
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    yield sqlalchemy_url(server.get_uri())
    server.cleanup()


def _admin(url: str, statement: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """A migrated database for this run, copied for each test."""
    name = f"fc_test_{uuid.uuid4().hex[:10]}"
    _admin(pg_admin_url, f'CREATE DATABASE "{name}"')
    url = make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    engine = sa.create_engine(url)
    upgrade(engine)
    engine.dispose()
    yield name
    _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh copy of the migrated template database, dropped afterwards (for fixtures of
    any scope)."""
    name = f"{template_db}_{uuid.uuid4().hex[:8]}"
    _admin(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        yield make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    with fresh_database(pg_admin_url, template_db) as url:
        yield url


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """A database with no schema at all."""
    name = f"fc_empty_{uuid.uuid4().hex[:10]}"
    _admin(pg_admin_url, f'CREATE DATABASE "{name}"')
    yield make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def statistics_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image-statistics attribute model (a real ONNX with known weights)."""
    return build_statistics_model(tmp_path_factory.mktemp("models") / "statistics.onnx")


@pytest.fixture
def settings(tmp_path: Path, db_url: str, statistics_model: Path) -> Settings:
    """Settings for one test, with short timeouts and quick retries."""
    return Settings(
        home=tmp_path / "home",
        db_url=db_url,
        store_root=str(tmp_path / "artifacts"),
        shard_size=10_000,
        fetch=LOOPBACK_FETCH,
        detect={"backend": "cascade"},  # offline; tests that need the ONNX path build one
        attribute={"model_path": str(statistics_model)},
        caption={"backend": "template"},  # tests of the LLM paths set their own
    )


@pytest.fixture
def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as environment variables, for subprocesses and Airflow tasks."""
    return settings_environment(settings)


@pytest.fixture(scope="session")
def sample() -> list:
    return sample_rows()


@pytest.fixture
def sample_site(sample: list) -> Iterator[SampleSite]:
    with SampleSite(routes_for(sample)) as site:
        yield site


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Airflow's SQLite metadata DB, migrated once per run."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    return _AIRFLOW_HOME


@pytest.fixture
def browser() -> Callable[[], Any]:
    """`with browser() as chromium:` headless Chromium from the system (Debian package
    `chromium`) driven by Playwright. Open it after the test's data is built: Playwright's sync
    API keeps an event loop running on this thread while it is open. Skipped where there is no
    Chromium, unless FACECAPTION_REQUIRE_BROWSER is set (CI sets it)."""
    path = (
        os.environ.get("FACECAPTION_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if not path:
        message = "no Chromium on PATH: `apt-get install chromium` (CI installs it)"
        if os.environ.get("FACECAPTION_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)

    @contextmanager
    def launch() -> Iterator[Any]:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
            try:
                yield chromium
            finally:
                chromium.close()

    return launch


@pytest.fixture
def page_errors() -> Callable[[Any], list[str]]:
    """Attach to a Playwright page; returns the list its console errors and uncaught
    exceptions are appended to."""

    def attach(page: Any) -> list[str]:
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        return errors

    return attach
