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

from dataclasses import dataclass, field
from typing import Any, Protocol

from facecaption.core.errors import PermanentError
from facecaption.core.store import ArtifactRef, ArtifactStore
from facecaption.settings import Settings
from facecaption.state import Shard, StageState
from facecaption.state.takedowns import TakedownIndex


class StageInputError(PermanentError, RuntimeError):
    """The stage's input is not there: the stage before it has not finished."""


class DedupIndex(Protocol):
    def claim(self, shard_id: str, candidates: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
        """Register `(sha256, key)` pairs of one shard; return each sha256's first owner
        `(shard_id, key)`."""
        ...


class StageInputs(Protocol):
    """What a shard's fingerprint reads of the state: its stages, its takedown matches."""

    def get_stage(self, shard_id: str, stage: str) -> StageState: ...

    def takedown_matches(self, shard_id: str) -> list[tuple[int, str]]:
        """(request id, key) of every recorded takedown match in the shard, sorted."""
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
    # The stage's own earlier outputs when they were made with the same fingerprint: a stage
    # may keep what in them is final and redo only the rest.
    previous: StageState | None = None


@dataclass(frozen=True)
class StageResult:
    counts: dict[str, int]
    artifacts: dict[str, ArtifactRef] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # what the dataset report needs of this shard beyond counts (histograms, sketches), kept
    # with the state so the report reads no artifact (see facecaption.release.stats)
    stats: dict[str, Any] | None = None


class Stage(Protocol):
    name: str
    version: str
    artifact_names: tuple[str, ...]

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
    upstream = inputs.get_stage(shard_id, stage)
    if upstream.status != "done":
        raise StageInputError(f"{stage} of shard {shard_id} is {upstream.status}, not done")
    return {name: ref["sha256"] for name, ref in sorted(upstream.artifacts.items())}


def stage_registry() -> dict[str, Stage]:
    """Stages by name, in pipeline order."""
    from facecaption.attribute.stage import AttributeStage
    from facecaption.caption.stage import CaptionStage
    from facecaption.detect.stage import DetectStage
    from facecaption.fetch.stage import FetchStage
    from facecaption.release.export import ExportStage

    stages = (FetchStage(), DetectStage(), AttributeStage(), CaptionStage(), ExportStage())
    return {stage.name: stage for stage in stages}
