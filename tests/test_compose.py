"""docker-compose.yml is checked for structure here; Docker itself is not available in CI."""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


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
    assert gpu["build"]["args"]["FACECAPTION_EXTRA"] == "gpu"
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
    for copied in ("pyproject.toml", "README.md", "facecaption/", "sql/"):
        assert copied in dockerfile and (root / copied).exists(), copied


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
