"""Machinery for batteries of hostile input: many kinds of bad input in one shard, each between
good rows, served for real over loopback, with what a test needs to assert per kind that
(a) the bad row ends in its typed status, (b) the good rows are what a run without the bad
rows gives, (c) every stage finished, and (d) a forced re-run changes nothing.

A `Hostile` kind is one source row: a url cell taken as is (`url`: any text, bytes that are
not UTF-8, None), or a route a loopback site answers (`route`, at `path`). A kind that needs
an origin of its own (a hostile robots.txt spoils its whole host) names a `site` and gives
that site's other routes (`site_routes`); each site is a `SampleSite` on its own loopback
address in 127.0.1.0/24 (`HOSTILE_NETWORK`, the only one the battery's fetch settings allow).

`run_battery` writes the shard (good rows served by the "main" site, one before each kind and
one at the end; every row's sample id names it), runs the given stages, forces them again,
and runs the good rows alone as a baseline in a second state DB and store, so that
cross-shard dedup cannot tell the two apart. Rows are matched by sample id: `Battery.row`,
`Battery.good_rows`. Fetch kinds live in tests/test_hostile_fetch.py; image and caption kinds
bring their own lists and stages to the same function.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from facecaption.core.artifacts import FETCH_PARQUET
from facecaption.core.pipeline import Pipeline
from facecaption.settings import Settings
from facecaption.state import StageState
from support.sampledata import encode
from support.samplesite import Route, SampleSite

HOSTILE_NETWORK = "127.0.1.0/24"
MAIN_SITE = "main"


@dataclass(frozen=True)
class Hostile:
    """One kind of bad input and the status its row must end in."""

    name: str
    expected: str
    url: object = None  # the url cell as is, when there is no route
    route: Route | None = None  # answered at `path` on the kind's site
    site: str = MAIN_SITE
    site_routes: dict[str, Route] = field(default_factory=dict)  # e.g. {"robots.txt": ...}
    error: str | None = None  # a piece the row's error must contain
    path: str | None = None  # default: hostile/{slug}.png

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    @property
    def sample_id(self) -> str:
        return f"bad-{self.slug}"

    @property
    def route_path(self) -> str:
        return self.path or f"hostile/{self.slug}.png"


def raw_answer(
    status: bytes = b"200 OK",
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    content_length: bool = True,
) -> bytes:
    """An HTTP/1.1 answer as bytes, for `Route(raw=...)`: headers may hold any bytes."""
    lines = [b"HTTP/1.1 " + status, *(name + b": " + value for name, value in headers)]
    if content_length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def png(shade: int, size: int = 16) -> bytes:
    """A small PNG whose bytes differ per shade (0-255) and size."""
    return encode(Image.new("L", (size, size), shade), "PNG")


@contextmanager
def hostile_sites(
    kinds: Sequence[Hostile], main_routes: dict[str, Route]
) -> Iterator[dict[str, SampleSite]]:
    """Every site the kinds name, each on its own loopback address, serving its routes."""
    routes: dict[str, dict[str, Route]] = {MAIN_SITE: dict(main_routes)}
    for kind in kinds:
        site = routes.setdefault(kind.site, {})
        site.update(kind.site_routes)
        if kind.route is not None:
            site[kind.route_path] = kind.route
    with ExitStack() as stack:
        yield {
            name: stack.enter_context(SampleSite(site_routes, host=f"127.0.1.{number}"))
            for number, (name, site_routes) in enumerate(routes.items(), start=1)
        }


@dataclass(frozen=True)
class SourceRow:
    url: object
    caption: str
    sample_id: str
    kind: Hostile | None = None


def write_source(rows: Sequence[SourceRow], path: Path) -> Path:
    """A parquet source whose string url column holds each cell's bytes as they are (bytes
    that are not UTF-8 included, as a writer that does not check would leave them)."""
    cells = [
        row.url.encode("utf-8", "surrogateescape") if isinstance(row.url, str) else row.url
        for row in rows
    ]
    table = pa.table(
        {
            "url": pa.array(cells, pa.binary()).view(pa.string()),
            "caption": [row.caption for row in rows],
            "id": [row.sample_id for row in rows],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@dataclass
class ShardRun:
    """One shard's stage states after a run, and a reader for its artifacts."""

    shard_id: str
    states: dict[str, StageState]
    settings: Settings

    def table(self, artifact: str) -> pa.Table:
        stage = next(s for s in self.states.values() if artifact in s.artifacts)
        return pq.read_table(stage.artifacts[artifact]["uri"])

    def fetch_rows(self) -> dict[str, dict[str, Any]]:
        """fetch.parquet rows by sample id."""
        return {row["sample_id"]: row for row in self.table(FETCH_PARQUET).to_pylist()}

    def checksums(self) -> dict[str, str]:
        return {
            name: ref["sha256"] for state in self.states.values()
            for name, ref in state.artifacts.items()
        }  # fmt: skip


