"""Human and machine-readable views of shard state: the `status` table and its JSON, shared by
the CLI, the demo and the Airflow summary task; and what the shard view marks on a stage
besides its status (its warnings, a fetch whose every row failed, a refusal, staleness)."""

from __future__ import annotations

from typing import Any

from facecaption.core.artifacts import FETCH_KEPT, FETCH_POLICY
from facecaption.core.errors import PermanentError
from facecaption.core.fingerprints import Fingerprints
from facecaption.core.pipeline import Pipeline, ShardStatusRow, status_totals
from facecaption.core.stage import StageInputError, stage_registry
from facecaption.state.shards import REFUSED, StageState

# What the table shows for a done stage; the JSON view has every count.
_HEADLINE = {
    "fetch": lambda counts: (
        f"{counts.get('ok', 0)}/{counts.get('rows', 0)}"
        + (f", {counts['gave_up']} gave up" if counts.get("gave_up") else "")
    ),
    "detect": lambda counts: f"{counts.get('faces_kept', 0)} faces",
    "attribute": lambda counts: f"{counts.get('kept', 0)}/{counts.get('faces', 0)} kept",
    "caption": lambda counts: (
        f"{counts.get('llm_captions', 0)}/{counts.get('faces', 0)} llm"
        + (f", {counts['gave_up']} gave up" if counts.get("gave_up") else "")
    ),
    "export": lambda counts: f"{counts.get('released', 0)} rows",
}


def cell_text(stage: str, status: str, counts: dict[str, Any]) -> str:
    headline = _HEADLINE.get(stage)
    return f"done {headline(counts)}" if status == "done" and headline else status


def format_status(rows: list[ShardStatusRow]) -> str:
    if not rows:
        return "no shards registered: run `facecaption plan SOURCE`"
    stages = list(rows[0].stages)
    header = ["shard", "source", "rows", *stages]
    table = [
        [
            row.shard_id,
            row.source,
            str(row.rows),
            *(cell_text(stage, state.status, state.counts) for stage, state in row.stages.items()),
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in [header, *table]
    ]
    lines += stage_summaries(rows)
    return "\n".join(line.rstrip() for line in lines)


def stage_summaries(rows: list[ShardStatusRow], stages: list[str] | None = None) -> list[str]:
    """One line per stage: its shards by status and the sum of each count."""
    totals = status_totals(rows)
    lines = []
    for stage in totals if stages is None else stages:
        total = totals.get(stage, {"shards": {}, "counts": {}})
        shards = ", ".join(f"{n} {status}" for status, n in sorted(total["shards"].items()))
        counts = ", ".join(f"{name} {n}" for name, n in sorted(total["counts"].items()))
        lines.append(f"{stage}: {shards}" + (f"; {counts}" if counts else ""))
    return lines


def status_json(rows: list[ShardStatusRow]) -> dict[str, Any]:
    return {
        "totals": status_totals(rows),
        "shards": [
            {
                "shard_id": row.shard_id,
                "source": row.source,
                "rows": row.rows,
                "stages": {
                    name: {
                        "status": state.status,
                        "attempt": state.attempt,
                        "worker": state.worker,
                        "counts": state.counts,
                        "artifacts": state.artifacts,
                        "last_error": state.last_error,
                        "fingerprint": state.fingerprint,
                        # when its retryable work is due (None: at once, or there is none)
                        "retry_at": state.retry_at.isoformat() if state.retry_at else None,
                    }
                    for name, state in row.stages.items()
                },
            }
            for row in rows
        ],
    }


def stage_alerts(stage: str, state: StageState) -> list[str]:
    """What a stage's status alone hides: the warnings its last run recorded, that every row
    of a done fetch failed (said even where the error-rate warning is turned off), and why a
    run was refused before it started."""
    alerts = list(state.warnings) if state.status == "done" else []
    said = any("100%" in warning for warning in alerts)
    if state.status == "done" and stage == "fetch" and every_row_failed(state.counts) and not said:
        alerts.append(f"every row failed ({state.counts.get('rows', 0)} rows)")
    if state.last_error and state.last_error.startswith(REFUSED):
        alerts.append(state.last_error)
    return alerts


def every_row_failed(counts: dict[str, Any]) -> bool:
    """A fetch's counts: it had rows, and none was kept or left out by policy."""
    rows = counts.get("rows", 0)
    settled = sum(counts.get(status, 0) for status in FETCH_KEPT | FETCH_POLICY)
    return isinstance(rows, int) and rows > 0 and settled == 0


def stage_tone(stage: str, state: StageState) -> str:
    """How a stage reads at a glance: `failed` for a failed stage and for a done fetch whose
    every row failed, `warning` for a done stage with warnings, else its status."""
    if state.status == "done" and stage == "fetch" and every_row_failed(state.counts):
        return "failed"
    if state.status == "done" and state.warnings:
        return "warning"
    return state.status


def stale_stages(pipeline: Pipeline, shard_ids: list[str]) -> dict[tuple[str, str], str]:
    """(shard id, stage) -> why, for the done stages of `shard_ids` whose recorded fingerprint
    is not what they would have now (their inputs, settings or model changed): `stale`, or
    what kept a stage's current fingerprint from being worked out (a model not installed).
    Four queries, whatever the number of shards."""
    if not shard_ids:
        return {}
    stages = stage_registry()
    fingerprints = Fingerprints.prefetch(pipeline.settings, pipeline.state, stages, shard_ids)
    stale: dict[tuple[str, str], str] = {}
    unknown: dict[str, str] = {}  # stage -> why its settings part cannot be worked out
    for shard in pipeline.state.list_shards(shard_ids=shard_ids):
        for name in stages:
            state = fingerprints.inputs.find(shard.shard_id, name)
            if state is None or state.status != "done":
                continue
            if name in unknown:
                stale[(shard.shard_id, name)] = unknown[name]
                continue
            try:
                current = fingerprints.current(name, shard)
            except StageInputError:
                continue  # its input is not done: the earlier stage is the one to redo
            except PermanentError as error:
                unknown[name] = f"cannot tell if stale: {error}"
                stale[(shard.shard_id, name)] = unknown[name]
                continue
            if current != state.fingerprint:
                stale[(shard.shard_id, name)] = "stale"
    return stale
