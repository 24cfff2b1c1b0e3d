"""Takedowns reaching the release: recording a request, and finding every fetched row the
pending requests cover (by URL, by sha256, and by the sha256 of a requested URL's image, which
finds the same picture under other URLs) in the fetched-image index, all requests in one
statement. `publish.publish_release` applies pending requests first.

The fetch stage indexes the images it keeps as it publishes them; a shard fetched before the
index existed is indexed once, from its `fetch.parquet`, the first time matching runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from facecaption.core.artifacts import FETCH_PARQUET
from facecaption.fetch.stage import kept_images
from facecaption.state.takedowns import TakedownIndex

if TYPE_CHECKING:
    from facecaption.core.pipeline import Pipeline


def match_pending_takedowns(pipeline: Pipeline) -> dict[int, dict[str, Any]]:
    """Record the matches of every request not applied yet; per request, a summary of what
    matched (`rows`, `shards`, `sha256s`). A shard whose `fetch.parquet` could not be read
    to index it is not in the index (see `index_unindexed_fetches`)."""
    takedowns = TakedownIndex(pipeline.state.engine)
    index_unindexed_fetches(pipeline, takedowns)
    return takedowns.match_pending()


def index_unindexed_fetches(pipeline: Pipeline, takedowns: TakedownIndex) -> dict[str, str]:
    """Index the kept images of shards fetched before the index existed (read once). Returns
    the shards whose `fetch.parquet` could not be read, with why: requests may cover rows in
    them that matching cannot see (they are tried again next time)."""
    store = pipeline.store
    unreadable: dict[str, str] = {}
    for shard_id, parquet_sha256 in takedowns.unindexed_fetches(FETCH_PARQUET).items():
        try:
            rows = store.read_table(
                store.shard_path(shard_id, FETCH_PARQUET), ["key", "url", "sha256", "status"]
            ).to_pylist()
        except (OSError, pa.ArrowException) as error:
            unreadable[shard_id] = (
                f"{FETCH_PARQUET} of shard {shard_id} cannot be read to match takedown requests:"
                f" {error}"
            )
            continue
        takedowns.index_fetched(shard_id, parquet_sha256, kept_images(rows))
    return unreadable


def request_takedown(
    pipeline: Pipeline,
    urls: list[str],
    sha256s: list[str],
    reason: str | None = None,
    requested_by: str | None = None,
) -> int:
    return TakedownIndex(pipeline.state.engine).record(urls, sha256s, reason, requested_by)
