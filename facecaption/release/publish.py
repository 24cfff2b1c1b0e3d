"""Publishing the release: shard exports assembled into the files people download.

Layout under `{store root}/release/`:
    data/part-{index:05d}-{content}.parquet   one face per row (`core.artifacts.RELEASE_SCHEMA`)
    train/{shard_id}.tar                      training shards, with `export.training_shards`
    manifest.json                             files, row counts, sha256s, what it was built from

A file holds whole shards (about `export.rows_per_file` rows) in row groups of
`export.row_group_size`, written with memory for one row group and one shard. Shards keep
their file from one export to the next and new shards go to the last file, so a re-export
rewrites only files whose shards changed. A file's name carries a hash of its content's
inputs: a changed file gets a new name, the manifest is published after every file it names,
and files it no longer names are removed last, so a reader holding either manifest finds all
of its files.

Before assembling, an export matches pending takedown requests against the index of fetched
images (by URL, by sha256, and by the sha256 of a requested URL's image, which finds the same
picture under other URLs; all requests in one statement, no artifact read), re-exports exactly
the affected shards and records, per request, when it was applied and which files changed.

One shard never stops a publish: a shard whose outputs are missing, stale, changed or do not
fit together (its export raises StageInputError, or its `release.parquet` or `train.tar` is
not the file recorded for it) is left out, with the reason in the manifest's `excluded`. A
shard that another worker is exporting right now keeps its last finished export, unless
takedowns matched it since. A shard fetched before the index existed whose `fetch.parquet`
cannot be read to index it may hold rows under a pending request: while there are pending
requests it is left out, and the requests stay pending (matched again next time).

A publish holds the release lock and the newest publish attempt (`release_attempts`): every
file goes into the release folder under that attempt's fence, so a publish that lost its lock
(Postgres restarted, ...) cannot overwrite a newer one's files, and each publish first removes
the temporary files that older ones (killed, or fenced out) left in the folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from facecaption.core.artifacts import (
    MANIFEST,
    RELEASE_DIR,
    RELEASE_PARQUET,
    RELEASE_SCHEMA,
    TRAIN_TAR,
)
from facecaption.core.bulk import collector_paused
from facecaption.core.fingerprints import Fingerprints
from facecaption.core.runner import artifacts_intact, as_recorded
from facecaption.core.stage import StageInputError, stage_registry
from facecaption.core.store import ArtifactChecksumError, ArtifactStore
from facecaption.release.takedowns import index_unindexed_fetches
from facecaption.settings import ExportSettings
from facecaption.state import Shard, ShardBusyError, StageState
from facecaption.state.exports import (
    hold_release_attempt,
    record_export,
    start_release_attempt,
)
from facecaption.state.shards import worker_name
from facecaption.state.takedowns import TakedownIndex

if TYPE_CHECKING:
    from facecaption.core.pipeline import Pipeline

FORMAT = "facecaption-release/1"
RELEASE_LOCK = ("release", "publish")
RELEASE_OWNER = "release"  # names the release folder's temporary files: `release-{attempt}`


class ShardReleaseError(Exception):
    """A shard's export cannot go into this release (its file is missing or not the one
    recorded); the publish leaves the shard out and assembles again."""

    def __init__(self, shard_id: str, reason: str) -> None:
        super().__init__(reason)
        self.shard_id = shard_id
        self.reason = reason
        self.written: list[str] = []  # release files the failed assembly wrote before


@dataclass(frozen=True)
class ReleaseReport:
    release_uri: str
    manifest: dict[str, Any]
    export_id: int
    files_written: list[str]
    files_removed: list[str]
    files_kept: list[str]
    excluded: dict[str, str]
    takedowns_applied: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    def summary(self) -> dict[str, Any]:
        return {
            "release": self.release_uri,
            "export_id": self.export_id,
            "rows": self.rows,
            "files": len(self.manifest["files"]),
            "training_shards": len(self.manifest["training_shards"]),
            "written": self.files_written,
            "removed": self.files_removed,
            "kept": len(self.files_kept),
            "excluded_shards": len(self.excluded),
            "takedowns_applied": self.takedowns_applied,
        }


def release_root(pipeline: Pipeline) -> str:
    return f"{pipeline.store.root}/{RELEASE_DIR}"


def read_manifest(pipeline: Pipeline) -> dict[str, Any] | None:
    path = f"{release_root(pipeline)}/{MANIFEST}"
    if not pipeline.store.exists(path):
        return None
    with pipeline.store.open(path) as handle:
        return json.load(handle)


@contextmanager
def release_ownership(pipeline: Pipeline) -> Iterator[ArtifactStore]:
    """Hold the release for the block: its lock (waiting up to `busy_wait_s` for another
    publish) and a new publish attempt, the newest; yields the store whose every publication
    runs under that attempt's fence. First removes what older publishes left half-written."""
    state = pipeline.state
    with state.claim(*RELEASE_LOCK, wait_s=pipeline.settings.busy_wait_s):
        attempt = start_release_attempt(state.engine, worker_name())
        fence = partial(hold_release_attempt, state.engine, attempt)
        pipeline.store.remove_partials(release_root(pipeline), RELEASE_OWNER, attempt, None)
        yield pipeline.store.owned_by(RELEASE_OWNER, attempt, fence)


