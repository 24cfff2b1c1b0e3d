"""Takedown requests in Postgres: what was asked (URLs, image sha256s), which source rows
match, and when the request reached the release. Fetch asks `TakedownIndex` which URLs and
bytes to skip, and records every image it keeps (normalised URL, sha256) in `fetched_images`;
pending requests are matched against that index in one statement, without reading any shard
artifact. The export stage leaves matched rows out and its fingerprint covers them.
URLs are compared normalised (`facecaption.core.urls`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from facecaption.core.errors import PermanentError
from facecaption.core.urls import normalise_url

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
        """The members of `values` under a takedown; `kind` is "url" (compared as written
        and normalised) or "sha256"."""
        forms: dict[str, set[str]] = {}
        for value in values:
            if not isinstance(value, str) or "\x00" in value:
                continue  # nothing a query may carry, nor anything a request could name
            forms.setdefault(value, set()).add(value)
            normalised = normalise_url(value) if kind == "url" else None
            if normalised is not None:
                forms.setdefault(normalised, set()).add(value)
        if not forms:
            return set()
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT DISTINCT value FROM takedown_items"
                    " WHERE kind = :kind AND value = ANY(CAST(:values AS text[]))"
                ),
                {"kind": kind, "values": list(forms)},
            )
            return {original for row in rows for original in forms[row.value]}

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

    def matches_by_shard(
        self, shard_ids: Sequence[str] | None = None
    ) -> dict[str, list[tuple[int, str]]]:
        """`shard_matches` of many shards (None: all) in one query."""
        query = "SELECT shard_id, request_id, key FROM takedown_matches"
        if shard_ids is not None:
            query += " WHERE shard_id = ANY(:shards)"
        matches: dict[str, list[tuple[int, str]]] = {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(query + " ORDER BY shard_id, request_id, key"),
                {"shards": list(shard_ids or [])},
            )
            for row in rows:
                matches.setdefault(row.shard_id, []).append((row.request_id, row.key))
        return matches

    def record(
        self, urls: list[str], sha256s: list[str], reason: str | None, requested_by: str | None
    ) -> int:
        urls, sha256s = normalise_request(urls, sha256s)
        # the request keeps the URLs as asked; its items, which matching uses, are normalised
        url_items = list(dict.fromkeys(normalise_url(url) or url for url in urls))
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
            items = [("url", url) for url in url_items] + [("sha256", sha) for sha in sha256s]
            conn.execute(
                sa.text(
                    "INSERT INTO takedown_items (kind, value, request_id)"
                    " VALUES (:kind, :value, :request)"
                ),
                [{"kind": kind, "value": value, "request": request_id} for kind, value in items],
            )
        return int(request_id)

    def index_fetched(
        self, shard_id: str, parquet_sha256: str, images: list[tuple[str, str, str]]
    ) -> None:
        """Record the images one fetch output keeps, `(key, url, sha256)`, replacing what the
        shard's earlier output recorded, and which output (its fetch.parquet sha256) that is."""
        keys, urls, shas = [], [], []
        for key, url, sha in images:
            keys.append(key)
            urls.append(normalise_url(url) or url)
            shas.append(sha)
        with self.engine.begin() as conn:
            conn.execute(
                sa.text("DELETE FROM fetched_images WHERE shard_id = :shard"), {"shard": shard_id}
            )
            conn.execute(
                sa.text(
                    "INSERT INTO fetched_images (shard_id, key, url, sha256) SELECT :shard, k, u, h"
                    " FROM unnest(CAST(:keys AS text[]), CAST(:urls AS text[]),"
                    " CAST(:shas AS text[])) AS i(k, u, h)"
                ),
                {"shard": shard_id, "keys": keys, "urls": urls, "shas": shas},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO fetched_images_indexed (shard_id, parquet_sha256)"
                    " VALUES (:shard, :sha) ON CONFLICT (shard_id) DO UPDATE"
                    " SET parquet_sha256 = EXCLUDED.parquet_sha256, indexed_at = now()"
                ),
                {"shard": shard_id, "sha": parquet_sha256},
            )

    def unindexed_fetches(self, parquet_name: str) -> dict[str, str]:
        """Shards whose done fetch output (`parquet_name`'s sha256) is not the one indexed:
        fetched before the index existed. One query."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT ss.shard_id, ss.artifacts -> :name ->> 'sha256' AS sha256"
                    " FROM shard_stages ss LEFT JOIN fetched_images_indexed x"
                    " ON x.shard_id = ss.shard_id WHERE ss.stage = 'fetch'"
                    " AND ss.status = 'done' AND ss.artifacts ? :name"
                    " AND x.parquet_sha256 IS DISTINCT FROM ss.artifacts -> :name ->> 'sha256'"
                    " ORDER BY ss.shard_id"
                ),
                {"name": parquet_name},
            )
            return {row.shard_id: row.sha256 for row in rows}

    def match_pending(self) -> dict[int, dict[str, Any]]:
        """Match every request not applied yet against the fetched-image index in one
        statement: rows with a requested URL, rows with a requested sha256, and rows with the
        sha256 of a requested URL's image (the same picture under URLs nobody named). Records
        the matches; per request: `{rows, shards, sha256s}`."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.text(
                    "WITH pending AS (SELECT request_id FROM takedown_requests"
                    "  WHERE applied_at IS NULL),"
                    " items AS (SELECT i.request_id, i.kind, i.value FROM takedown_items i"
                    "  JOIN pending USING (request_id)),"
                    " by_url AS (SELECT it.request_id, f.shard_id, f.key, f.url, f.sha256"
                    "  FROM items it JOIN fetched_images f ON f.url = it.value"
                    "  WHERE it.kind = 'url'),"
                    " shas AS (SELECT request_id, value AS sha256 FROM items WHERE kind = 'sha256'"
                    "  UNION SELECT request_id, sha256 FROM by_url),"
                    " by_sha AS (SELECT s.request_id, f.shard_id, f.key, f.url, f.sha256"
                    "  FROM shas s JOIN fetched_images f ON f.sha256 = s.sha256),"
                    " found AS (SELECT * FROM by_url UNION SELECT * FROM by_sha),"
                    " recorded AS (INSERT INTO takedown_matches"
                    "  (request_id, shard_id, key, url, sha256)"
                    "  SELECT request_id, shard_id, key, url, sha256 FROM found"
                    "  ON CONFLICT DO NOTHING)"
                    " SELECT p.request_id,"
                    " (SELECT count(*) FROM found f WHERE f.request_id = p.request_id) AS rows,"
                    " ARRAY(SELECT DISTINCT f.shard_id FROM found f"
                    "  WHERE f.request_id = p.request_id ORDER BY 1) AS shards,"
                    " ARRAY(SELECT DISTINCT s.sha256 FROM shas s"
                    "  WHERE s.request_id = p.request_id ORDER BY 1) AS sha256s"
                    " FROM pending p ORDER BY p.request_id"
                )
            )
            return {
                row.request_id: {
                    "rows": int(row.rows),
                    "shards": list(row.shards),
                    "sha256s": list(row.sha256s),
                }
                for row in rows
            }

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
