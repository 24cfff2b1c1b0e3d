"""The shard view's HTML: the shards x stages page and one shard's history page, styled like
Airflow's UI (its Inter font, its grays and state colours, light and dark).

Inside Airflow's navigation the pages run in the UI's iframe (same origin, sandboxed without
top navigation): a small script takes the UI's colour mode and theme variables from the
parent page, and opens links into Airflow's UI (runs, task instances, logs) in the parent
window. Opened on their own, the pages follow the browser's colour scheme."""

from __future__ import annotations

import json
from html import escape
from typing import Any
from urllib.parse import urlencode

from facecaption.core.pipeline import StatusPage
from facecaption.core.status import cell_text, stage_alerts, stage_tone
from facecaption.state.shards import REFUSED, STATUSES
from facecaption_airflow.airflow_tasks import TASK_FAILED_STATES, StageTask

BUILD_DAG_ID = "facecaption_build"
ERROR_PREVIEW_CHARS = 160  # the rest of a long error is on hover

STYLE = """
:root {
  --fc-font: Inter, ui-sans-serif, system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  --fc-bg: #ffffff; --fc-fg: #09090b; --fc-muted: #52525b; --fc-border: #e4e4e7;
  --fc-subtle: #fafafa; --fc-link: #2563eb; --fc-done: #16a34a; --fc-failed: #dc2626;
  --fc-warning: #ea580c; --fc-running: #0891b2; --fc-pending: #71717a;
  color-scheme: light;
}
:root.dark {
  --fc-bg: #09090b; --fc-fg: #fafafa; --fc-muted: #a1a1aa; --fc-border: #27272a;
  --fc-subtle: #18181b; --fc-link: #93c5fd; --fc-done: #86efac; --fc-failed: #fca5a5;
  --fc-warning: #fdba74; --fc-running: #67e8f9; --fc-pending: #a1a1aa;
  color-scheme: dark;
}
@media (prefers-color-scheme: dark) {
  :root:not(.light):not(.dark) {
    --fc-bg: #09090b; --fc-fg: #fafafa; --fc-muted: #a1a1aa; --fc-border: #27272a;
    --fc-subtle: #18181b; --fc-link: #93c5fd; --fc-done: #86efac; --fc-failed: #fca5a5;
    --fc-warning: #fdba74; --fc-running: #67e8f9; --fc-pending: #a1a1aa;
    color-scheme: dark;
  }
}
body { font-family: var(--fc-font); font-size: 14px; line-height: 1.45; margin: 0;
  padding: 16px 20px; background: var(--fc-bg); color: var(--fc-fg); }
h1 { font-size: 20px; font-weight: 600; margin: 0 0 4px; }
h2 { font-size: 16px; font-weight: 600; margin: 20px 0 8px; }
a { color: var(--fc-link); text-decoration: none; }
a:hover { text-decoration: underline; }
.muted, small { color: var(--fc-muted); }
form.filters, form#rerun { display: flex; flex-wrap: wrap; gap: 8px; align-items: center;
  margin: 12px 0; }
select, input, button { font: inherit; color: inherit; background: var(--fc-bg);
  border: 1px solid var(--fc-border); border-radius: 6px; padding: 4px 8px; }
button { cursor: pointer; background: var(--fc-subtle); }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid var(--fc-border); padding: 6px 8px; text-align: left;
  vertical-align: top; }
th { font-weight: 600; color: var(--fc-muted); background: var(--fc-subtle); }
td.stage { border-left: 3px solid var(--tone); min-width: 9em; }
.status { font-weight: 600; color: var(--tone); }
.tone-done { --tone: var(--fc-done); }
.tone-failed { --tone: var(--fc-failed); }
.tone-warning { --tone: var(--fc-warning); }
.tone-running { --tone: var(--fc-running); }
.tone-pending { --tone: var(--fc-pending); }
.badge { display: inline-block; border: 1px solid currentColor; border-radius: 9px;
  padding: 0 6px; font-size: 12px; margin-left: 4px; }
.stale { color: var(--fc-warning); }
.alert { color: var(--fc-warning); font-size: 12px; }
.error { color: var(--fc-failed); font-size: 12px; word-break: break-word; }
.links { font-size: 12px; }
.totals { display: flex; flex-wrap: wrap; gap: 16px; margin: 8px 0; font-size: 13px; }
.pager { display: flex; gap: 12px; margin: 12px 0; }
"""

