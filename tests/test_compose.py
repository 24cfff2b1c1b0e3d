"""docker-compose.yml is checked for structure here; Docker itself is not available in CI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from facecaption.settings import Settings

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
)


def test_compose_services_fit_together():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {
        "postgres",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
    } <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith("./") or source in compose["volumes"], (name, source)


def test_compose_keeps_facecaption_state_out_of_airflow_metadata_db():
    env = yaml.safe_load(COMPOSE.read_text())["x-airflow-common"]["environment"]
    airflow_db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].rsplit("/", 1)[1]
    state_db = env["FACECAPTION_DB_URL"].rsplit("/", 1)[1]
    assert airflow_db != state_db
    assert int(env["AIRFLOW__CORE__MAX_MAP_LENGTH"]) > 1024


def test_compose_runs_celery_with_a_cpu_and_a_gpu_worker():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    env = compose["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert "@redis:6379" in env["AIRFLOW__CELERY__BROKER_URL"]
    assert {"redis", "airflow-worker", "airflow-worker-gpu"} <= set(services)
    gpu = services["airflow-worker-gpu"]
    assert "-q gpu" in gpu["command"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert set(gpu["build"]["args"]["FACECAPTION_EXTRAS"].split(",")) == {"celery", "gpu", "llm"}
    cpu_extras = compose["x-airflow-common"]["build"]["args"]["FACECAPTION_EXTRAS"].split(",")
    assert "celery" in cpu_extras and "gpu" not in cpu_extras
    init = " ".join(services["airflow-init"]["command"])
    assert "airflow pools set gpu" in init and "facecaption db upgrade" in init


def test_compose_refers_only_to_what_the_repo_has():
    compose = yaml.safe_load(COMPOSE.read_text())
    root = COMPOSE.parent
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            assert (root / build["context"] / "Dockerfile").is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (root / source).is_dir(), (name, source)
    dockerfile = (root / "Dockerfile").read_text()
    for copied in (
        "pyproject.toml",
        "README.md",
        "facecaption/",
        "sql/",
        "plugins/facecaption_airflow/",
    ):
        assert copied in dockerfile and (root / copied).exists(), copied
    # every extra the compose file builds with exists in pyproject.toml
    pyproject = (root / "pyproject.toml").read_text()
    args = [compose["x-airflow-common"]["build"]["args"]]
    args += [s["build"]["args"] for s in compose["services"].values() if "build" in s]
    for extra in {e for a in args for e in a["FACECAPTION_EXTRAS"].split(",")}:
        assert re.search(rf"^{extra} = \[", pyproject, re.MULTILINE), extra


def test_compose_result_backend_names_an_installed_driver():
    """Celery's database result backend is SQLAlchemy: `db+postgresql://` alone lets it pick a
    driver (psycopg 3 under SQLAlchemy 2.1) that the image may not have."""
    env = yaml.safe_load(COMPOSE.read_text())["x-airflow-common"]["environment"]
    backend = env["AIRFLOW__CELERY__RESULT_BACKEND"]
    assert backend.startswith("db+")
    url = make_url(backend.removeprefix("db+"))
    assert url.drivername == "postgresql+psycopg2"
    url.get_dialect().import_dbapi()  # the driver this project installs (psycopg2-binary)
    assert url.host == "postgres" and url.database == "airflow"


def _facecaption_env(service: dict) -> dict[str, str]:
    return {k: v for k, v in service["environment"].items() if k.startswith("FACECAPTION_")}


def test_compose_gives_the_dag_processor_the_workers_facecaption_settings():
    """The dag-processor decides at parse time which queue the caption stage goes to and the
    refresh DAG's schedule, from the same FACECAPTION_* settings the workers run with."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    dag_processor = _facecaption_env(services["airflow-dag-processor"])
    for name in AIRFLOW_SERVICES:
        assert _facecaption_env(services[name]) == dag_processor, name
    assert {"FACECAPTION_DB_URL", "FACECAPTION_STORE_ROOT", "FACECAPTION_HOME"} <= set(
        dag_processor
    )
    assert {"FACECAPTION_CAPTION__BACKEND", "FACECAPTION_REFRESH__SCHEDULE"} <= set(dag_processor)


@pytest.mark.parametrize(
    ("variable", "default"),
    [
        ("FACECAPTION_CAPTION__BACKEND", Settings.model_fields["caption"].default.backend),
        ("FACECAPTION_REFRESH__SCHEDULE", Settings.model_fields["refresh"].default.schedule),
    ],
)
def test_compose_parse_time_settings_default_to_the_settings_defaults(variable, default):
    env = yaml.safe_load(COMPOSE.read_text())["x-airflow-common"]["environment"]
    assert env[variable] == f"${{{variable}:-{default}}}"


def test_compose_serves_captions_from_vllm_on_request():
    """Profile `llm`: a vLLM server on a GPU under the caption model's name, and the workers'
    caption settings point at it; without the profile the settings are the defaults."""
    from facecaption.settings import CaptionSettings

    compose = yaml.safe_load(COMPOSE.read_text())
    vllm = compose["services"]["vllm"]
    assert vllm["profiles"] == ["llm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    [device] = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    command = vllm["command"]
    served = command[command.index("--served-model-name") + 1]
    port = command[command.index("--port") + 1]
    env = compose["x-airflow-common"]["environment"]

    def default(value: str) -> str:  # ${NAME:-default}
        return value.split(":-", 1)[1].rstrip("}")

    defaults = CaptionSettings()
    assert default(env["FACECAPTION_CAPTION__BACKEND"]) == defaults.backend
    assert default(env["FACECAPTION_CAPTION__MODEL"]) == defaults.model == default(served)
    assert default(env["FACECAPTION_CAPTION__BASE_URL"]) == f"http://vllm:{port}/v1"
    for volume in vllm["volumes"]:
        assert volume.split(":", 1)[0] in compose["volumes"]
