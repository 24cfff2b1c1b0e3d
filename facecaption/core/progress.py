"""Progress of a run as it happens: stages report their running counts, and `facecaption run`
shows them.

A stage calls `context.progress(counts)` as it goes (the runner passes those on at most every
`REPORT_INTERVAL_S`), with the same count names its final result uses: fetch `rows` (of the
shard), `done` (rows answered so far) and `ok`; detect `images` and `faces_kept`; attribute
`faces` and `kept`; caption `faces`. Each becomes a `ProgressEvent`; a stage's end is one with
its `status` set.

On a terminal, `TerminalProgress` keeps one live line per running shard (rows fetched, ok,
faces, captions, the stage at work) and prints a line for each finished shard above them.
Elsewhere (logs, pipes), `LineProgress` prints one line per finished stage of each shard.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

REPORT_INTERVAL_S = 0.25  # live counts are passed on at most this often per stage
REDRAW_INTERVAL_S = 0.1  # the terminal view is redrawn at most this often
LIVE_SHARDS = 12  # running shards shown at once; the others are counted


@dataclass(frozen=True)
class ProgressEvent:
    shard_id: str
    stage: str
    counts: dict[str, Any]
    # None while running; at the end "done", "skipped", "failed", or "busy" (another worker
    # holds the stage: `run` says so and may try again later)
    status: str | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


ProgressSink = Callable[[ProgressEvent], None]


class Throttled:
    """A stage's `progress` callable: passes counts on as events, at most every interval."""

    def __init__(self, sink: ProgressSink, shard_id: str, stage: str) -> None:
        self._sink, self._shard_id, self._stage = sink, shard_id, stage
        self._last = 0.0

    def __call__(self, counts: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last >= REPORT_INTERVAL_S:
            self._last = now
            self._sink(ProgressEvent(self._shard_id, self._stage, dict(counts)))


def shard_headline(counts: dict[str, dict[str, Any]]) -> str:
    """`rows 120/1000, ok 98, faces 12, captions 3` from the counts each stage reported."""
    fetch = counts.get("fetch", {})
    parts = []
    if fetch:
        done = fetch.get("done", fetch.get("rows", 0))  # final counts: every row answered
        parts.append(f"rows {done}/{fetch.get('rows', '?')}")
        parts.append(f"ok {fetch.get('ok', 0)}")
    if "detect" in counts:
        parts.append(f"faces {counts['detect'].get('faces_kept', 0)}")
    if "attribute" in counts:
        parts.append(f"kept {counts['attribute'].get('kept', 0)}")
    if "caption" in counts:
        parts.append(f"captions {counts['caption'].get('faces', 0)}")
    return ", ".join(parts)


class LineProgress:
    """One line per finished stage of a shard: `{shard} {stage}: {status} {counts as JSON}`."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, event: ProgressEvent) -> None:
        if event.status in (None, "busy"):  # `run` reports a busy stage itself
            return
        prefix = f"{event.shard_id} {event.stage}:"
        if event.status == "failed":
            print(f"{prefix} failed: {event.error}", file=self.stream, flush=True)
            return
        print(f"{prefix} {event.status} {json.dumps(event.counts)}", file=self.stream, flush=True)
        for warning in event.warnings:
            print(f"{prefix} warning: {warning}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class TerminalProgress:
    """Live lines for running shards, redrawn in place; a line per finished shard."""

    def __init__(self, stream: TextIO, stages: list[str]) -> None:
        self.stream = stream
        self.last_stage = stages[-1] if stages else ""
        self._counts: dict[str, dict[str, dict[str, Any]]] = {}  # shard -> stage -> counts
        self._stage: dict[str, str] = {}  # running shard -> its stage at work
        self._drawn = 0  # live lines on screen now
        self._last_draw = 0.0
        self.finished = 0
        self.failed = 0

    def __call__(self, event: ProgressEvent) -> None:
        self._counts.setdefault(event.shard_id, {})[event.stage] = event.counts
        if event.status is None:
            self._stage[event.shard_id] = event.stage
        elif event.status == "busy":  # not running here now (`run` reports it)
            self._stage.pop(event.shard_id, None)
        elif event.status == "failed" or event.stage == self.last_stage:
            self._finish(event)
        else:
            self._stage[event.shard_id] = f"{event.stage} {event.status}"
        self._draw(force=event.status is not None)

    def _finish(self, event: ProgressEvent) -> None:
        self._stage.pop(event.shard_id, None)
        headline = shard_headline(self._counts.pop(event.shard_id, {}))
        if event.status == "failed":
            self.failed += 1
            line = f"{event.shard_id}  failed at {event.stage}: {event.error}"
        else:
            self.finished += 1
            line = f"{event.shard_id}  done: {headline}"
        self._clear()
        print(line, file=self.stream)
        for warning in event.warnings:
            print(f"{event.shard_id}  warning: {warning}", file=self.stream)

    def _clear(self) -> None:
        if self._drawn:
            # up to the first live line, then clear to the end of the screen
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < REDRAW_INTERVAL_S:
            return
        self._last_draw = now
        self._clear()
        running = list(self._stage.items())
        lines = [
            f"{shard_id}  [{stage}] {shard_headline(self._counts.get(shard_id, {}))}"
            for shard_id, stage in running[:LIVE_SHARDS]
        ]
        if len(running) > LIVE_SHARDS:
            lines.append(f"... and {len(running) - LIVE_SHARDS} more shards running")
        lines.append(f"shards: {self.finished} done, {self.failed} failed, {len(running)} running")
        self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)

    def close(self) -> None:
        self._clear()
        self.stream.flush()
