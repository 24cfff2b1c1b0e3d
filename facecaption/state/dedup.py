"""Cross-shard dedup: which (shard, key) keeps each image's bytes.

`image_holders` has every (shard, key) holding an image's bytes (one key per shard: its first
row with them); `image_hashes` has each image's owner, the smallest (shard_id, key) of its
holders (bytewise order), so the owner does not depend on which shard was fetched first. The
owner keeps the bytes; every other row holding them is a `duplicate` of it.

When a shard's registration changes an image's owner (a smaller holder arrives, or the owner
stops holding it: its row failed on a re-fetch or was taken down), every other shard holding
that image gets its `dedup_epoch` raised. Its fetch outputs name the old owner, and its fetch
fingerprint covers the epoch, so it goes stale and its re-run marks those rows again.

A registration locks the owner rows of its images in sha256 order, then the shards it raises
in shard id order: two shards registering the same images at once wait for each other, and a
fixed order means they cannot deadlock. A registration made for a fetch attempt is fenced like
its files: it is refused (AttemptTakenOverError) once another attempt took the stage over.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from facecaption.state.shards import confirm_attempt

Owner = tuple[str, str]  # (shard_id, key)


class ImageHashIndex:
    """Holders and owners of image sha256s across shards. With `attempt` (stage, number),
    registrations are made for that stage attempt and refused once it is no longer current."""

    def __init__(self, engine: Engine, attempt: tuple[str, int] | None = None) -> None:
        self.engine = engine
        self.attempt = attempt

    def claim(self, shard_id: str, candidates: list[tuple[str, str]]) -> dict[str, Owner]:
        """Register the `(sha256, key)` pairs `shard_id` holds now, in place of what it held
        before; return the owner of each of them."""
        held = dict(sorted(candidates))
        with self.engine.begin() as conn:
            if self.attempt is not None:
                confirm_attempt(conn, shard_id, *self.attempt)
            before = {
                row.sha256: row.key
                for row in conn.execute(
                    sa.text("SELECT sha256, key FROM image_holders WHERE shard_id = :shard"),
                    {"shard": shard_id},
                )
            }
            touched = sorted(set(held) | set(before))
            if not touched:
                return {}
            # Lock the owner row of every image this touches, in sha256 order; a new image gets
            # a row naming this shard (the owner is set below in any case).
            conn.execute(
                sa.text(
                    "INSERT INTO image_hashes (sha256, shard_id, key)"
                    " SELECT sha, :shard, key FROM unnest(CAST(:shas AS text[]),"
                    " CAST(:keys AS text[])) WITH ORDINALITY AS c(sha, key, n) ORDER BY n"
                    " ON CONFLICT (sha256) DO UPDATE SET first_seen = image_hashes.first_seen"
                ),
                {
                    "shard": shard_id,
                    "shas": touched,
                    "keys": [held.get(sha) or before[sha] for sha in touched],
                },
            )
            owners_before = self._rows(
                conn, "SELECT sha256, shard_id, key FROM image_hashes", touched
            )
            conn.execute(
                sa.text(
                    "DELETE FROM image_holders WHERE shard_id = :shard"
                    " AND NOT (sha256 = ANY(CAST(:shas AS text[])))"
                ),
                {"shard": shard_id, "shas": list(held)},
            )
            if held:
                conn.execute(
                    sa.text(
                        "INSERT INTO image_holders (sha256, shard_id, key)"
                        " SELECT sha, :shard, key FROM"
                        " unnest(CAST(:shas AS text[]), CAST(:keys AS text[])) AS c(sha, key)"
                        " ON CONFLICT (sha256, shard_id) DO UPDATE SET key = EXCLUDED.key"
                    ),
                    {"shard": shard_id, "shas": list(held), "keys": list(held.values())},
                )
            owners = self._rows(
                conn,
                "SELECT DISTINCT ON (sha256) sha256, shard_id, key FROM image_holders",
                touched,
                ' ORDER BY sha256, shard_id COLLATE "C", key COLLATE "C"',
            )
            changed = [sha for sha in touched if owners_before.get(sha) != owners.get(sha)]
            self._set_owners(conn, owners, [sha for sha in changed if sha in owners])
            orphans = [sha for sha in touched if sha not in owners]
            if orphans:
                conn.execute(
                    sa.text("DELETE FROM image_hashes WHERE sha256 = ANY(CAST(:shas AS text[]))"),
                    {"shas": orphans},
                )
            self._raise_epochs(conn, shard_id, changed)
        return {sha: owners[sha] for sha in held}

    def owners(self, shas: list[str]) -> dict[str, Owner]:
        """The current owner of each of `shas` that has one."""
        if not shas:
            return {}
        with self.engine.connect() as conn:
            return self._rows(conn, "SELECT sha256, shard_id, key FROM image_hashes", shas)

    def epoch(self, shard_id: str) -> int:
        """How many times the owner of an image this shard holds changed under it."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT dedup_epoch FROM shards WHERE shard_id = :shard"),
                {"shard": shard_id},
            ).scalar()
        return int(found or 0)

    def epochs(self, shard_ids: Sequence[str] | None = None) -> dict[str, int]:
        """`epoch` of many shards (None: all) in one query; a shard left out is at 0."""
        query = "SELECT shard_id, dedup_epoch FROM shards WHERE dedup_epoch <> 0"
        if shard_ids is not None:
            query += " AND shard_id = ANY(CAST(:ids AS text[]))"
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(query), {"ids": list(shard_ids or [])})
            return {row.shard_id: int(row.dedup_epoch) for row in rows}

    @staticmethod
    def _rows(
        conn: sa.Connection, select: str, shas: list[str], order: str = ""
    ) -> dict[str, Owner]:
        rows = conn.execute(
            sa.text(f"{select} WHERE sha256 = ANY(CAST(:shas AS text[])){order}"),
            {"shas": shas},
        )
        return {row.sha256: (row.shard_id, row.key) for row in rows}

    @staticmethod
    def _set_owners(conn: sa.Connection, owners: dict[str, Owner], shas: list[str]) -> None:
        if not shas:
            return
        conn.execute(
            sa.text(
                "UPDATE image_hashes h SET shard_id = c.shard_id, key = c.key FROM"
                " unnest(CAST(:shas AS text[]), CAST(:shards AS text[]), CAST(:keys AS text[]))"
                " AS c(sha, shard_id, key) WHERE h.sha256 = c.sha"
            ),
            {
                "shas": shas,
                "shards": [owners[sha][0] for sha in shas],
                "keys": [owners[sha][1] for sha in shas],
            },
        )

    @staticmethod
    def _raise_epochs(conn: sa.Connection, shard_id: str, changed: list[str]) -> None:
        """Make every other shard holding an image whose owner changed stale."""
        if not changed:
            return
        holders = [
            row.shard_id
            for row in conn.execute(
                sa.text(
                    "SELECT DISTINCT shard_id FROM image_holders"
                    " WHERE sha256 = ANY(CAST(:shas AS text[])) AND shard_id <> :shard"
                ),
                {"shas": changed, "shard": shard_id},
            )
        ]
        if not holders:
            return
        ids = {"ids": sorted(holders)}
        conn.execute(
            sa.text(
                "SELECT shard_id FROM shards WHERE shard_id = ANY(CAST(:ids AS text[]))"
                ' ORDER BY shard_id COLLATE "C" FOR NO KEY UPDATE'
            ),
            ids,
        )
        conn.execute(
            sa.text(
                "UPDATE shards SET dedup_epoch = dedup_epoch + 1"
                " WHERE shard_id = ANY(CAST(:ids AS text[]))"
            ),
            ids,
        )