def publish_release(pipeline: Pipeline) -> ReleaseReport:
    """Export every captioned shard (skipping what is up to date), apply pending takedowns,
    and publish the release files and manifest; record the export in the state DB."""
    with release_ownership(pipeline) as store:
        takedowns = TakedownIndex(pipeline.state.engine)
        unreadable = index_unindexed_fetches(pipeline, takedowns)
        matched = takedowns.match_pending()  # match_pending_takedowns, keeping `unreadable`
        exported, excluded = export_shards(pipeline)
        applied = list(matched)
        if matched and unreadable:
            # a shard that matching could not read may hold rows under a request: it stays
            # out, and so do the requests (pending, matched again next time)
            for shard, reason in unreadable.items():
                exported.pop(shard, None)
                excluded[shard] = reason
            applied = []
        previous = read_manifest(pipeline) or {"files": [], "training_shards": [], "version": 0}
        report = _assemble(pipeline, store, exported, excluded, previous, takedowns.request_ids())
        outputs = {
            "export_id": report.export_id,
            "written": report.files_written,
            "removed": report.files_removed,
        }
        for request_id in applied:
            takedowns.mark_applied(request_id, matched[request_id], outputs)
        return replace(report, takedowns_applied=applied)


def export_shards(pipeline: Pipeline) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run the export stage on every shard whose captions are done; the export state of
    each shard that has one, and why the others are left out.

    Whether a shard's export is up to date is decided for all shards at once, from the
    stage rows and takedown matches read in a few queries (`Fingerprints.prefetch`) and a
    size check of its files: a publish over thousands of unchanged shards runs the stage
    (a lock and several queries each) only where there is something to export."""
    with collector_paused():  # the rows make no cycles; they are gone before it runs
        fingerprints = Fingerprints.prefetch(
            pipeline.settings, pipeline.state, stage_registry(), None, epochs=False
        )
        shards = pipeline.state.list_shards()
    # not paused: the size checks may go through an object store's client
    checked = {}  # shard id -> the fingerprint of its export, found up to date
    for shard in shards:
        fingerprint = _current_export(pipeline, fingerprints, shard)
        if fingerprint:
            checked[shard.shard_id] = fingerprint
    found = {
        state.shard_id: _export_entry(state)
        for state in pipeline.state.stage_table(list(checked), stages=["export"])
        # read again in full (the prefetch keeps no counts); one changed since runs below
        if state.status == "done" and state.fingerprint == checked[state.shard_id]
    }
    excluded: dict[str, str] = {}
    for shard in shards:
        if shard.shard_id not in found:
            _export_one(pipeline, shard.shard_id, found, excluded)
    return {s.shard_id: found[s.shard_id] for s in shards if s.shard_id in found}, excluded


def _export_one(
    pipeline: Pipeline,
    shard_id: str,
    exported: dict[str, dict[str, Any]],
    excluded: dict[str, str],
) -> None:
    """Run the export stage on one shard; its entry into `exported`, or why not into
    `excluded`."""
    try:
        pipeline.run("export", shard_id)
    except StageInputError as error:
        excluded[shard_id] = str(error)
        return
    except ShardBusyError:
        # another worker is exporting it now: release what it last finished, if it can be
        state = pipeline.state.get_stage(shard_id, "export")
        reason = _last_export_unusable(pipeline, state)
        if reason:
            excluded[shard_id] = reason
        else:
            exported[shard_id] = _export_entry(state)
        return
    state = pipeline.state.get_stage(shard_id, "export")
    if state.status != "done" or RELEASE_PARQUET not in state.artifacts:
        excluded[shard_id] = f"export of shard {shard_id} is {state.status}"
        return
    exported[shard_id] = _export_entry(state)


def _current_export(pipeline: Pipeline, fingerprints: Fingerprints, shard: Shard) -> str | None:
    """The fingerprint of the shard's export when the runner would skip it as up to date
    (done, its files there with their recorded sizes, its fingerprint the one its inputs
    give now); None when it has to run."""
    state = fingerprints.inputs.find(shard.shard_id, "export")
    if state is None or state.status != "done" or RELEASE_PARQUET not in state.artifacts:
        return None
    try:
        wanted = fingerprints.current("export", shard)
    except StageInputError:
        return None  # running it says why its inputs are not ready
    if wanted != state.fingerprint:
        return None
    return wanted if artifacts_intact(pipeline.store, shard.shard_id, state.artifacts) else None


def _export_entry(state: StageState) -> dict[str, Any]:
    return {
        "fingerprint": state.fingerprint,
        "rows": state.counts.get("released", 0),
        "samples": state.counts.get("training_samples", 0),
        "artifacts": state.artifacts,
    }


def _last_export_unusable(pipeline: Pipeline, state: StageState) -> str | None:
    """Why the last finished export of a shard busy elsewhere cannot be released, if so.
    While a new attempt runs, the state row still describes the last finished one."""
    if state.fingerprint is None or RELEASE_PARQUET not in state.artifacts:
        return f"export of shard {state.shard_id} is {state.status} elsewhere, never finished"
    matches = as_recorded(TakedownIndex(pipeline.state.engine).shard_matches(state.shard_id))
    covered = (state.inputs or {}).get("takedowns", [])
    if matches != covered:
        return (
            f"export of shard {state.shard_id} is {state.status} elsewhere, and its last"
            " finished export predates takedown matches in it"
        )
    return None


def _groups(
    previous: dict[str, Any], exported: dict[str, dict[str, Any]], rows_per_file: int
) -> list[tuple[int, list[str]]]:
    """(file index, shard ids): shards stay in their previous file; new ones fill the last."""
    groups = [
        (entry["index"], [s for s in entry["shards"] if s in exported])
        for entry in previous["files"]
    ]
    groups = [(index, shards) for index, shards in groups if shards]
    placed = {shard for _, shards in groups for shard in shards}
    next_index = max((entry["index"] for entry in previous["files"]), default=-1) + 1
    for shard in sorted(set(exported) - placed):
        rows = exported[shard]["rows"]
        # A shard with no rows never opens a file: `datasets` cannot load a file of 0 rows.
        if groups and (
            rows == 0 or sum(exported[s]["rows"] for s in groups[-1][1]) + rows <= rows_per_file
        ):
            groups[-1][1].append(shard)
        else:
            groups.append((next_index, [shard]))
            next_index += 1
    return groups


def _content_key(shards: list[str], exported: dict[str, dict[str, Any]], row_group: int) -> str:
    parts = [FORMAT, str(row_group)] + [
        f"{shard}:{exported[shard]['artifacts'][RELEASE_PARQUET]['sha256']}" for shard in shards
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _assemble(
    pipeline: Pipeline,
    store: ArtifactStore,
    exported: dict[str, dict[str, Any]],
    excluded: dict[str, str],
    previous: dict[str, Any],
    takedown_ids: list[int],
) -> ReleaseReport:
    limits = pipeline.settings.export
    root = release_root(pipeline)
    before = {entry["path"]: entry for entry in previous["files"] + previous["training_shards"]}
    while True:
        try:
            files, training, written = _write_files(store, root, exported, previous, before, limits)
            break
        except ShardReleaseError as error:
            # Leave the shard out and assemble again; data files written so far that no
            # manifest names are removed (their names carry the left-out shard's content).
            excluded[error.shard_id] = error.reason
            del exported[error.shard_id]
            for name in error.written:
                if name.startswith("data/") and name not in before:
                    store.remove(f"{root}/{name}")
    kept = [e["path"] for e in files + training if e["path"] not in written]
    removed = sorted(set(before) - {e["path"] for e in files + training})
    manifest = {
        "format": FORMAT,
        "version": previous.get("version", 0) + 1,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "license": limits.license,
        "rows": sum(entry["rows"] for entry in files),
        "columns": [{"name": f.name, "type": str(f.type)} for f in RELEASE_SCHEMA],
        "files": files,
        "training_shards": training,
        "built_from": {
            shard: {"fingerprint": state["fingerprint"], "rows": state["rows"]}
            for shard, state in sorted(exported.items())
        },
        "excluded": dict(sorted(excluded.items())),
        "takedown_requests": takedown_ids,
    }
    blob = json.dumps(manifest, indent=1, sort_keys=True).encode()
    manifest_path = f"{root}/{MANIFEST}"
    with store.publish(manifest_path) as tmp:
        tmp.write_bytes(blob)
    for name in removed:
        store.remove(f"{root}/{name}")
    export_id = record_export(
        pipeline.state.engine, store.uri(root), hashlib.sha256(blob).hexdigest(), manifest,
        written, removed, kept,
    )  # fmt: skip
    return ReleaseReport(store.uri(root), manifest, export_id, written, removed, kept, excluded)


def _write_files(
    store: ArtifactStore,
    root: str,
    exported: dict[str, dict[str, Any]],
    previous: dict[str, Any],
    before: dict[str, dict[str, Any]],
    limits: ExportSettings,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The release's data files and training shards, written where they changed; what was
    written. ShardReleaseError (carrying what was written so far) for a shard that fails."""
    written: list[str] = []
    try:
        files = []
        for index, shards in _groups(previous, exported, limits.rows_per_file):
            key = _content_key(shards, exported, limits.row_group_size)
            name = f"data/part-{index:05d}-{key}.parquet"
            entry = before.get(name)
            if entry is None or not store.exists(f"{root}/{name}"):
                entry = _write_file(
                    store, f"{root}/{name}", shards, exported, limits.row_group_size
                )
                entry.update(path=name, index=index, shards=shards)
                written.append(name)
            files.append(entry)
        training = []
        for shard, state in sorted(exported.items()):
            ref = state["artifacts"].get(TRAIN_TAR)
            if ref is None:
                continue
            name = f"train/{shard}.tar"
            entry = before.get(name)
            if (
                entry is None
                or entry["sha256"] != ref["sha256"]
                or not store.exists(f"{root}/{name}")
            ):
                try:
                    store.publish_copy(
                        store.shard_path(shard, TRAIN_TAR), f"{root}/{name}", ref["sha256"]
                    )
                except (FileNotFoundError, ArtifactChecksumError) as error:
                    raise ShardReleaseError(
                        shard, f"{TRAIN_TAR} of shard {shard} cannot be used: {error}"
                    ) from error
                written.append(name)
            training.append(
                {
                    "path": name,
                    "shard_id": shard,
                    "sha256": ref["sha256"],
                    "bytes": ref["bytes"],
                    "samples": state["samples"],
                }
            )
    except ShardReleaseError as error:
        error.written = written
        raise
    return files, training, written


