"""Which errors a retry would meet again (permanent) and which may pass."""

from __future__ import annotations

import pydantic
import pytest

from facecaption.core.errors import is_permanent
from facecaption.core.stage import StageInputError
from facecaption.models.errors import ModelNotFoundError
from facecaption.plan.sources import SourceError
from facecaption.settings import Settings
from facecaption.state.db import StateDBError, StateSchemaError
from facecaption.state.shards import ShardBusyError


def test_missing_models_bad_sources_and_old_schemas_are_permanent() -> None:
    for error in (
        ModelNotFoundError("no model"),
        SourceError("not parquet"),
        StageInputError("detect is pending"),
        StateSchemaError("run facecaption db upgrade"),
    ):
        assert is_permanent(error), error


def test_invalid_settings_are_permanent() -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        Settings(shard_size=0)
    assert is_permanent(raised.value)


def test_busy_shards_and_unreachable_databases_may_pass() -> None:
    for error in (ShardBusyError("busy"), StateDBError("unreachable"), OSError("disk full")):
        assert not is_permanent(error), error
