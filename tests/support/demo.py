"""The demo: sample source on a loopback server, the build DAG run by Airflow, a summary.

Everything lives under `{home}/demo` (Airflow's SQLite metadata DB, logs, the source file) and
the state DB is the configured one or the embedded Postgres. Running it again reuses the same
port and source, so the second run plans nothing new and skips the finished shards.

Its settings (loopback allowed, its shard size, its stand-in models) are written to
`{home}/facecaption.toml`, so `facecaption status`, `run --shard X --force`, `publish` and
`report` afterwards act like the demo. A TOML file of the user's own there is left alone: the
demo's (theirs plus the demo's settings) goes to `{home}/demo/facecaption.toml` instead.
Stand-in models are named `demo-*` (see `facecaption.models.identity.is_demo_model`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import facecaption
from facecaption.core.pipeline import Pipeline
from facecaption.core.redaction import redact_url
from facecaption.core.status import format_status
from facecaption.models.errors import ModelNotFoundError
from facecaption.models.identity import DEMO_MODEL_PREFIX
from facecaption.models.locate import attribute_model, detector_backend
from facecaption.release.publish import read_manifest
from facecaption.release.report import REPORT_NAME
from facecaption.settings import Settings, config_path
from facecaption.state.db import create_state_engine, resolve_db_url, upgrade
from support.sampledata import routes_for, sample_rows, write_source
from support.samplesite import SampleSite
from support.statistics_model import build_statistics_model

DEMO_PORT = 8765
DAG_ID = "facecaption_build"
CONFIG_MARK = "# written by `facecaption demo`"


def demo_config_file(home: Path) -> Path:
    """Where the demo's settings go: the home's facecaption.toml unless the user wrote one."""
    home_file = home / "facecaption.toml"
    if not home_file.is_file() or home_file.read_text().startswith(CONFIG_MARK):
        return home_file
    return home / "demo" / "facecaption.toml"


@contextmanager
def _ignoring_an_earlier_demos_file(home: Path) -> Iterator[None]:
    """Settings read inside see the environment, the user's own file and the defaults, not
    the file an earlier demo wrote (its stand-in models would hide a real model pulled since)."""
    if os.environ.get("FACECAPTION_CONFIG") or not (home / "facecaption.toml").is_file():
        yield
        return
    if demo_config_file(home) != home / "facecaption.toml":
        yield  # the user's own file: it counts
        return
    empty = home / "demo" / "no-settings.toml"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_text("")
    os.environ["FACECAPTION_CONFIG"] = str(empty)
    try:
        yield
    finally:
        del os.environ["FACECAPTION_CONFIG"]


def toml_text(values: dict[str, Any], table: str = "") -> str:
    """A TOML document for nested dicts of strings, numbers, booleans and lists of those."""
    scalars, tables = [], []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(toml_text(value, f"{table}.{key}" if table else key))
        else:
            scalars.append(f"{key} = {json.dumps(value)}")
    head = [f"\n[{table}]"] if table and scalars else []
    return "\n".join([*head, *scalars, *tables])


def write_demo_config(home: Path, demo_settings: dict[str, Any]) -> Path:
    """The demo's settings (nested: {"fetch": {"allow_networks": [...]}, ...}) as TOML, over
    the user's own file when there is one."""
    target = demo_config_file(home)
    own = config_path() if target != home / "facecaption.toml" else None
    values: dict[str, Any] = tomllib.loads(own.read_text()) if own else {}
    for key, value in demo_settings.items():
        if isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch(mode=0o600)  # it may name a DB URL with its password: for the user's eyes
    target.chmod(0o600)
    target.write_text(
        f"{CONFIG_MARK} for {home}: later commands act like the demo.\n"
        "# Delete it to go back to your own settings (the next demo writes it again).\n"
        + toml_text(values).lstrip("\n")
        + "\n"
    )
    return target


def as_nested(env: dict[str, str]) -> dict[str, Any]:
    """FACECAPTION_SECTION__FIELD=value variables as {"section": {"field": value}}."""
    nested: dict[str, Any] = {}
    for name, raw in env.items():
        *sections, field = name.removeprefix("FACECAPTION_").lower().split("__")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[field] = json.loads(raw) if raw[:1] in "[{" or raw.isdigit() else raw
    return nested


def repo_dir() -> Path:
    root = Path(facecaption.__file__).resolve().parents[1]
    if not (root / "dags" / f"{DAG_ID}.py").is_file():
        raise FileNotFoundError(
            f"no dags/ folder next to the facecaption package ({root}): run the demo from a"
            " source checkout (`make demo`)"
        )
    return root


