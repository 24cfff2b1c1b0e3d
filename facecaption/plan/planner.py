"""Plan: cut source parquet files into shards with deterministic ids and register them.

A shard id is `{source_id[:12]}_{row_start:09d}_{row_end:09d}`: the source file's content hash
and the row range. Planning the same file again registers nothing and, while the filesystem
reports the same version of it (size, mtime, ETag...), reads none of its bytes; a new file adds
only its own shards. A file changed in place after it was planned is refused: its shards would
read other rows under their ids. A file that cannot be planned is reported and the other files
still are. Memory is one file's footer and shard list at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from facecaption.core.redaction import redact_text
from facecaption.plan.sources import (
    SourceChangedError,
    SourceError,
    changed_message,
    expand_source_uris,
    inspect_source,
    stat_source,
)
from facecaption.settings import Settings
from facecaption.state import ShardState, Source


@dataclass
class PlannedSource:
    uri: str
    source_id: str
    num_rows: int
    shard_ids: list[str]
    new_shards: int


@dataclass
class PlanReport:
    sources: list[PlannedSource] = field(default_factory=list)
    # source -> why it could not be planned; both with credentials masked (they are printed,
    # logged and pushed to XCom)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def shard_ids(self) -> list[str]:
        return [shard_id for source in self.sources for shard_id in source.shard_ids]

    @property
    def new_shards(self) -> int:
        return sum(source.new_shards for source in self.sources)


def shard_id_for(source_id: str, row_start: int, row_end: int) -> str:
    return f"{source_id[:12]}_{row_start:09d}_{row_end:09d}"


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[int, int, int]]:
    """`(index, row_start, row_end)` for each shard; the last one may be short."""
    return [
        (index, start, min(start + shard_size, num_rows))
        for index, start in enumerate(range(0, num_rows, shard_size))
    ]


def plan_sources(uris: list[str], settings: Settings, state: ShardState) -> PlanReport:
    report = PlanReport()
    for argument in uris:
        try:
            files = expand_source_uris([argument])
        except SourceError as error:
            report.errors[redact_text(argument)] = redact_text(str(error))
            continue
        for uri in files:
            try:
                report.sources.append(_plan_one(uri, settings, state))
            except SourceError as error:
                report.errors[redact_text(uri)] = redact_text(str(error))
    return report


def _plan_one(uri: str, settings: Settings, state: ShardState) -> PlannedSource:
    version = stat_source(uri)
    recorded = state.find_source_file(uri)
    if recorded is not None and version.same_as(recorded[1]):
        source = recorded[0]  # the same version of the same file: nothing to read
    else:
        inspected = inspect_source(uri, settings.columns, version)
        others = [s for s in state.sources_read_from(uri) if s != inspected.source_id]
        if others:
            raise SourceChangedError(changed_message(uri, others[0]))
        known = state.find_source(inspected.source_id)
        # A source keeps the shard size it was first planned with, so its shard ids never
        # shift when the setting changes for later sources.
        source = Source(
            source_id=inspected.source_id,
            uri=inspected.uri,
            name=inspected.name,
            size_bytes=inspected.size_bytes,
            num_rows=inspected.num_rows,
            shard_size=known.shard_size if known else settings.shard_size,
            columns=known.columns if known else inspected.columns,
        )
    # Registered again either way: the source's uri follows the file to where it was planned
    # from last, and shards a killed planner did not register are added.
    source = replace(source, uri=uri, name=uri.rsplit("/", 1)[-1])
    shards = [
        (shard_id_for(source.source_id, start, end), index, start, end)
        for index, start, end in shard_ranges(source.num_rows, source.shard_size)
    ]
    new = state.register_source(source, shards, version)
    return PlannedSource(
        uri=uri,
        source_id=source.source_id,
        num_rows=source.num_rows,
        shard_ids=[shard[0] for shard in shards],
        new_shards=new,
    )
