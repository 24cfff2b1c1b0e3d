"""Running `facecaption` commands as processes of their own in tests: the environment that
gives a process the settings of a test's Settings object, starting one, and looking at what
Postgres sessions wait for (to stop a process at a known point without timing guesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import sqlalchemy as sa

from facecaption.settings import Settings

SECTIONS = ("fetch", "detect", "attribute", "caption", "export")


def settings_environment(settings: Settings) -> dict[str, str]:
    """`FACECAPTION_*` variables for `settings` (top level and every section)."""
    env = {
        "FACECAPTION_HOME": str(settings.home),
        "FACECAPTION_DB_URL": settings.db_url or "",
        "FACECAPTION_STORE_ROOT": settings.artifact_root,
        "FACECAPTION_SHARD_SIZE": str(settings.shard_size),
        "FACECAPTION_BUSY_WAIT_S": str(settings.busy_wait_s),
    }
    for section in SECTIONS:
        for name, value in getattr(settings, section).model_dump(mode="json").items():
            if value is not None:
                env[f"FACECAPTION_{section.upper()}__{name.upper()}"] = (
                    json.dumps(value) if isinstance(value, list) else str(value)
                )
    return env


def start_cli(args: list[str], settings: Settings, **extra_env: str) -> subprocess.Popen:
    """`facecaption ARGS` in a new process group (so a test can signal all of it), with the
    settings in its environment; its output is captured as text."""
    env = {**os.environ, **settings_environment(settings), **extra_env}
    return subprocess.Popen(
        [sys.executable, "-m", "facecaption.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def sessions_waiting_on(engine: sa.Engine, table: str) -> int:
    """How many sessions of this database wait for a lock in a statement naming `table`."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE :pattern"
                ),
                {"pattern": f"%{table}%"},
            ).scalar_one()
        )