def airflow_env(airflow_home: Path, root: Path, facecaption_env: dict[str, str]) -> dict[str, str]:
    """Environment for Airflow commands: its own home and SQLite DB, our DAGs and plugins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update(facecaption_env)
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(root / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


def demo_attribute_model(settings: Settings) -> dict[str, str]:
    """Nothing when a real attribute model is in the cache; else the demo statistics model,
    built under the demo folder, so the stage runs offline (its labels mean nothing)."""
    try:
        attribute_model(settings)
        return {}
    except ModelNotFoundError:
        name = f"{DEMO_MODEL_PREFIX}image-statistics.onnx"
        path = build_statistics_model(settings.home_dir / "demo" / "models" / name)
        return {"FACECAPTION_ATTRIBUTE__MODEL_PATH": str(path)}


def demo_caption_model(settings: Settings) -> dict[str, str]:
    """Nothing when an LLM is in the cache (or another backend is set); else a tiny random
    Qwen2 built offline under the demo folder, so the real rewrite path runs."""
    caption = settings.caption
    folder = settings.model_cache_dir / "llm" / caption.model
    if caption.backend != "transformers" or caption.model_path or folder.is_dir():
        return {}
    from support.tiny_llm import build_tiny_qwen2

    tiny = settings.home_dir / "demo" / "models" / f"{DEMO_MODEL_PREFIX}tiny-qwen2"
    if not (tiny / "config.json").is_file():
        build_tiny_qwen2(tiny)
    return {
        "FACECAPTION_CAPTION__MODEL_PATH": str(tiny),
        "FACECAPTION_CAPTION__MAX_NEW_TOKENS": "24",
    }


def _free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def run_demo(settings: Settings, shard_size: int = 8) -> int:
    root = repo_dir()
    with _ignoring_an_earlier_demos_file(settings.home_dir):
        settings = Settings()
    demo_home = settings.home_dir / "demo"
    airflow_home = demo_home / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    log_path = demo_home / "airflow.log"

    db_url = resolve_db_url(settings)
    upgrade(create_state_engine(settings.model_copy(update={"db_url": db_url})))
    demo_env = {
        "FACECAPTION_SHARD_SIZE": str(shard_size),
        # the sample site is on loopback, which downloads may not reach otherwise
        "FACECAPTION_FETCH__ALLOW_NETWORKS": '["127.0.0.0/8"]',
        **demo_attribute_model(settings),
        **demo_caption_model(settings),
    }
    # later commands find the same DB and store: the configured ones, or the home's defaults
    configured = {"db_url": settings.db_url, "store_root": settings.store_root}
    config_file = write_demo_config(
        settings.home_dir,
        {**{k: v for k, v in configured.items() if v}, **as_nested(demo_env)},
    )
    facecaption_env = {
        "FACECAPTION_HOME": str(settings.home_dir),
        "FACECAPTION_DB_URL": db_url,
        "FACECAPTION_STORE_ROOT": settings.artifact_root,
        **demo_env,
    }
    env = airflow_env(airflow_home, root, facecaption_env)
    rows = sample_rows()
    with SampleSite(routes_for(rows), port=DEMO_PORT if _free(DEMO_PORT) else 0) as site:
        source = write_source(rows, site.url("").rstrip("/"), demo_home / "source.parquet")
        print(f"sample source: {source} ({len(rows)} rows, served at {site.url('')})")
        with open(log_path, "w") as log:
            print(f"airflow: migrating its metadata DB in {airflow_home} ...")
            _airflow(["db", "migrate"], env, log)
            _airflow(["pools", "set", "gpu", "1", "GPU stages"], env, log)
            print(f"detector: {detector_backend(settings)}")
            if "FACECAPTION_ATTRIBUTE__MODEL_PATH" in env:
                print(
                    "attributes: a demo model of image statistics (not a real classifier):"
                    " export or pull a CelebA-40 model for real labels"
                )
            print(f"airflow: dags test {DAG_ID} (log: {log_path}) ...")
            conf = {"source": str(source), "shard_ids": [], "force": False}
            _airflow(["dags", "test", DAG_ID, "--conf", json.dumps(conf)], env, log)

    run_settings = settings.model_copy(update={"db_url": db_url, "shard_size": shard_size})
    with Pipeline.open(run_settings) as pipeline:
        shard_ids = pipeline.select_shards([str(source)])
        status = pipeline.status(shard_ids)
        print()
        print(format_status(status))
        print()
        root_uri = pipeline.store.uri(pipeline.store.root)
        manifest = read_manifest(pipeline)
        print(f"artifacts: {root_uri}/shards/<shard>/")
        if manifest is not None:
            print(
                f"release:   {root_uri}/release/manifest.json ({manifest['rows']} rows in"
                f" {len(manifest['files'])} parquet files)"
            )
        report = f"{root_uri}/release/{REPORT_NAME}"
        if pipeline.store.exists(f"{pipeline.store.root}/release/{REPORT_NAME}"):
            print(f"report:    {report}")
        print(f"state DB:  {redact_url(db_url)}")
        print(f"settings:  {config_file}")
        if config_file == settings.home_dir / "facecaption.toml":
            use = ""
        else:
            use = f"FACECAPTION_CONFIG={config_file} "
        print(f"see also:  {use}facecaption status | publish | report | doctor")
    unfinished = [
        f"{row.shard_id} {stage}"
        for row in status
        for stage, state in row.stages.items()
        if state.status != "done"
    ]
    if manifest is None:
        unfinished.append("release")
    if unfinished:
        print(f"not done: {unfinished}; see {log_path}", file=sys.stderr)
        return 1
    return 0


def _airflow(args: list[str], env: dict[str, str], log) -> None:  # noqa: ANN001
    completed = subprocess.run(
        [sys.executable, "-m", "airflow", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"`airflow {' '.join(args[:2])}` failed; see {log.name}")