def _shard_table(store: ArtifactStore, shard: str, state: dict[str, Any]) -> pa.Table:
    """A shard's export as recorded: the same bytes, the release's columns."""
    try:
        table = store.read_table(
            store.shard_path(shard, RELEASE_PARQUET),
            sha256=state["artifacts"][RELEASE_PARQUET]["sha256"],
        )
    except (OSError, pa.ArrowException, ArtifactChecksumError) as error:
        raise ShardReleaseError(
            shard, f"{RELEASE_PARQUET} of shard {shard} cannot be used: {error}"
        ) from error
    if not table.schema.equals(RELEASE_SCHEMA):
        raise ShardReleaseError(
            shard,
            f"{RELEASE_PARQUET} of shard {shard} has other columns than the release:"
            f" {', '.join(f'{f.name} {f.type}' for f in table.schema)}",
        )
    return table


def _write_file(
    store: ArtifactStore,
    path: str,
    shards: list[str],
    exported: dict[str, dict[str, Any]],
    row_group: int,
) -> dict:
    """One release parquet from whole shard exports, in row groups of `row_group` rows."""
    rows = groups = 0
    with store.publish(path) as tmp:
        with pq.ParquetWriter(tmp, RELEASE_SCHEMA, compression="zstd") as writer:
            pending: list[pa.Table] = []
            buffered = 0
            for shard in shards:
                table = _shard_table(store, shard, exported[shard])
                pending.append(table)
                buffered += table.num_rows
                rows += table.num_rows
                while buffered >= row_group:
                    combined = pa.concat_tables(pending)
                    writer.write_table(combined.slice(0, row_group))
                    groups += 1
                    rest = combined.slice(row_group)
                    pending, buffered = [rest], rest.num_rows
            if buffered or not groups:
                writer.write_table(pa.concat_tables(pending or [RELEASE_SCHEMA.empty_table()]))
                groups += 1
        ref = store.describe(path, tmp)
    return {"rows": rows, "row_groups": groups, "sha256": ref.sha256, "bytes": ref.bytes}