# Airflow's UI is Chakra UI: its theme variables (resolved in the parent page for its colour
# mode) -> ours.
THEME_SCRIPT = """
(function () {
  const root = document.documentElement;
  const themeVars = [
    ['--fc-font', '--chakra-fonts-body'], ['--fc-bg', '--chakra-colors-bg'],
    ['--fc-fg', '--chakra-colors-fg'], ['--fc-muted', '--chakra-colors-fg-muted'],
    ['--fc-border', '--chakra-colors-border'], ['--fc-subtle', '--chakra-colors-bg-subtle'],
  ];
  let host = null;
  try {
    if (window.parent !== window) host = window.parent.document.documentElement;
  } catch (error) { host = null; }  // not Airflow's UI around us
  function sync() {
    const dark = host.classList.contains('dark');
    root.classList.toggle('dark', dark);
    root.classList.toggle('light', !dark);
    const css = window.parent.getComputedStyle(host);
    for (const [ours, theirs] of themeVars) {
      const value = css.getPropertyValue(theirs).trim();
      if (value) root.style.setProperty(ours, value); else root.style.removeProperty(ours);
    }
  }
  if (host) {
    sync();
    new MutationObserver(sync).observe(host, {attributes: true, attributeFilter: ['class']});
  }
  // Links into Airflow's UI open in the UI's window: the iframe may not navigate it itself
  // (no allow-top-navigation), but a link of the parent's own document may.
  document.addEventListener('click', (event) => {
    const link = event.target.closest('a[data-ui]');
    if (!link || !host || event.button !== 0 || event.ctrlKey || event.metaKey
        || event.shiftKey) return;
    event.preventDefault();
    const outer = window.parent.document.createElement('a');
    outer.href = link.href;
    window.parent.document.body.appendChild(outer);
    outer.click();
    outer.remove();
  });
})();
"""

RERUN_SCRIPT = """
document.getElementById('rerun').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.target;
  const out = document.getElementById('rerun-result');
  const conf = {
    shard_ids: [form.dataset.shard],
    stages: [...form.querySelectorAll('input[name=stage]:checked')].map((box) => box.value),
    force: form.querySelector('input[name=force]').checked,
    publish: form.querySelector('input[name=publish]').checked,
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
    link.href = form.dataset.runs + encodeURIComponent(body.dag_run_id);
    link.dataset.ui = '';
    link.textContent = 'started run ' + body.dag_run_id;
    out.appendChild(link);
  } catch (error) {
    out.textContent = 'could not reach the Airflow API: ' + error;
  }
});
"""


def _page(title: str, body: str, scripts: str = "") -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style>"
        f"<script>{THEME_SCRIPT}</script></head><body>{body}"
        f"{f'<script>{scripts}</script>' if scripts else ''}</body></html>"
    )


def _options(values: tuple[str, ...], chosen: str, blank: str) -> str:
    return "".join(
        f'<option value="{escape(v)}"{" selected" if v == chosen else ""}>'
        f"{escape(v or blank)}</option>"
        for v in ("", *values)
    )


def _task_links(task: StageTask, ui_base: str) -> str:
    """Links to the task instance's run, page and log in Airflow's UI, and its state there."""
    state = task.state or "no state"
    failed = task.state in TASK_FAILED_STATES
    return (
        f'<div class="links{" error" if failed else ""}" data-task-state="{escape(state)}">'
        f"Airflow {escape(state)} (try {task.try_number}): "
        f'<a data-ui data-link="run" href="{escape(task.run_url(ui_base))}">run</a> · '
        f'<a data-ui data-link="task" href="{escape(task.task_url(ui_base))}">task</a> · '
        f'<a data-ui data-link="log" href="{escape(task.log_url(ui_base))}">log</a></div>'
    )


def _stage_cell(
    name: str,
    state: Any,
    stale: str | None,
    task: StageTask | None,
    ui_base: str,
) -> str:
    tone = stage_tone(name, state)
    parts = [f'<span class="status">{escape(cell_text(name, state.status, state.counts))}</span>']
    if stale:
        title = "" if stale == "stale" else f' title="{escape(stale)}"'
        mark = "stale" if stale == "stale" else "stale?"
        parts.append(f'<span class="badge stale"{title}>{mark}</span>')
    parts.append(f"<br><small>attempt {state.attempt}</small>")
    alerts = stage_alerts(name, state)
    parts += [f'<div class="alert">{escape(alert)}</div>' for alert in alerts]
    if state.last_error and state.status == "failed" and not state.last_error.startswith(REFUSED):
        short = state.last_error[:ERROR_PREVIEW_CHARS]
        more = "…" if len(state.last_error) > ERROR_PREVIEW_CHARS else ""
        parts.append(
            f'<div class="error" title="{escape(state.last_error)}">{escape(short)}{more}</div>'
        )
    if task is not None:
        parts.append(_task_links(task, ui_base))
    return (
        f'<td class="stage tone-{tone}" data-stage="{escape(name)}" data-tone="{tone}">'
        + "".join(parts)
        + "</td>"
    )


