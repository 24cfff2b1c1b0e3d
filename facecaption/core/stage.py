"""Pipeline stages. Each is a plain object with a name, a version, the inputs its fingerprint
covers, and `run(context)`; the CLI, the DAGs and the tests call them alike through
`facecaption.core.runner.run_stage`, which builds the context from the state DB.

A fingerprint's inputs come in two parts: what of the settings and models shapes a stage's
outputs (`settings_inputs`, the same for every shard: worked out once when thousands of shards
are checked) and what of one shard does (`shard_inputs`: its rows, its input stages'
artifacts). Shard inputs read other stages' state through `StageInputs`, which the runner
answers from the state DB and work selection from one prefetched table
(`facecaption.core.fingerprints`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from facecaption.core.errors import PermanentError
from facecaption.core.store import ArtifactRef, ArtifactStore
from facecaption.settings import Settings
from facecaption.state import Shard, StageState
from facecaption.state.hostrates import HostRateStore
from facecaption.state.retries import RowRetry, RowRetryLedger
from facecaption.state.takedowns import TakedownIndex


class StageInputError(PermanentError, RuntimeError):
    """The stage's input is not usable: the stage before it has not finished, ran on other
    outputs than there are now (it is stale), or its files are missing, changed or do not
    fit together. Running this stage again cannot fix it; running the earlier one can."""


class DedupIndex(Protocol):
    def claim(self, shard_id: str, candidates: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
        """Register the `(sha256, key)` pairs one shard holds (in place of what it held
        before); return each sha256's owner `(shard_id, key)`: the smallest holder."""
        ...

    def owners(self, shas: list[str]) -> dict[str, tuple[str, str]]:
        """The current owner of each of `shas` that has one."""
        ...


class StageInputs(Protocol):
    """What a shard's fingerprint reads of the state: its stages (with the inputs each ran
    on), its takedown matches, its dedup epoch."""

    def get_stage(self, shard_id: str, stage: str) -> StageState: ...

    def takedown_matches(self, shard_id: str) -> list[tuple[int, str]]:
        """(request id, key) of every recorded takedown match in the shard, sorted."""
        ...

    def dedup_epoch(self, shard_id: str) -> int:
        """How many times the owner of an image the shard holds changed under it
        (`facecaption.state.dedup`)."""
        ...


@dataclass(frozen=True)
class StageContext:
    shard: Shard
    settings: Settings
    store: ArtifactStore
    dedup: DedupIndex
    # URLs and image bytes under a takedown: fetch skips them, export leaves them out.
    takedowns: TakedownIndex | None = None
    # The fingerprint this run records (outputs may carry it as provenance).
    fingerprint: str = ""
    # The stage's own earlier outputs when they were made from the same inputs (apart from
    # `cross_shard_inputs`): a stage may keep what in them is final and redo only the rest.
    previous: StageState | None = None
    # What the fingerprint covers (`shard_inputs` and `settings_inputs`): e.g. the checksums
    # of the input stage's artifacts, which a stage may check what it reads against.
    inputs: dict[str, Any] = field(default_factory=dict)
    # Learned per-host fetch rates kept across shards (facecaption.state.hostrates).
    host_rates: HostRateStore | None = None
    # Running counts as the stage goes (see facecaption.core.progress); call it freely.
    progress: Callable[[dict[str, int]], None] = lambda counts: None
    # This stage's rows that failed transiently, across runs (fetch rows, caption faces): how
    # many runs tried each, and when the next may (see facecaption.core.retry_budget).
    row_retries: RowRetryLedger | None = None
    # The operator asked for this run (`--force`): pauses between runs do not hold it back.
    forced: bool = False

    def earlier_retries(self) -> dict[str, RowRetry]:
        """This stage's rows (by key) that met a transient fault in earlier runs over the same
        inputs: runs used, and when each is due again. None on a fresh run."""
        if not self.previous or self.row_retries is None:
            return {}
        return self.row_retries.rows(self.shard.shard_id)

    def keep_retries(self, waiting: list[RowRetry]) -> None:
        """Record the rows the published outputs leave to later runs."""
        if self.row_retries is not None:
            self.row_retries.replace(self.shard.shard_id, waiting)


@dataclass(frozen=True)
class StageResult:
    counts: dict[str, int]
    artifacts: dict[str, ArtifactRef] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # what the dataset report needs of this shard beyond counts (histograms, sketches), kept
    # with the state so the report reads no artifact (see facecaption.release.stats)
    stats: dict[str, Any] | None = None
    # When the `retryable` work it left is due (None: at once): until then a refresh leaves
    # the stage alone.
    retry_at: datetime | None = None


class Stage(Protocol):
    name: str
    version: str
    artifact_names: tuple[str, ...]
    # Keys of `shard_inputs` decided together with other shards (fetch: who owns each
    # image). A change makes the outputs stale, but a re-run may keep what is final in them.
    cross_shard_inputs: tuple[str, ...]

    def settings_inputs(self, settings: Settings) -> dict[str, Any]:
        """What of the settings and models shapes this stage's outputs (any shard)."""
        ...

    def shard_inputs(self, shard: Shard, settings: Settings, inputs: StageInputs) -> dict[str, Any]:
        """What of this shard shapes them; StageInputError when an input stage is not done."""
        ...

    def run(self, context: StageContext) -> StageResult: ...


def upstream_checksums(inputs: StageInputs, shard_id: str, stage: str) -> dict[str, str]:
    """The sha256 of each artifact `stage` left for this shard, which a later stage's
    fingerprint covers; StageInputError when `stage` is not done."""
    return _checksums(inputs.get_stage(shard_id, stage))


def _checksums(upstream: StageState) -> dict[str, str]:
    if upstream.status != "done":
        raise StageInputError(
            f"{upstream.stage} of shard {upstream.shard_id} is {upstream.status}, not done"
        )
    return {name: ref["sha256"] for name, ref in sorted(upstream.artifacts.items())}


def upstream_chain(
    inputs: StageInputs, shard_id: str, stages: Sequence[str]
) -> dict[str, dict[str, str]]:
    """The artifact checksums of `stages`, a chain in which each stage reads the one before
    it, for a stage that reads them all together (export joins rows across them).
    StageInputError when one is not done, or ran on other outputs of the one before it than
    there are now (it is stale: run it again)."""
    checksums: dict[str, dict[str, str]] = {}
    before: str | None = None
    for stage in stages:
        upstream = inputs.get_stage(shard_id, stage)
        checksums[stage] = _checksums(upstream)
        if before is not None:
            ran_on = upstream.inputs
            # rows from before the inputs were recorded cannot be checked
            if ran_on is not None and ran_on.get(before) != checksums[before]:
                raise StageInputError(
                    f"{stage} of shard {shard_id} ran on other {before} outputs than there are"
                    f" now (it is stale): run {stage} again"
                )
        before = stage
    return checksums


def stage_registry() -> dict[str, Stage]:
    """Stages by name, in pipeline order."""
    from facecaption.attribute.stage import AttributeStage
    from facecaption.caption.stage import CaptionStage
    from facecaption.detect.stage import DetectStage
    from facecaption.fetch.stage import FetchStage
    from facecaption.release.export import ExportStage

    stages = (FetchStage(), DetectStage(), AttributeStage(), CaptionStage(), ExportStage())
    return {stage.name: stage for stage in stages}
