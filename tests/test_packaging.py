"""How facecaption installs: the wheel (what it ships, its `airflow.plugins` entry point, its
dependencies by role, the constraints file), and what a worker without the model libraries
can still do. The wheel is built here by hatchling without build isolation (no download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from email.parser import Parser
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support.sampledata import write_source

from facecaption.core.pipeline import Pipeline
from facecaption.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONSTRAINTS = REPO / "constraints.txt"
# What a detect/attribute/caption worker brings and a fetch-only worker goes without.
MODEL_LIBRARIES = {"torch", "transformers", "onnxruntime", "onnxruntime-gpu", "opencv-python"}
MODEL_MODULES = ("torch", "transformers", "onnxruntime", "cv2", "insightface")
PLUGIN_MODULES = ("__init__", "operators", "plugin", "shard_view", "tasks")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from hatchling.build import build_wheel; build_wheel({str(out)!r})",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    [built] = out.glob("facecaption-*.whl")
    return built


def _dist_info(archive: zipfile.ZipFile, name: str) -> str:
    [path] = [n for n in archive.namelist() if n.endswith(f".dist-info/{name}")]
    return archive.read(path).decode()


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = Parser().parsestr(_dist_info(archive, "METADATA"))
    return [Requirement(line) for line in metadata.get_all("Requires-Dist")]


def _extras(requirement: Requirement) -> set[str]:
    """The extras whose selection brings this requirement (none: a core dependency)."""
    marker = requirement.marker
    if marker is None:
        return set()
    names = {"airflow", "celery", "cpu", "gpu", "llm", "dev"}
    return {extra for extra in names if marker.evaluate({"extra": extra})}


def test_wheel_ships_the_library_the_migrations_and_the_airflow_plugin(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = _dist_info(archive, "entry_points.txt")
    assert "facecaption/cli.py" in names
    migrations = {f"facecaption/sql/{path.name}" for path in (REPO / "sql").glob("*.sql")}
    assert migrations and migrations <= names
    assert {f"facecaption_airflow/{module}.py" for module in PLUGIN_MODULES} <= names
    # the test and demo scaffolding, the DAG files and the benchmarks stay in the checkout
    assert not [n for n in names if n.split("/")[0] in ("tests", "dags", "bench", "plugins")]
    assert "[airflow.plugins]\nfacecaption = facecaption_airflow.plugin:FacecaptionPlugin" in (
        entry_points
    )


def test_wheel_keeps_model_libraries_and_airflow_out_of_the_core_install(wheel):
    requirements = _requirements(wheel)
    core = {canonicalize_name(r.name) for r in requirements if not _extras(r)}
    assert not core & (MODEL_LIBRARIES | {"insightface", "apache-airflow", "celery"})
    by_name = {}
    for requirement in requirements:
        by_name.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    [torch] = by_name["torch"]
    assert _extras(torch) == {"llm"}
    assert _extras(by_name["transformers"][0]) == {"llm"}
    # A range, not a pin (a pin makes pip swap the Airflow a user installs into).
    airflow = by_name["apache-airflow"]
    assert {extra for r in airflow for extra in _extras(r)} == {"airflow", "celery"}
    for requirement in airflow:
        assert not any(spec.operator == "==" for spec in requirement.specifier)
    # celery 5.7.0 does not import under the Airflow provider; torch above the tested minor
    # comes from PyPI as a CUDA build.
    [celery] = by_name["celery"]
    assert "redis" in celery.extras and not celery.specifier.contains("5.7.0")
    assert not torch.specifier.contains("2.14.0") and not torch.specifier.contains("2.15.0")
    # The versions this suite runs with are inside every range the wheel declares.
    for requirement in requirements:
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            continue  # e.g. onnxruntime-gpu here
        assert requirement.specifier.contains(installed, prereleases=True), (
            requirement,
            installed,
        )


def test_constraints_pin_what_the_wheel_requires_within_its_ranges(wheel):
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            [spec] = requirement.specifier
            assert spec.operator == "==", line
            # a local label (torch's +cpu) would refuse the same version from another index
            assert "+" not in spec.version, line
            pins[canonicalize_name(requirement.name)] = spec.version
    assert "facecaption" not in pins
    for requirement in _requirements(wheel):
        name = canonicalize_name(requirement.name)
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                requirement,
                pins[name],
            )
    # the tested stack, pinned: Airflow, its Celery provider, celery, torch
    assert {"apache-airflow", "apache-airflow-providers-celery", "celery", "torch"} <= set(pins)


def _airflow_without_facecaption(root: Path) -> tuple[Path, Path]:
    """A virtualenv with every package of this one but facecaption (an Airflow environment
    facecaption is not installed in yet): (its python, its site-packages)."""
    made = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(root)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    [site] = (root / "lib").glob("python*/site-packages")
    ours = ("facecaption", "_facecaption", "__editable__", "__pycache__")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(ours):
            (site / entry.name).symlink_to(entry)
    return root / "bin" / "python", site


def _plugins_seen_by_airflow(
    python: Path, python_path: list[Path], plugins_folder: Path, home: Path
) -> dict:
    """What Airflow's plugin manager loads (and reports as import errors), run by `python`
    with `python_path` as PYTHONPATH."""
    script = textwrap.dedent(
        """
        import json
        from airflow import plugins_manager

        plugins, errors = plugins_manager._get_plugins()
        import facecaption, facecaption_airflow

        print(json.dumps({
            "from": [facecaption.__file__, facecaption_airflow.__file__],
            "plugins": {p.name: str(p.source) for p in plugins},
            "errors": errors,
            "shard_view": [a["url_prefix"] for p in plugins for a in p.fastapi_apps],
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(str(p) for p in python_path),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins_folder),
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        }
    )
    if not python_path:
        del env["PYTHONPATH"]
    home.mkdir(parents=True)
    # from `home`: `python -c` puts the working directory first on sys.path
    done = subprocess.run(
        [str(python), "-c", script], cwd=home, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_installed_wheel_registers_the_plugin_once_through_its_entry_point(wheel, tmp_path):
    python, site = _airflow_without_facecaption(tmp_path / "venv")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # what `pip install facecaption-*.whl` puts there
    empty = tmp_path / "plugins"
    empty.mkdir()
    # An existing Airflow with its own (empty) plugins folder: the entry point registers it.
    seen = _plugins_seen_by_airflow(python, [], empty, tmp_path / "home-a")
    assert all(Path(path).is_relative_to(site) for path in seen["from"]), seen["from"]
    assert seen["errors"] == {}
    assert list(seen["plugins"]) == ["facecaption"]
    assert "facecaption_airflow.plugin:FacecaptionPlugin" in seen["plugins"]["facecaption"]
    assert seen["shard_view"] == ["/facecaption"]
    # Installed and the checkout's plugins/ as the plugins folder as well (compose, dev): one
    # registration, no "already registered" import error.
    seen = _plugins_seen_by_airflow(python, [], REPO / "plugins", tmp_path / "home-b")
    assert seen["errors"] == {}
    assert list(seen["plugins"]) == ["facecaption"]


@pytest.mark.slow
def test_plugins_folder_registers_the_plugin_without_the_entry_point(tmp_path):
    """A checkout on PYTHONPATH, facecaption not installed: the plugins folder registers it."""
    python, _ = _airflow_without_facecaption(tmp_path / "venv")
    seen = _plugins_seen_by_airflow(python, [REPO], REPO / "plugins", tmp_path / "home")
    assert [Path(path).parents[1] for path in seen["from"]] == [REPO, REPO / "plugins"]
    assert seen["errors"] == {}
    assert seen["plugins"] == {"facecaption": "$PLUGINS_FOLDER/facecaption_plugin.py"}


# Runs in a process where the model libraries and Airflow are not installed: importing them
# fails as it would there.
WITHOUT_MODEL_LIBRARIES = """
import sys

MISSING = {missing!r}


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())

import json

import facecaption.cli, facecaption.fetch.stage
from facecaption.core.pipeline import Pipeline
from facecaption.models.preflight import check_stage_models

code = facecaption.cli.main(sys.argv[1:])
# What the build DAG's plan task and the refresh do on the default queue: check every stage's
# model, and select the shards with work.
with Pipeline.open() as pipeline:
    problems = {{check.stage: check.problem for check in check_stage_models(pipeline.settings)}}
    work = pipeline.select_work(status="work").shard_ids
print("PLAN", json.dumps({{"problems": problems, "work": work}}))
loaded = sorted(name for name in sys.modules if name.split(".")[0] in MISSING)
print("LOADED", loaded)
sys.exit(code)
"""


@pytest.mark.slow
def test_fetch_only_worker_fetches_and_plans_without_model_libraries(
    tmp_path, settings: Settings, settings_env, sample, sample_site
):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    script = WITHOUT_MODEL_LIBRARIES.format(missing=(*MODEL_MODULES, "airflow"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACECAPTION_")}
    env.update(settings_env)
    # the packaged RetinaFace, which `auto` resolves to (the cascade would need OpenCV)
    env["FACECAPTION_DETECT__BACKEND"] = "retinaface"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script, "run", "--source", str(source), "--stage", "fetch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LOADED []" in done.stdout
    [plan] = [json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("PLAN ")]
    assert plan["problems"] == dict.fromkeys(["detect", "attribute", "caption"]), plan
    assert len(plan["work"]) == 1  # the fetched shard: its other stages are still to run
    with Pipeline.open(settings) as pipeline:
        rows = pipeline.status()
    assert rows and {row.stages["fetch"].status for row in rows} == {"done"}, rows