@dataclass
class Battery:
    rows: list[SourceRow]
    first: ShardRun  # the shard with the bad rows
    again: ShardRun  # the same, every stage forced once more
    baseline: ShardRun  # the good rows alone, in another state DB and store

    @property
    def good_ids(self) -> list[str]:
        return [row.sample_id for row in self.rows if row.kind is None]

    def neighbours(self, kind: Hostile) -> list[str]:
        """The sample ids of the good rows right before and after the kind's row."""
        index = next(i for i, row in enumerate(self.rows) if row.kind == kind)
        return [
            row.sample_id
            for row in (self.rows[index - 1], self.rows[index + 1])
            if row.kind is None
        ]


def battery_rows(kinds: Sequence[Hostile], sites: dict[str, SampleSite]) -> list[SourceRow]:
    """good-0, kind 0, good-1, kind 1, ..., good-N: the good rows are served by the main site
    at good/{i}.png (`good_routes`)."""
    main = sites[MAIN_SITE]
    rows = []
    for index, kind in enumerate(kinds):
        rows.append(SourceRow(main.url(f"good/{index}.png"), f"good {index}", f"good-{index}"))
        url = sites[kind.site].url(kind.route_path) if kind.route is not None else kind.url
        rows.append(SourceRow(url, f"bad: {kind.name}", kind.sample_id, kind))
    last = len(kinds)
    rows.append(SourceRow(main.url(f"good/{last}.png"), f"good {last}", f"good-{last}"))
    return rows


def good_routes(count: int) -> dict[str, Route]:
    """`count + 1` distinct small PNGs at good/{i}.png."""
    return {
        f"good/{i}.png": Route(png(i % 256, 16 + i // 256), "image/png") for i in range(count + 1)
    }


def run_battery(
    kinds: Sequence[Hostile],
    settings: Settings,
    baseline_settings: Settings,
    stages: Sequence[str],
    workdir: Path,
) -> Battery:
    """Serve the kinds, run `stages` on the shard holding them, force it again, and run the
    baseline; the sites are stopped when it returns."""
    slugs = [kind.slug for kind in kinds]
    duplicated = {slug for slug in slugs if slugs.count(slug) > 1}
    assert not duplicated, f"kinds must have distinct names: {sorted(duplicated)}"
    with hostile_sites(kinds, good_routes(len(kinds))) as sites:
        rows = battery_rows(kinds, sites)
        hostile = write_source(rows, workdir / "hostile.parquet")
        alone = write_source([row for row in rows if row.kind is None], workdir / "good.parquet")
        with Pipeline.open(settings) as pipeline:
            [shard_id] = pipeline.select_shards([str(hostile)])
            first = _run_stages(pipeline, shard_id, stages, force=False)
            again = _run_stages(pipeline, shard_id, stages, force=True)
        with Pipeline.open(baseline_settings) as pipeline:
            [baseline_id] = pipeline.select_shards([str(alone)])
            baseline = _run_stages(pipeline, baseline_id, stages, force=False)
    return Battery(rows, first, again, baseline)


def _run_stages(pipeline: Pipeline, shard_id: str, stages: Sequence[str], force: bool) -> ShardRun:
    for stage in stages:
        try:
            pipeline.run(stage, shard_id, force=force)
        except Exception:  # recorded in the state DB: the tests assert on the stage's state
            break
    states = {stage: pipeline.state.get_stage(shard_id, stage) for stage in stages}
    return ShardRun(shard_id, states, pipeline.settings)
