"""Connecting to the state DB (Postgres only), the embedded server, and schema migrations.

Migrations are the numbered files in `sql/` (`0001_name.sql`, ...). `upgrade` applies the
missing ones in order in one transaction (Postgres DDL is transactional), under an advisory
lock so that several workers starting at once apply each file exactly once, and records
version, name and checksum in `schema_migrations`. An applied file whose checksum changed is
an error: migrations are append-only.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from facecaption.core.errors import PermanentError
from facecaption.settings import Settings

EMBEDDED_DB_NAME = "facecaption"
_MIGRATION_LOCK = 7_215_091_337  # advisory lock key shared by every `upgrade`
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class StateDBError(RuntimeError):
    """The state DB is unreachable, not Postgres, or its schema does not match this code."""


class StateSchemaError(PermanentError, StateDBError):
    """The state DB is on another schema version than this code: `facecaption db upgrade`."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def sqlalchemy_url(url: str) -> str:
    """Normalise a Postgres URL to the psycopg2 driver; refuse other dialects."""
    if url.startswith("postgres://"):  # the scheme Heroku-style providers hand out
        url = "postgresql://" + url.removeprefix("postgres://")
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise StateDBError(f"the state DB must be Postgres, got {parsed.get_backend_name()!r}")
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def start_embedded_postgres(home: Path) -> str:
    """Start (or reuse) a Postgres server under `home/pgdata` and return its URL.

    The server outlives this process so that Airflow task processes and later CLI calls share
    it; `facecaption db stop-embedded` stops it.
    """
    pgdata = home / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns about an unset XDG_RUNTIME_DIR, which pgserver does not use.
        warnings.simplefilter("ignore")
        import pgserver  # imported here: only the embedded default needs it

        server = pgserver.get_server(pgdata, cleanup_mode=None)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DB_NAME}';").strip()
    if "1 row" not in exists:
        server.psql(f"CREATE DATABASE {EMBEDDED_DB_NAME};")
    return sqlalchemy_url(server.get_uri(EMBEDDED_DB_NAME))


def stop_embedded_postgres(home: Path) -> bool:
    pgdata = home / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' XDG_RUNTIME_DIR warning
        import pgserver

        pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()
    return True


def resolve_db_url(settings: Settings) -> str:
    """The configured state DB URL, or the embedded server's when none is configured."""
    if settings.db_url:
        return sqlalchemy_url(settings.db_url)
    return start_embedded_postgres(settings.home_dir)


def create_state_engine(settings: Settings) -> Engine:
    url = resolve_db_url(settings)
    engine = sa.create_engine(url, pool_pre_ping=True, future=True)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as error:
        raise StateDBError(
            f"cannot reach the state DB at {make_url(url).render_as_string()}: {error.orig}"
        ) from error
    return engine


def migrations_dir() -> Path:
    packaged = resources.files("facecaption") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    source_tree = Path(__file__).resolve().parents[2] / "sql"
    if source_tree.is_dir():
        return source_tree
    raise StateDBError("no sql/ migrations folder found next to the facecaption package")


def load_migrations(folder: Path | None = None) -> list[Migration]:
    folder = folder or migrations_dir()
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            raise StateDBError(f"{path.name}: migrations are named NNNN_lowercase_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StateDBError(f"duplicate migration versions in {folder}")
    return found


def upgrade(engine: Engine, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply the migrations not yet applied; return those applied now."""
    migrations = migrations if migrations is not None else load_migrations()
    applied_now = []
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        conn.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        applied = {
            row.version: row.checksum
            for row in conn.execute(sa.text("SELECT version, checksum FROM schema_migrations"))
        }
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise StateDBError(
                        f"migration {migration.version:04d}_{migration.name} was changed after"
                        " it was applied; add a new migration instead"
                    )
                continue
            conn.exec_driver_sql(migration.sql)
            conn.execute(
                sa.text(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (:v, :n, :c)"
                ),
                {"v": migration.version, "n": migration.name, "c": migration.checksum},
            )
            applied_now.append(migration)
    return applied_now


def current_version(engine: Engine) -> int | None:
    with engine.connect() as conn:
        exists = conn.execute(sa.text("SELECT to_regclass('schema_migrations')")).scalar()
        if exists is None:
            return None
        return conn.execute(sa.text("SELECT max(version) FROM schema_migrations")).scalar()


def applied_versions(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        exists = conn.execute(sa.text("SELECT to_regclass('schema_migrations')")).scalar()
        if exists is None:
            return set()
        return set(conn.execute(sa.text("SELECT version FROM schema_migrations")).scalars())


def require_current_schema(engine: Engine) -> None:
    """Fail with the fix in the message when the DB lacks a migration of this code (any of
    them, not only the newest: migrations written on branches land out of order)."""
    wanted = {m.version for m in load_migrations()}
    missing = sorted(wanted - applied_versions(engine))
    if missing:
        raise StateSchemaError(
            f"state DB schema lacks migration(s) {', '.join(f'{v:04d}' for v in missing)}"
            f" (it is at version {current_version(engine)}):"
            " run `facecaption db upgrade`"
        )
