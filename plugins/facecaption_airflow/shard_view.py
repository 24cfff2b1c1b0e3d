"""The shard view: a FastAPI app the facecaption plugin mounts under Airflow's api-server.

Its pages read shard state from the facecaption state DB (never Airflow's): every shard x
stage with status, headline counts, attempt and last error, filtered by status, stage and
shard id, and one shard's attempt history with a form that re-runs chosen stages through
Airflow's REST API."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from facecaption.core.pipeline import ShardStatusRow
from facecaption.core.status import cell_text

_STATUS_COLOURS = {"done": "#1a7f37", "failed": "#cf222e", "running": "#9a6700",
                   "pending": "#57606a"}  # fmt: skip


def status_html(
    rows: list[ShardStatusRow], *, status: str = "", stage: str = "", query: str = ""
) -> str:
    """The shard view: shards x stages with status, counts, attempt and last error, filtered
    by a stage's status and a shard-id substring; each shard links to its history."""
    from html import escape

    stages = list(rows[0].stages) if rows else []
    shown = [
        row for row in rows
        if query in row.shard_id
        and (not status or any(
            state.status == status for name, state in row.stages.items()
            if not stage or name == stage
        ))
    ]  # fmt: skip
    options = "".join(
        f'<option value="{s}"{" selected" if s == status else ""}>{s or "any status"}</option>'
        for s in ("", *_STATUS_COLOURS)
    )
    stage_options = "".join(
        f'<option value="{s}"{" selected" if s == stage else ""}>{s or "any stage"}</option>'
        for s in ("", *stages)
    )
    header = "".join(f"<th>{escape(name)}</th>" for name in stages)
    body = []
    for row in shown:
        cells = []
        for name, state in row.stages.items():
            colour = _STATUS_COLOURS.get(state.status, "#57606a")
            title = escape(
                state.last_error or ", ".join(f"{k} {v}" for k, v in state.counts.items())
            )
            cells.append(
                f'<td title="{title}"><span class="status" style="color:{colour}">'
                f"{escape(cell_text(name, state.status, state.counts))}</span>"
                f"<br><small>attempt {state.attempt}</small></td>"
            )
        body.append(
            f'<tr data-shard="{escape(row.shard_id)}"><td><a href="shards/{escape(row.shard_id)}">'
            f"{escape(row.shard_id)}</a></td><td>{escape(row.source)}</td><td>{row.rows}</td>"
            + "".join(cells)
            + "</tr>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>facecaption shards</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:left}</style></head><body>"
        f"<h1>facecaption shards</h1><p>{len(shown)} of {len(rows)} shards</p>"
        f'<form method="get"><select name="stage">{stage_options}</select>'
        f'<select name="status">{options}</select>'
        f'<input name="q" value="{escape(query)}" placeholder="shard id contains">'
        '<button type="submit">filter</button></form>'
        f"<table><thead><tr><th>shard</th><th>source</th><th>rows</th>{header}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></body></html>"
    )


RERUN_SCRIPT = """
document.getElementById('rerun').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.target;
  const out = document.getElementById('rerun-result');
  const conf = {
    shard_ids: [form.dataset.shard],
    stages: [...form.querySelectorAll('input[name=stage]:checked')].map((box) => box.value),
    force: form.querySelector('input[name=force]').checked,
  };
  out.textContent = 'triggering...';
  try {
    const response = await fetch(form.action, {
      method: 'POST', credentials: 'same-origin',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({logical_date: null, conf: conf}),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = JSON.stringify(body.detail || body);
      out.textContent = 'Airflow said ' + response.status + ': ' + detail;
      return;
    }
    out.innerHTML = '';
    const link = document.createElement('a');
    link.href = '/dags/facecaption_build/runs/' + encodeURIComponent(body.dag_run_id);
    link.textContent = 'started run ' + body.dag_run_id;
    out.appendChild(link);
  } catch (error) {
    out.textContent = 'could not reach the Airflow API: ' + error;
  }
});
"""
BUILD_RUNS_API = "/api/v2/dags/facecaption_build/dagRuns"


def rerun_conf(shard_id: str, stages: list[str]) -> dict[str, Any]:
    """The build DAG conf that re-runs one shard's stages."""
    return {"shard_ids": [shard_id], "stages": stages, "force": True}


def history_html(shard_id: str, events: list[dict[str, Any]], stages: list[str]) -> str:
    """One shard's attempt history, newest first, and a form that re-runs chosen stages of it
    through Airflow's REST API as the signed-in user (the UI session cookie)."""
    from html import escape

    rows = "".join(
        f"<tr><td>{escape(str(e['at']))}</td><td>{escape(e['stage'])}</td><td>{e['attempt']}"
        f"</td><td>{escape(e['event'])}</td><td>{escape(e['worker'] or '')}</td>"
        f"<td>{escape(e['error'] or '')}</td></tr>"
        for e in sorted(events, key=lambda e: e["event_id"], reverse=True)
    )
    boxes = "".join(
        f'<label><input type="checkbox" name="stage" value="{escape(stage)}" checked>'
        f" {escape(stage)}</label> "
        for stage in stages
    )
    conf = json.dumps({"logical_date": None, "conf": rerun_conf(shard_id, stages)})
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{escape(shard_id)}</title></head><body><h1>{escape(shard_id)}</h1>"
        f'<h2>Re-run this shard</h2><form id="rerun" method="post" action="{BUILD_RUNS_API}"'
        f' data-shard="{escape(shard_id)}">{boxes}<label><input type="checkbox" name="force"'
        ' checked> force</label> <button type="submit">Re-run</button>'
        ' <span id="rerun-result"></span></form>'
        f"<p>The same from a shell: <code>POST {BUILD_RUNS_API}</code> with"
        f" <code>{escape(conf)}</code>.</p>"
        "<h2>History</h2><table><thead><tr><th>at</th><th>stage</th><th>attempt</th>"
        f"<th>event</th><th>worker</th><th>error</th></tr></thead><tbody>{rows}</tbody></table>"
        f"<script>{RERUN_SCRIPT}</script></body></html>"
    )


def create_app() -> FastAPI:
    app = FastAPI(title="facecaption shards")

    @app.get("/shards", response_class=HTMLResponse)
    def shards(status: str = "", stage: str = "", q: str = "") -> str:
        from facecaption.core.pipeline import Pipeline

        with Pipeline.open() as pipeline:
            return status_html(pipeline.status(), status=status, stage=stage, query=q)

    @app.get("/shards/{shard_id}", response_class=HTMLResponse)
    def shard(shard_id: str) -> str:
        from facecaption.core.pipeline import Pipeline
        from facecaption.state import UnknownShardError

        with Pipeline.open() as pipeline:
            try:
                pipeline.state.get_shard(shard_id)
            except UnknownShardError as error:
                raise HTTPException(status_code=404, detail=str(error)) from error
            return history_html(shard_id, pipeline.state.events(shard_id), pipeline.stage_names)

    return app
