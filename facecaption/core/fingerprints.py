"""Fingerprints: a hash of what a stage's outputs depend on (the stage's version, its settings
and model, the shard's rows or its input stages' artifacts). A done stage whose recorded
fingerprint differs from the current one is stale.

The runner works one out for the shard it runs, reading the state DB as it goes
(`LiveStageInputs`). Work selection checks thousands of shards at once: `Fingerprints` reads
their stages, takedown matches and dedup epochs in one query each, and works out each stage's
settings part (settings, model identity, grammar) once, however many shards it checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

from facecaption.core.stage import Stage, StageInputs
from facecaption.settings import Settings
from facecaption.state import Shard, ShardState, StageState
from facecaption.state.dedup import ImageHashIndex
from facecaption.state.takedowns import TakedownIndex

_ENCODE = json.JSONEncoder(sort_keys=True, default=str).encode


def fingerprint(stage: Stage, inputs: dict[str, Any]) -> str:
    return hashlib.sha256(
        _ENCODE({"stage": stage.name, "version": stage.version, "inputs": inputs}).encode()
    ).hexdigest()


def _marker(key: str) -> str:
    # Stands for a pre-serialised settings value in the inputs; a NUL never occurs in what a
    # shard's inputs hold (ids, checksums, row numbers, column names).
    return f"\x00settings-part:{key}\x00"


def current_inputs(
    stage: Stage, shard: Shard, settings: Settings, inputs: StageInputs
) -> dict[str, Any]:
    """What the stage's fingerprint would cover if it ran on this shard now. The shard part
    is worked out first: a stage whose input is not done raises StageInputError before its
    model is looked for."""
    shard_part = stage.shard_inputs(shard, settings, inputs)
    return {**shard_part, **stage.settings_inputs(settings)}


def current_fingerprint(stage: Stage, shard: Shard, settings: Settings, inputs: StageInputs) -> str:
    """The fingerprint the stage would record if it ran on this shard now."""
    return fingerprint(stage, current_inputs(stage, shard, settings, inputs))


class LiveStageInputs:
    """StageInputs read from the state DB when asked (one shard at a time)."""

    def __init__(self, state: ShardState) -> None:
        self.state = state

    def get_stage(self, shard_id: str, stage: str) -> StageState:
        return self.state.get_stage(shard_id, stage)

    def takedown_matches(self, shard_id: str) -> list[tuple[int, str]]:
        return TakedownIndex(self.state.engine).shard_matches(shard_id)

    def dedup_epoch(self, shard_id: str) -> int:
        return ImageHashIndex(self.state.engine).epoch(shard_id)


class PrefetchedStageInputs:
    """StageInputs answered from rows read beforehand (`Fingerprints.prefetch`)."""

    def __init__(
        self,
        states: Iterable[StageState],
        matches: dict[str, list[tuple[int, str]]],
        epochs: dict[str, int] | None = None,
    ) -> None:
        self._states = {(state.shard_id, state.stage): state for state in states}
        self._matches = matches
        self._epochs = epochs or {}

    def get_stage(self, shard_id: str, stage: str) -> StageState:
        return self._states.get((shard_id, stage)) or StageState(shard_id, stage, "pending")

    def find(self, shard_id: str, stage: str) -> StageState | None:
        return self._states.get((shard_id, stage))

    def takedown_matches(self, shard_id: str) -> list[tuple[int, str]]:
        return self._matches.get(shard_id, [])

    def dedup_epoch(self, shard_id: str) -> int:
        return self._epochs.get(shard_id, 0)


class Fingerprints:
    """Current fingerprints of many shards' stages from prefetched state; each stage's settings
    part is worked out on first use (a missing model only matters to a shard that needs it)."""

    def __init__(
        self, settings: Settings, stages: dict[str, Stage], inputs: PrefetchedStageInputs
    ) -> None:
        self.settings = settings
        self.stages = stages
        self.inputs = inputs
        self._settings_parts: dict[str, dict[str, str]] = {}
        self._markers: dict[str, dict[str, str]] = {}

    @classmethod
    def prefetch(
        cls,
        settings: Settings,
        state: ShardState,
        stages: dict[str, Stage],
        shard_ids: Sequence[str] | None,
        takedowns: bool = True,
        epochs: bool = True,
    ) -> Fingerprints:
        """Read the stages of `shard_ids` (None: all), when `takedowns` their takedown
        matches (what export fingerprints cover), and when `epochs` their dedup epochs (what
        fetch fingerprints cover): at most three queries."""
        matches = TakedownIndex(state.engine).matches_by_shard(shard_ids) if takedowns else {}
        raised = ImageHashIndex(state.engine).epochs(shard_ids) if epochs else {}
        # a stage's recorded inputs matter here only where they name the checksums of the
        # stage before it: `upstream_chain` compares those, in chains in pipeline order
        rows = state.work_table(shard_ids, {stage: before for before, stage in pairwise(stages)})
        inputs = PrefetchedStageInputs(rows, matches, raised)
        return cls(settings, stages, inputs)

    def current(self, stage_name: str, shard: Shard) -> str:
        """What `current_fingerprint` gives; StageInputError when an input is not done.

        The same bytes are hashed, but the settings part (serialised once per stage) goes in
        by text substitution, so each shard costs one small encode and one sha256."""
        stage = self.stages[stage_name]
        shard_part = stage.shard_inputs(shard, self.settings, self.inputs)
        settings_part = self._settings_parts.get(stage_name)
        if settings_part is None:
            values = stage.settings_inputs(self.settings)
            self._markers[stage_name] = {key: _marker(key) for key in values}
            settings_part = {_ENCODE(_marker(key)): _ENCODE(value) for key, value in values.items()}
            self._settings_parts[stage_name] = settings_part
        payload = _ENCODE(
            {
                "stage": stage.name,
                "version": stage.version,
                "inputs": {**shard_part, **self._markers[stage_name]},
            }
        )
        for marker, value in settings_part.items():
            payload = payload.replace(marker, value, 1)
        return hashlib.sha256(payload.encode()).hexdigest()
