"""Cross-shard dedup over `image_hashes`: which (shard, key) owns each image's sha256."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine


class ImageHashIndex:
    """Cross-shard dedup over `image_hashes`: the first (shard, key) to keep each sha256."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def claim(self, shard_id: str, candidates: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
        shas = [sha for sha, _ in candidates]
        keys = [key for _, key in candidates]
        with self.engine.begin() as conn:
            # The shard's own entries follow its current output: drop what it no longer keeps,
            # and move an entry to the key that keeps those bytes now.
            conn.execute(
                sa.text(
                    "DELETE FROM image_hashes WHERE shard_id = :shard"
                    " AND NOT (sha256 = ANY(CAST(:shas AS text[])))"
                ),
                {"shard": shard_id, "shas": shas},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO image_hashes (sha256, shard_id, key)"
                    " SELECT sha, :shard, key FROM"
                    " unnest(CAST(:shas AS text[]), CAST(:keys AS text[])) AS c(sha, key)"
                    " ON CONFLICT (sha256) DO UPDATE SET key = EXCLUDED.key"
                    " WHERE image_hashes.shard_id = EXCLUDED.shard_id"
                ),
                {"shard": shard_id, "shas": shas, "keys": keys},
            )
            rows = conn.execute(
                sa.text(
                    "SELECT sha256, shard_id, key FROM image_hashes"
                    " WHERE sha256 = ANY(CAST(:shas AS text[]))"
                ),
                {"shas": shas},
            )
            return {row.sha256: (row.shard_id, row.key) for row in rows}
