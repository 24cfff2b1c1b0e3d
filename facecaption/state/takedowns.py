"""Takedown requests in Postgres: what was asked (URLs, image sha256s), which source rows
match, and when the request reached the release. Fetch asks `TakedownIndex` which URLs and
bytes to skip; the export stage leaves matched rows out and its fingerprint covers them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from facecaption.core.errors import PermanentError

SHA256_LENGTH = 64


class TakedownRequestError(PermanentError, ValueError):
    """A takedown request that cannot be recorded (nothing asked, a malformed sha256...)."""


@dataclass(frozen=True)
class TakedownRequest:
    request_id: int
    requested_at: datetime
    requested_by: str | None
    reason: str | None
    urls: list[str]
    sha256s: list[str]
    applied_at: datetime | None
    matched: dict[str, Any] | None
    outputs: dict[str, Any] | None


def normalise_request(urls: list[str], sha256s: list[str]) -> tuple[list[str], list[str]]:
    """Stripped, de-duplicated URLs and lower-case sha256s; TakedownRequestError if empty or
    a sha256 is not 64 hex digits."""
    clean_urls = list(dict.fromkeys(url.strip() for url in urls if url and url.strip()))
    clean_shas = list(dict.fromkeys(sha.strip().lower() for sha in sha256s if sha and sha.strip()))
    bad = [
        sha for sha in clean_shas
        if len(sha) != SHA256_LENGTH or any(c not in "0123456789abcdef" for c in sha)
    ]  # fmt: skip
    if bad:
        raise TakedownRequestError(f"not a sha256 (64 hex digits): {', '.join(bad)}")
    if not clean_urls and not clean_shas:
        raise TakedownRequestError("a takedown request needs at least one URL or sha256")
    return clean_urls, clean_shas


class TakedownIndex:
    """Which URLs and image sha256s are under a takedown (any request, applied or not)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def blocked(self, kind: str, values: list[str]) -> set[str]:
        """The members of `values` under a takedown; `kind` is "url" or "sha256"."""
        if not values:
            return set()
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT DISTINCT value FROM takedown_items"
                    " WHERE kind = :kind AND value = ANY(CAST(:values AS text[]))"
                ),
                {"kind": kind, "values": list(values)},
            )
            return {row.value for row in rows}

    def shard_matches(self, shard_id: str) -> list[tuple[int, str]]:
        """(request id, key) of every recorded match in one shard, sorted."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT request_id, key FROM takedown_matches WHERE shard_id = :shard"
                    " ORDER BY request_id, key"
                ),
                {"shard": shard_id},
            )
            return [(row.request_id, row.key) for row in rows]

    def record(
        self, urls: list[str], sha256s: list[str], reason: str | None, requested_by: str | None
    ) -> int:
        urls, sha256s = normalise_request(urls, sha256s)
        with self.engine.begin() as conn:
            request_id = conn.execute(
                sa.text(
                    "INSERT INTO takedown_requests (requested_by, reason, urls, sha256s)"
                    " VALUES (:by, :reason, CAST(:urls AS jsonb), CAST(:shas AS jsonb))"
                    " RETURNING request_id"
                ),
                {
                    "by": requested_by,
                    "reason": reason,
                    "urls": json.dumps(urls),
                    "shas": json.dumps(sha256s),
                },
            ).scalar_one()
            items = [("url", url) for url in urls] + [("sha256", sha) for sha in sha256s]
            conn.execute(
                sa.text(
                    "INSERT INTO takedown_items (kind, value, request_id)"
                    " VALUES (:kind, :value, :request)"
                ),
                [{"kind": kind, "value": value, "request": request_id} for kind, value in items],
            )
        return int(request_id)

    def add_matches(self, request_id: int, matches: list[dict[str, Any]]) -> None:
        """Record matched rows `{shard_id, key, url, sha256}` (idempotent)."""
        if not matches:
            return
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO takedown_matches (request_id, shard_id, key, url, sha256)"
                    " VALUES (:request, :shard_id, :key, :url, :sha256)"
                    " ON CONFLICT DO NOTHING"
                ),
                [{"request": request_id, **match} for match in matches],
            )

    def mark_applied(
        self, request_id: int, matched: dict[str, Any], outputs: dict[str, Any]
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE takedown_requests SET applied_at = now(),"
                    " matched = CAST(:matched AS jsonb), outputs = CAST(:outputs AS jsonb)"
                    " WHERE request_id = :request"
                ),
                {
                    "request": request_id,
                    "matched": json.dumps(matched),
                    "outputs": json.dumps(outputs),
                },
            )

    def get(self, request_id: int) -> TakedownRequest:
        requests = self.list(request_id)
        if not requests:
            raise TakedownRequestError(f"no takedown request {request_id}")
        return requests[0]

    def list(self, request_id: int | None = None) -> list[TakedownRequest]:
        query = "SELECT * FROM takedown_requests"
        if request_id is not None:
            query += " WHERE request_id = :request"
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(query + " ORDER BY request_id"), {"request": request_id})
            return [
                TakedownRequest(
                    row.request_id,
                    row.requested_at,
                    row.requested_by,
                    row.reason,
                    list(row.urls),
                    list(row.sha256s),
                    row.applied_at,
                    row.matched,
                    row.outputs,
                )  # fmt: skip
                for row in rows
            ]

    def request_ids(self) -> list[int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT request_id FROM takedown_requests ORDER BY 1"))
            return [row.request_id for row in rows]
