"""The models this process has loaded, kept for the next shard that asks for the same one.

A stage loads its model once per shard. Where one process runs many shards (`facecaption run`,
and each of its `--jobs` worker processes), loading again for every shard repeats the model's
fixed cost: the session or the weights, and the first call's warm-up (docs/benchmarks.md,
"GPU task fixed cost"). A model is reused only when what the stage would load now is the
same: its identity (the sha256 of its files, `facecaption.models.identity`: a file replaced
in place is a new model) and the settings section that built it (any change there loads
again). One model per kind is held, and asking for another drops it first, so a process
never holds two detectors, two attribute models or two LLMs. An Airflow task is a process of
its own: it loads its model once, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from pydantic import BaseModel

Model = TypeVar("Model")


class LoadedModels:
    """At most one loaded model per kind ("detector", "attribute", "llm"), with its key."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[Hashable, Any]] = {}

    def get(self, kind: str, key: Hashable, load: Callable[[], Model]) -> Model:
        """The model of `kind` loaded for `key`: the one held if its key is `key`, else
        `load()` (after dropping the one held, so that two are never in memory at once)."""
        if kind in self._held and self._held[kind][0] == key:
            return self._held[kind][1]
        self._held.pop(kind, None)  # no reference left here: the old model goes before the load
        model = load()
        self._held[kind] = (key, model)
        return model

    def clear(self) -> None:
        """Let go of every model held (tests start each from none)."""
        self._held.clear()


# The process's models: a stage asks here, not the backends' loaders directly.
LOADED_MODELS = LoadedModels()


def model_key(identity: str, section: BaseModel) -> tuple[str, str]:
    """What a loaded model is reused for: the model's identity and every setting of the stage
    section that loaded it."""
    return identity, section.model_dump_json()
