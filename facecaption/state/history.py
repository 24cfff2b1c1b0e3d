"""The attempt history (`stage_events`) read back in aggregate: per-stage throughput."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine


def stage_throughput(engine: Engine, units: dict[str, str]) -> dict[str, Any]:
    """Per stage in `units` (stage -> the count it measures work in), over its `done` events:
    attempts, total seconds and the sum of that count, as rows keyed by stage."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT e.stage, count(*) AS attempts, sum(e.duration_s) AS seconds,"
                " sum(COALESCE((e.counts ->> u.unit)::bigint, 0)) AS items"
                " FROM stage_events e JOIN unnest(CAST(:stages AS text[]),"
                " CAST(:units AS text[])) AS u(stage, unit) ON u.stage = e.stage"
                " WHERE e.event = 'done' AND e.duration_s IS NOT NULL GROUP BY e.stage"
            ),
            {"stages": list(units), "units": list(units.values())},
        )
        return {row.stage: row for row in rows}
