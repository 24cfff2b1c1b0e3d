"""Pipeline stages. Each is a plain object with a name, a version, the inputs its fingerprint
covers, and `run(shard, settings, store)`; the CLI, the DAGs and the tests call them alike
through `facecaption.runner.run_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from facecaption.settings import Settings
from facecaption.state import Shard, ShardState
from facecaption.store import ArtifactRef, ArtifactStore


@dataclass(frozen=True)
class StageResult:
    counts: dict[str, int]
    artifacts: dict[str, ArtifactRef] = field(default_factory=dict)


class Stage(Protocol):
    name: str
    version: str
    artifact_names: tuple[str, ...]

    def fingerprint_inputs(
        self, shard: Shard, settings: Settings, state: ShardState
    ) -> dict[str, Any]: ...

    def run(self, shard: Shard, settings: Settings, store: ArtifactStore) -> StageResult: ...


def stage_registry() -> dict[str, Stage]:
    """Stages by name, in pipeline order."""
    from facecaption.stages.fetch import FetchStage

    return {stage.name: stage for stage in (FetchStage(),)}
