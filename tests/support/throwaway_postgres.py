"""A Postgres server of a test's own, for tests that stop or restart one: never the shared
server that other tests (and other people's tests) use at the same time.

It runs the Debian server binaries (`/usr/lib/postgresql/*/bin`: initdb, pg_ctl), else the ones
on PATH, on a free loopback port with its socket and data in a temporary folder, as the
`postgres` system user when we are root (the server refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import sqlalchemy as sa


def server_binaries() -> Path | None:
    """The folder with initdb and pg_ctl, newest Debian version first; None if there is none."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(folder, "pg_ctl").exists():
            return Path(folder)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ThrowawayPostgres:
    """`with ThrowawayPostgres() as server:` a running server; `server.restart()` restarts it
    for real (every session ends, advisory locks included); removed when the block ends."""

    def __init__(self) -> None:
        binaries = server_binaries()
        if binaries is None:
            raise FileNotFoundError("no Postgres server binaries (initdb, pg_ctl) found")
        self.bin = binaries
        self.port = _free_port()
        self.home = Path(tempfile.mkdtemp(prefix="facecaption-pg-"))
        self.data = self.home / "data"
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            shutil.chown(self.home, self._user)

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            user=self._user,
            timeout=120,
        )

    def _pg_ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1"
        log = str(self.home / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "-m", "fast",
                  action)  # fmt: skip

    def __enter__(self) -> ThrowawayPostgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._pg_ctl("start")
        return self

    def restart(self) -> None:
        self._pg_ctl("restart")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.url(name)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.home, ignore_errors=True)
