"""Credentials stay out of what we print and what we write: `facecaption config` masks them,
and no artifact of a whole run (shard files, release, manifest, report) carries the LLM
server's internal address, its credentials or the API key, even when the server echoes them
back in its broken replies."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from support.chatserver import ChatServer, Fault
from support.fileserver import FileServer
from support.sampledata import write_source
from test_caption import build_attributed_shard

from facecaption.cli import effective_config, main
from facecaption.core.pipeline import Pipeline, run_shard
from facecaption.core.redaction import redact_text, redact_url
from facecaption.core.status import status_json
from facecaption.release.publish import publish_release
from facecaption.release.report import write_report
from facecaption.settings import CaptionSettings, Settings

SERVER_HOST = "127.0.0.9"  # the "internal" LLM server: an address no image URL uses
URL_PASSWORD = "s3cr3t-in-url"
API_KEY = "sk-s3cr3t-api-key"


def test_redact_url_masks_userinfo_wherever_it_is():
    assert redact_url("postgresql://fc:hunter2@db:5432/x") == "postgresql://fc:***@db:5432/x"
    assert redact_url("https://ghp_token@github.com/a") == "https://***@github.com/a"
    assert redact_url("postgresql://db/x") == "postgresql://db/x"
    text = "cannot reach http://u:p@10.0.0.1/v1 nor s3://KEY:SECRET@bucket/x"
    assert redact_text(text) == "cannot reach http://u:***@10.0.0.1/v1 nor s3://KEY:***@bucket/x"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Authorization: Bearer sk-abc.def", "Authorization: ***"),
        ("headers={'Authorization': 'Basic dTpwdw=='}", "headers={'Authorization': '***'}"),
        ("GET /v1?api_key=sk-123&x=1 failed", "GET /v1?api_key=***&x=1 failed"),
        ("dbname=fc password=hunter2 host=db", "dbname=fc password=*** host=db"),
        ("aws_secret_access_key = wJalr", "aws_secret_access_key = ***"),
        ("401: token rejected: Bearer eyJhbGciOi", "401: token rejected: Bearer ***"),
        ('password authentication failed for user "fc"', None),  # names no secret
        ("max_tokens=5 exceeded", None),
    ],
)
def test_redact_text_masks_credential_headers_and_fields(text, shown):
    assert redact_text(text) == (text if shown is None else shown)


def test_config_prints_the_effective_places_and_no_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACECAPTION_HOME", str(tmp_path))
    monkeypatch.setenv("FACECAPTION_DB_URL", "postgresql://fc:hunter2@db.internal:5432/fc")
    monkeypatch.setenv("FACECAPTION_CAPTION__BASE_URL", f"http://llm:{URL_PASSWORD}@llm:8000/v1")
    monkeypatch.setenv("FACECAPTION_REFRESH__SOURCES", '["s3://AKIA:wJalr@bucket/laion/"]')
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for secret in ("hunter2", URL_PASSWORD, "wJalr"):
        assert secret not in out
    shown = json.loads(out)
    assert shown["db_url"] == "postgresql://fc:***@db.internal:5432/fc"
    assert shown["caption"]["base_url"] == "http://llm:***@llm:8000/v1"
    assert shown["store_root"] == str(tmp_path.resolve() / "artifacts")
    assert shown["models_dir"] == str(tmp_path.resolve() / "models")
    embedded = effective_config(Settings(home=tmp_path, db_url=None))["db_url"]
    assert embedded.startswith("embedded Postgres in") and str(tmp_path.resolve()) in embedded


@pytest.fixture
def attributed_shard(tmp_path, settings):
    return build_attributed_shard(tmp_path, settings)


def _artifact_texts(root: Path) -> dict[str, str]:
    """Every file under the store root as searchable text: parquet cells (all columns),
    tar members, and the rest as bytes decoded leniently."""
    texts = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            texts[str(path)] = json.dumps(pq.read_table(path).to_pylist(), default=str)
        elif path.suffix == ".tar":
            with tarfile.open(path) as tar:
                members = [tar.extractfile(m) for m in tar.getmembers() if m.isfile()]
                texts[str(path)] = "".join(
                    m.read().decode("utf-8", "replace") for m in members if m is not None
                )
        else:
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    return texts


@pytest.mark.parametrize("credentials", ["url", "api_key"])
def test_no_artifact_carries_the_llm_server_address_or_credentials(
    attributed_shard,
    monkeypatch,
    credentials,
):
    settings, shard_id = attributed_shard

    def echo_back(number: int, body: dict) -> Fault | None:
        """A server that answers its first requests with error pages repeating the request
        it got (address, credentials), and the notes back for the rest."""
        page = f"<h1>bad gateway</h1><p>{SERVER_HOST} {URL_PASSWORD} {API_KEY}</p>".encode()
        return {
            1: Fault(raw=page, content_type="text/html"),
            2: Fault(status=500, raw=page),
            3: Fault(body={"choices": f"{SERVER_HOST} {API_KEY}"}),
        }.get(number)

    def notes(messages: list[dict]) -> str:
        return messages[1]["content"].split("Notes: ", 1)[1]

    with ChatServer(notes, fault=echo_back, host=SERVER_HOST) as server:
        base_url = server.base_url
        if credentials == "url":
            base_url = base_url.replace("http://", f"http://llm:{URL_PASSWORD}@")
        else:
            monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        caption = CaptionSettings(backend="openai", base_url=base_url, retries=0)
        settings = settings.model_copy(update={"caption": caption})
        with Pipeline.open(settings) as pipeline:
            pipeline.run("caption", shard_id)
            publish_release(pipeline)
            write_report(pipeline)
            rows = pq.read_table(pipeline.store.shard_path(shard_id, "captions.parquet"))
    scheme = "Basic" if credentials == "url" else "Bearer"
    assert {auth.split()[0] for auth in server.authorizations} == {scheme}
    errors = rows.column("rewrite_error").to_pylist()
    assert sorted(e for e in errors if e) == ["bad_shape", "not_json", "server_error"]
    secrets = {SERVER_HOST, f":{server.port}", URL_PASSWORD, API_KEY}
    db = make_url(settings.db_url)
    secrets |= {db.database, *([db.password] if db.password else [])}
    leaks = [
        f"{path}: {secret}"
        for path, text in _artifact_texts(Path(settings.artifact_root)).items()
        for secret in secrets
        if secret in text
    ]
    assert not leaks, "\n".join(leaks)


def test_url_credentials_go_as_basic_auth_and_never_with_an_api_key():
    from facecaption.caption.rewriters.openai_server import OpenAIRewriter
    from facecaption.core.errors import SettingsError

    options = dict(
        system_prompt="s", max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0,
        concurrency=1, timeout_s=1.0, retries=0, max_reply_bytes=1000,
    )  # fmt: skip
    rewriter = OpenAIRewriter("http://u:pw@127.0.0.1:1/v1", "m", api_key=None, **options)
    assert rewriter.base_url == "http://127.0.0.1:1/v1"
    assert rewriter.authorization == "Basic dTpwdw=="  # base64 of u:pw
    with pytest.raises(SettingsError, match="credentials"):
        OpenAIRewriter("http://u:pw@127.0.0.1:1/v1", "m", api_key="k", **options)


def test_a_failed_stage_keeps_its_error_without_the_credentials_it_quotes(
    tmp_path, settings, sample, sample_site
):
    """Sources served over loopback HTTP with credentials in their URLs; one changes after
    planning, so its fetch fails with an error that names its URL. Postgres (the stage row
    and its history), `status`, the shard view and the run's report hold that error with the
    password masked; the other shard is untouched, and a re-run records the same."""
    from facecaption_airflow.shard_pages import status_html

    files = {
        name: write_source(rows, sample_site.url("").rstrip("/"), tmp_path / name).read_bytes()
        for name, rows in (("a.parquet", sample[:3]), ("b.parquet", sample[3:6]))
    }
    with FileServer(dict(files)) as server, Pipeline.open(settings) as pipeline:
        uris = {
            name: server.url(name).replace("http://", f"http://fc:{URL_PASSWORD}@")
            for name in files
        }
        report = pipeline.plan(list(uris.values()))
        assert report.errors == {}
        [changed], [other] = (pipeline.select_shards([uris[n]]) for n in files)
        assert pipeline.run("fetch", other).status == "done"
        untouched = pipeline.state.get_stage(other, "fetch")
        server.files["a.parquet"] = files["b.parquet"]  # changed in place after planning

        for _ in range(2):  # a re-run fails the same way and records the same
            shard_run = run_shard(settings, changed, ["fetch"], force=False)
            failed = pipeline.state.get_stage(changed, "fetch")
            assert failed.status == "failed"
            assert "changed after it was planned" in failed.last_error
            assert f"http://fc:***@127.0.0.1:{server.port}/a.parquet" in failed.last_error
            with pipeline.state.engine.connect() as conn:
                stored = conn.execute(
                    sa.text(
                        "SELECT last_error AS error FROM shard_stages"
                        " UNION ALL SELECT error FROM stage_events"
                    )
                ).scalars()
                stored = [error for error in stored if error]
            assert stored and not [error for error in stored if URL_PASSWORD in error]
            assert URL_PASSWORD not in shard_run.error and "fc:***@" in shard_run.error
            status = json.dumps(status_json(pipeline.status()))
            page = status_html(
                pipeline.status_page(limit=10), stale={}, tasks={},
                stages=["fetch"], ui_base="", page_size=10,
            )  # fmt: skip
            assert "fc:***@" in status and "fc:***@" in page
            assert URL_PASSWORD not in status and URL_PASSWORD not in page
            assert pipeline.state.get_stage(other, "fetch") == untouched


def test_errors_stored_before_masking_and_plan_errors_show_no_credentials(settings, sample):
    """A stage row and its history written with a password in the error (as before errors
    were masked when written) read back masked; a source that cannot be planned is named
    with its userinfo masked (the CLI prints it, the plan task logs it and pushes it)."""
    with Pipeline.open(settings) as pipeline:
        secret = f"could not read http://fc:{URL_PASSWORD}@127.0.0.1:9/a.parquet"
        with pipeline.state.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO sources (source_id, uri, name, size_bytes,"
                                 " num_rows, shard_size, columns) VALUES ('s', 'u', 'n', 1, 1,"
                                 " 1, '{}')"))  # fmt: skip
            conn.execute(sa.text("INSERT INTO shards (shard_id, source_id, shard_index,"
                                 " row_start, row_end) VALUES ('s_0', 's', 0, 0, 1)"))  # fmt: skip
            conn.execute(
                sa.text("INSERT INTO shard_stages (shard_id, stage, status, attempt, last_error)"
                        " VALUES ('s_0', 'fetch', 'failed', 1, :e)"), {"e": secret},
            )  # fmt: skip
            conn.execute(
                sa.text("INSERT INTO stage_events (shard_id, stage, attempt, event, error)"
                        " VALUES ('s_0', 'fetch', 1, 'failed', :e)"), {"e": secret},
            )  # fmt: skip
        shown = [pipeline.state.get_stage("s_0", "fetch").last_error]
        shown += [event["error"] for event in pipeline.state.events("s_0")]
        assert all("fc:***@" in text and URL_PASSWORD not in text for text in shown), shown

        missing = f"http://fc:{URL_PASSWORD}@127.0.0.1:9/missing.parquet"
        errors = pipeline.plan([missing]).errors
    assert list(errors) == ["http://fc:***@127.0.0.1:9/missing.parquet"]
    assert URL_PASSWORD not in json.dumps(errors)
