"""A real Airflow for live tests: its processes (api-server, scheduler, dag-processor,
workers), each in a process group of its own and all killed on teardown, and the REST API v2
helpers the tests drive it with."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

BIN = Path(sys.executable).parent  # the virtualenv's bin: airflow and python
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240
# Set on a worker's processes: the name `worker_hostname` gives its task instances.
WORKER_NAME_VARIABLE = "FACECAPTION_TEST_WORKER_NAME"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"({error})"
    return text[-chars:]


def airflow_environment(
    home: Path, port: int, metadata_url: str, password: str, **airflow: str
) -> dict[str, str]:
    """The environment of every process of a test's Airflow: this process's minus its own
    AIRFLOW*/FACECAPTION_* variables, the checkout's dags/ and plugins/, the metadata DB,
    the api-server on `port` with user `admin` / `password`, quick scheduler and
    dag-processor loops; `airflow` adds AIRFLOW__SECTION__KEY settings (e.g. the executor).
    The caller adds the FACECAPTION_* settings."""
    passwords_file = home / "passwords.json"
    passwords_file.write_text(json.dumps({"admin": password}))
    # PYTHONPATH stays: a checkout tested with another checkout's virtualenv points it here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FACECAPTION_"))}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FACECAPTION_LIVE_AIRFLOW_TEST": uuid.uuid4().hex,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "2",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "4",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "180",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        }
    )
    env.update({f"AIRFLOW__{key.upper()}": value for key, value in airflow.items()})
    if importlib.util.find_spec("asyncpg") is None:
        # Airflow derives an async URL (postgresql+asyncpg) from sql_alchemy_conn and imports
        # asyncpg on startup (the `airflow` extra has it); without it, turn the async engine
        # off. Nothing the live tests call uses it (dag-run `wait`, multi-team, state store).
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = ""
    return env


def worker_hostname() -> str:
    """`[core] hostname_callable` for the workers of a test: the name in their environment,
    so the REST API says which worker ran each task instance (all run on one machine)."""
    return os.environ[WORKER_NAME_VARIABLE]


class AirflowCluster:
    """Airflow's processes, each in its own process group, logs under `home/proc-logs`."""

    def __init__(self, home: Path, env: dict[str, str], port: int, password: str) -> None:
        self.home = home
        self.env = env
        self.port = port
        self.password = password
        self.base_url = f"http://127.0.0.1:{port}"
        self.marker = env["FACECAPTION_LIVE_AIRFLOW_TEST"]  # every process we start has it
        self.proc_logs = home / "proc-logs"
        self.proc_logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def airflow(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "airflow"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        """`airflow ARGS` as process `name`, in a process group of its own; `env` adds to the
        cluster's environment for this process only."""
        with open(self.proc_logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [str(BIN / "airflow"), *args],
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"Airflow processes exited: {dead}\n{self.diagnostics()}")

    def _ours(self) -> list[psutil.Process]:
        """Every live process we started, directly or not: descendants of our leaders, and
        anything carrying our marker (task processes get their own process group and may be
        orphaned)."""
        found: dict[int, psutil.Process] = {}
        for proc in self.procs.values():
            try:
                leader = psutil.Process(proc.pid)
                found[leader.pid] = leader
                for child in leader.children(recursive=True):
                    found[child.pid] = child
            except psutil.NoSuchProcess:
                pass
        me = os.getpid()
        for proc in psutil.process_iter():
            if proc.pid in found or proc.pid == me:
                continue
            try:
                if proc.environ().get("FACECAPTION_LIVE_AIRFLOW_TEST") == self.marker:
                    found[proc.pid] = proc
            except (psutil.Error, OSError):
                continue
        return list(found.values())

    def stop(self) -> None:
        """SIGTERM each process group we started, wait, then SIGKILL whatever is left."""
        stragglers = self._ours()
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            # the scheduler may hang on SIGTERM: killed below
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for proc in stragglers + self._ours():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(self._ours(), timeout=10)

    def diagnostics(self) -> str:
        parts = []
        for path in sorted(self.proc_logs.glob("*.log")):
            parts.append(f"===== {path.name} =====\n{tail(path)}")
        task_logs = sorted((self.home / "logs").glob("dag_id=*/**/*.log"))
        for path in task_logs[-12:]:
            parts.append(f"===== {path.relative_to(self.home)} =====\n{tail(path, 3000)}")
        return "\n".join(parts)


def wait(what: str, cluster: AirflowCluster, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        cluster.check_alive()
        try:
            result = check()
        except httpx.TransportError as error:
            result, last = None, error
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what} (last: {last})\n{cluster.diagnostics()}")


def client(cluster: AirflowCluster) -> httpx.Client:
    """An API client holding a JWT from the simple auth manager's `POST /auth/token`."""

    def healthy() -> bool:
        response = httpx.get(f"{cluster.base_url}/api/v2/monitor/health", timeout=5)
        return response.status_code == 200

    wait("the api-server", cluster, healthy, START_TIMEOUT_S)
    response = httpx.post(
        f"{cluster.base_url}/auth/token",
        json={"username": "admin", "password": cluster.password},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    token = response.json()["access_token"]
    return httpx.Client(
        base_url=cluster.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def ok(response: httpx.Response, *codes: int) -> Any:
    assert response.status_code in (codes or (200,)), (
        f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
    )
    return response.json()
