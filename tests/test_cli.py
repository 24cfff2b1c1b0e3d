"""The `facecaption` command as a user runs it: db upgrade, plan, run, status, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy.engine import make_url
from support.sampledata import write_source

from facecaption.cli import main
from facecaption.state.db import load_migrations


@pytest.fixture
def cli_env(settings_env, monkeypatch):
    for name, value in {**settings_env, "FACECAPTION_SHARD_SIZE": "10"}.items():
        monkeypatch.setenv(name, value)


def test_db_upgrade_is_idempotent(empty_db_url, monkeypatch, capsys):
    monkeypatch.setenv("FACECAPTION_DB_URL", empty_db_url)
    assert main(["db", "upgrade"]) == 0
    assert "applied 0001_shard_state" in capsys.readouterr().out
    assert main(["db", "upgrade"]) == 0
    out = capsys.readouterr().out
    latest = max(m.version for m in load_migrations())
    assert "applied" not in out and f"schema version {latest}" in out


def test_commands_refuse_a_db_without_schema(empty_db_url, monkeypatch, capsys):
    monkeypatch.setenv("FACECAPTION_DB_URL", empty_db_url)
    assert main(["status"]) == 1
    assert "facecaption db upgrade" in capsys.readouterr().err


def test_plan_run_status(tmp_path, cli_env, sample, sample_site, capsys):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    assert main(["plan", str(source)]) == 0
    assert "3 shards (3 new)" in capsys.readouterr().out
    assert main(["plan", str(source)]) == 0
    assert "3 shards (0 new)" in capsys.readouterr().out

    assert main(["status"]) == 0
    assert "fetch: 3 pending" in capsys.readouterr().out

    assert main(["run", "--source", str(source)]) == 0
    ran = capsys.readouterr().out
    assert ran.count("fetch: done") == 3

    assert main(["run"]) == 0
    assert capsys.readouterr().out.count("fetch: skipped") == 3

    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["totals"]["fetch"]["shards"] == {"done": 3}
    assert status["totals"]["fetch"]["counts"]["rows"] == len(sample)
    expected_ok = sum(row.expected_status == "ok" for row in sample)
    assert status["totals"]["fetch"]["counts"]["ok"] == expected_ok


def test_plan_reports_bad_files_and_exits_nonzero(tmp_path, cli_env, capsys):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    assert main(["plan", str(garbage), str(tmp_path / "missing.parquet")]) == 1
    err = capsys.readouterr().err
    assert "not a readable parquet file" in err and "file not found" in err


def test_run_unknown_shard_is_a_clear_error(cli_env, capsys):
    assert main(["run", "--shard", "nope"]) == 1
    assert "no shard 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_the_build_dag_and_later_commands_act_like_it(tmp_path, settings_env):
    """The README's demo, minus the install: sample source, loopback server, Airflow; the
    packaged RetinaFace keeps the faces that pass the paper's filters, aligned on five points,
    and the report shows them. Afterwards, commands with only the same home act like the demo
    (its settings file), even with the sample site gone. It never prints the state DB's
    password (the test server trusts loopback: any will do)."""
    db_url = make_url(settings_env["FACECAPTION_DB_URL"])
    password = db_url.password or "demo-password-never-printed"
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FACECAPTION_"))},
        "FACECAPTION_HOME": str(home),
        "FACECAPTION_DB_URL": db_url.set(password=password).render_as_string(hide_password=False),
    }

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "facecaption.cli", *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=900,
        )

    done = cli("demo")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fetch: 3 done" in done.stdout and "detector: retinaface" in done.stdout
    assert str(home / "artifacts") in done.stdout
    report = home / "artifacts" / "release" / "report.html"
    assert f"report:    {report}" in done.stdout and report.stat().st_size > 0
    assert "release:   " in done.stdout and f"settings:  {home / 'facecaption.toml'}" in done.stdout
    assert password not in done.stdout + done.stderr
    assert (home / "facecaption.toml").stat().st_mode & 0o077 == 0  # it holds the password
    page = report.read_text()
    assert 'id="demo-banner"' in page and page.count('<figure class="face">') >= 1
    data = json.loads(
        page.split('id="report-data">')[1].split("</script>")[0].replace("<\\/", "</")
    )
    assert data["detect"]["aligned"] == {"five_point": data["detect"]["kept"]}
    assert data["detect"]["kept"] >= 1 and data["detect"]["dropped"]["too_small"] >= 1

    env.pop("FACECAPTION_DB_URL")  # from here on, the demo's settings file says where
    status = cli("status", "--json")
    assert status.returncode == 0, status.stderr
    shards = json.loads(status.stdout)["shards"]
    first = shards[0]["shard_id"]
    rerun = cli("run", "--shard", first, "--force", "--stage", "fetch")
    assert rerun.returncode == 0, rerun.stderr
    counts = json.loads(cli("status", "--json", "--shard", first).stdout)["shards"][0]["stages"]
    fetch, before = counts["fetch"]["counts"], shards[0]["stages"]["fetch"]["counts"]
    assert "blocked_address" not in fetch and fetch["ok"] == before["ok"]
    doctor = cli("doctor")
    assert doctor.returncode == 0 and "a demo stand-in" in doctor.stdout
    out = tmp_path / "again.html"
    assert cli("report", "--out", str(out)).returncode == 0 and 'id="gallery"' in out.read_text()


def test_run_with_jobs_fetches_shards_in_worker_processes(
    tmp_path, cli_env, sample, sample_site, capsys
):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    assert main(["run", "--source", str(source), "--jobs", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "fetch: done" in line]
    assert len(lines) == 3
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    workers = {shard["stages"]["fetch"]["worker"] for shard in status["shards"]}
    assert all(not worker.endswith(f":{os.getpid()}") for worker in workers), (
        "shards ran in worker processes, not in the CLI's own"
    )


def test_publish_report_and_takedown_commands(tmp_path, cli_env, sample, sample_site, capsys):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    assert main(["run", "--source", str(source)]) == 0
    capsys.readouterr()
    assert main(["publish", "--training-shards", "--no-report"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["files"] >= 1 and first["training_shards"] == 3 and first["rows"] >= 1
    # `export` is the old name of `publish`
    assert main(["export", "--training-shards", "--no-report"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == []  # nothing changed
    out = tmp_path / "report.html"
    assert main(["report", "--out", str(out), "--max-crops", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "rows released" in out.read_text()
    sha = "ab" * 32
    assert main(["takedown", "request", "--sha256", sha, "--reason", "r", "--no-apply"]) == 0
    assert "takedown request 1 recorded" in capsys.readouterr().out
    assert main(["takedown", "list"]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["sha256s"] == [sha] and listed["applied_at"] is None
    assert main(["takedown", "request", "--sha256", "not-a-sha"]) == 1
    assert "not a sha256" in capsys.readouterr().err
