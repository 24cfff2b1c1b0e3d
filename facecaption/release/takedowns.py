"""Takedowns reaching the release: recording a request, and finding every fetched row it
covers (by URL, by sha256, and by the sha256 of a requested URL's image, which finds the same
picture under other URLs). `publish.publish_release` applies pending requests first."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from facecaption.core.artifacts import FETCH_PARQUET
from facecaption.state.takedowns import TakedownIndex

if TYPE_CHECKING:
    from facecaption.core.pipeline import Pipeline


def match_takedown(pipeline: Pipeline, request_id: int) -> dict[str, Any]:
    """Find every fetched row under a request (its URLs, its sha256s, and the sha256s of its
    URLs' images) and record them; a summary of what matched."""
    takedowns = TakedownIndex(pipeline.state.engine)
    request = takedowns.get(request_id)
    urls, shas = set(request.urls), set(request.sha256s)
    fetched = [s.shard_id for s in pipeline.state.stage_table() if s.stage == "fetch"]
    fetched = [
        shard for shard in fetched
        if pipeline.store.exists(pipeline.store.shard_path(shard, FETCH_PARQUET))
    ]  # fmt: skip
    matches: dict[tuple[str, str], dict[str, Any]] = {}

    def scan(shard_ids: list[str]) -> set[str]:
        found_shas: set[str] = set()
        for shard_id in shard_ids:
            path = pipeline.store.shard_path(shard_id, FETCH_PARQUET)
            rows = pipeline.store.read_table(path, ["key", "url", "sha256"]).to_pylist()
            for row in rows:
                if row["url"] in urls or (row["sha256"] and row["sha256"] in shas):
                    matches[(shard_id, row["key"])] = {"shard_id": shard_id, **row}
                    if row["sha256"]:
                        found_shas.add(row["sha256"])
        return found_shas

    new_shas = scan(fetched) - shas
    if new_shas:  # the same picture under URLs nobody named: find those rows too
        shas |= new_shas
        scan(fetched)
    takedowns.add_matches(request_id, list(matches.values()))
    return {
        "rows": len(matches),
        "shards": sorted({shard for shard, _ in matches}),
        "sha256s": sorted(shas),
    }


def request_takedown(
    pipeline: Pipeline,
    urls: list[str],
    sha256s: list[str],
    reason: str | None = None,
    requested_by: str | None = None,
) -> int:
    return TakedownIndex(pipeline.state.engine).record(urls, sha256s, reason, requested_by)
