"""Shard state in Postgres: connection, migrations, and the shard/stage tables."""

from facecaption.settings import Settings
from facecaption.state.db import StateDBError, create_state_engine, require_current_schema
from facecaption.state.shards import (
    Shard,
    ShardBusyError,
    ShardState,
    Source,
    SourceVersion,
    StageState,
    UnknownShardError,
)

__all__ = [
    "Shard",
    "ShardBusyError",
    "ShardState",
    "Source",
    "SourceVersion",
    "StageState",
    "StateDBError",
    "UnknownShardError",
    "open_state",
]


def open_state(settings: Settings) -> ShardState:
    """Connect to the state DB and check that its schema is current."""
    engine = create_state_engine(settings)
    require_current_schema(engine)
    return ShardState(engine)
