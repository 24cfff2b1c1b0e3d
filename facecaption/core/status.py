"""Human and machine-readable views of shard state: the `status` table and its JSON, shared by
the CLI, the demo and the Airflow summary task."""

from __future__ import annotations

from typing import Any

from facecaption.core.pipeline import ShardStatusRow, status_totals

# What the table shows for a done stage; the JSON view has every count.
_HEADLINE = {
    "fetch": lambda counts: (
        f"{counts.get('ok', 0)}/{counts.get('rows', 0)}"
        + (f", {counts['gave_up']} gave up" if counts.get("gave_up") else "")
    ),
    "detect": lambda counts: f"{counts.get('faces_kept', 0)} faces",
    "attribute": lambda counts: f"{counts.get('kept', 0)}/{counts.get('faces', 0)} kept",
    "caption": lambda counts: f"{counts.get('llm_captions', 0)}/{counts.get('faces', 0)} llm",
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
