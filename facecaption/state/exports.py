"""The `exports` table: one row per published release (what it was built from, which files
it wrote, removed and kept, which takedown requests it honoured)."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine


def record_export(
    engine: Engine,
    release_uri: str,
    manifest_sha256: str,
    manifest: dict[str, Any],
    written: list[str],
    removed: list[str],
    kept: list[str],
) -> int:
    with engine.begin() as conn:
        return int(
            conn.execute(
                sa.text(
                    "INSERT INTO exports (release_uri, manifest_sha256, rows, files_written,"
                    " files_removed, files_kept, built_from, takedown_ids) VALUES (:uri, :sha,"
                    " :rows, CAST(:written AS jsonb), CAST(:removed AS jsonb),"
                    " CAST(:kept AS jsonb), CAST(:built AS jsonb), CAST(:takedowns AS jsonb))"
                    " RETURNING export_id"
                ),
                {
                    "uri": release_uri,
                    "sha": manifest_sha256,
                    "rows": manifest["rows"],
                    "written": json.dumps(written),
                    "removed": json.dumps(removed),
                    "kept": json.dumps(kept),
                    "built": json.dumps(manifest["built_from"]),
                    "takedowns": json.dumps(manifest["takedown_requests"]),
                },
            ).scalar_one()
        )