def status_html(
    page: StatusPage,
    *,
    stale: dict[tuple[str, str], str],
    tasks: dict[tuple[str, str], StageTask],
    stages: list[str],
    ui_base: str,
    status: str = "",
    stage: str = "",
    query: str = "",
    page_number: int = 0,
    page_size: int,
) -> str:
    """The shard view: a page of shards x stages with status, headline counts, attempt,
    warnings, stale markers, errors and links to each stage's task instance in Airflow, the
    totals per stage over all shards, filters (a stage's status, a shard-id substring) and
    paging."""
    header = "".join(f"<th>{escape(name)}</th>" for name in stages)
    body = []
    for row in page.rows:
        cells = "".join(
            _stage_cell(
                name, state, stale.get((row.shard_id, name)), tasks.get((row.shard_id, name)),
                ui_base,
            )
            for name, state in row.stages.items()
        )  # fmt: skip
        shard = escape(row.shard_id)
        body.append(
            f'<tr data-shard="{shard}"><td><a href="shards/{shard}">{shard}</a></td>'
            f"<td>{escape(row.source)}</td><td>{row.rows}</td>{cells}</tr>"
        )
    totals = "".join(
        f"<div><b>{escape(name)}</b> "
        + ", ".join(f"{n} {escape(s)}" for s, n in sorted(by_status.items()))
        + "</div>"
        for name in stages
        for by_status in [page.totals.get(name, {}).get("shards", {})]
    )
    first = page_number * page_size
    filters = {"status": status, "stage": stage, "q": query}

    def page_link(number: int, label: str) -> str:
        return f'<a href="shards?{escape(urlencode({**filters, "page": number}))}">{label}</a>'

    pager = []
    if page_number > 0:
        pager.append(page_link(page_number - 1, "← previous"))
    if first + len(page.rows) < page.matched:
        pager.append(page_link(page_number + 1, "next →"))
    shown = f"{first + 1}-{first + len(page.rows)}" if page.rows else "0"
    return _page(
        "facecaption shards",
        "<h1>facecaption shards</h1>"
        f'<p class="muted">{shown} of {page.matched} matching shards'
        f" ({page.registered} registered)</p>"
        f'<div class="totals">{totals}</div>'
        '<form class="filters" method="get">'
        f'<select name="stage">{_options(tuple(stages), stage, "any stage")}</select>'
        f'<select name="status">{_options(STATUSES, status, "any status")}</select>'
        f'<input name="q" value="{escape(query)}" placeholder="shard id contains">'
        '<button type="submit">Filter</button></form>'
        f"<table><thead><tr><th>shard</th><th>source</th><th>rows</th>{header}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
        f'<div class="pager">{"".join(pager)}</div>',
    )


def rerun_conf(shard_id: str, stages: list[str]) -> dict[str, Any]:
    """The build DAG conf the history page's form sends by default: the shard's stages that
    are not up to date, without forcing the others, and no release."""
    return {"shard_ids": [shard_id], "stages": stages, "force": False, "publish": False}


def history_html(
    shard_id: str,
    events: list[dict[str, Any]],
    stages: list[str],
    *,
    ui_base: str,
    tasks: dict[tuple[str, str], StageTask],
) -> str:
    """One shard's attempt history, newest first, links to its stages' latest task instances,
    and a form that re-runs chosen stages of it through Airflow's REST API as the signed-in
    user (the UI's session cookie). Force and publishing the release are off unless ticked."""
    rows = "".join(
        f"<tr><td>{escape(str(e['at']))}</td><td>{escape(e['stage'])}</td><td>{e['attempt']}"
        f"</td><td>{escape(e['event'])}</td><td>{escape(e['worker'] or '')}</td>"
        f"<td>{escape(', '.join(e.get('warnings') or []))}</td>"
        f"<td>{escape(e['error'] or '')}</td></tr>"
        for e in sorted(events, key=lambda e: e["event_id"], reverse=True)
    )
    boxes = "".join(
        f'<label><input type="checkbox" name="stage" value="{escape(stage)}" checked>'
        f" {escape(stage)}</label> "
        for stage in stages
    )
    links = "".join(
        f"<tr><td>{escape(stage)}</td><td>{_task_links(tasks[(shard_id, stage)], ui_base)}</td>"
        "</tr>"
        for stage in stages
        if (shard_id, stage) in tasks
    )
    api = f"{ui_base}/api/v2/dags/{BUILD_DAG_ID}/dagRuns"
    conf = json.dumps({"logical_date": None, "conf": rerun_conf(shard_id, stages)})
    shard = escape(shard_id)
    return _page(
        shard_id,
        f'<p><a href="../shards">← all shards</a></p><h1>{shard}</h1>'
        + (f"<h2>In Airflow</h2><table><tbody>{links}</tbody></table>" if links else "")
        + f'<h2>Re-run this shard</h2><form id="rerun" method="post" action="{escape(api)}"'
        f' data-shard="{shard}" data-runs="{escape(ui_base)}/dags/{BUILD_DAG_ID}/runs/">'
        f"{boxes}"
        '<label title="Run the ticked stages even where they are done with the same inputs">'
        '<input type="checkbox" name="force"> force</label> '
        '<label title="Publish the release files, manifest and report at the end of the run">'
        '<input type="checkbox" name="publish"> publish the release</label> '
        '<button type="submit">Re-run</button> <span id="rerun-result"></span></form>'
        '<p class="muted">Without force, a ticked stage that is done with the same inputs is'
        " skipped: only failed, pending and stale ones run.</p>"
        f'<p class="muted">The same from a shell: <code>POST {escape(api)}</code> with'
        f" <code>{escape(conf)}</code>.</p>"
        "<h2>History</h2><table><thead><tr><th>at</th><th>stage</th><th>attempt</th>"
        "<th>event</th><th>worker</th><th>warnings</th><th>error</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>",
        RERUN_SCRIPT,
    )
