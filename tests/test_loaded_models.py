"""A process that runs many shards loads each model once: a stage reuses the model an earlier
shard loaded while it is the same model (by identity) with the same settings, and holds one
model per kind."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from support.statistics_model import build_statistics_model
from support.tiny_llm import build_tiny_qwen2

from facecaption.attribute.stage import shard_attribute_model
from facecaption.caption.stage import shard_rewriter
from facecaption.detect.stage import shard_detector
from facecaption.models.loaded import LoadedModels
from facecaption.settings import Settings

CPU = ["CPUExecutionProvider"]


class Model:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_model_is_loaded_once_per_key_and_one_is_held_per_kind():
    models = LoadedModels()
    loads: list[str] = []
    first_gone_before_load: list[bool] = []
    first_held = None

    def load(name: str):
        def build() -> Model:
            gc.collect()
            if first_held is not None:
                first_gone_before_load.append(first_held() is None)
            loads.append(name)
            return Model(name)

        return build

    first_held = weakref.ref(models.get("detector", "a", load("a")))
    assert models.get("detector", "a", load("a")) is first_held()
    attribute = models.get("attribute", "a", load("attribute a"))
    second = models.get("detector", "b", load("b"))

    assert second.name == "b"
    assert loads == ["a", "attribute a", "b"]
    # the first detector was let go before the second loaded
    assert first_gone_before_load[-1] is True
    assert models.get("attribute", "a", load("attribute a")) is attribute  # other kinds stay


def test_the_detect_stage_reuses_its_detector_while_the_settings_stay(tmp_path: Path):
    settings = Settings(home=tmp_path, detect={"backend": "retinaface", "providers": CPU})
    first = shard_detector(settings)

    assert shard_detector(settings) is first
    smaller = settings.model_copy(
        update={"detect": settings.detect.model_copy(update={"batch_size": 2})}
    )
    other = shard_detector(smaller)
    assert other is not first and other.batch_size == 2


def test_an_attribute_model_replaced_in_place_is_loaded_again(tmp_path: Path):
    path = build_statistics_model(tmp_path / "attributes.onnx", name="demo-statistics-one")
    settings = Settings(home=tmp_path, attribute={"model_path": str(path), "providers": CPU})
    first = shard_attribute_model(settings)
    assert shard_attribute_model(settings) is first

    build_statistics_model(path, name="demo-statistics-two")  # same path, other files
    second = shard_attribute_model(settings)

    assert second is not first and second.model_id != first.model_id


def test_an_in_process_llm_is_reused_and_a_server_client_is_not(tmp_path: Path):
    folder = build_tiny_qwen2(tmp_path / "tiny-qwen2")
    local = Settings(home=tmp_path, caption={"backend": "transformers", "model_path": str(folder)})
    rewriter = shard_rewriter(local)
    assert shard_rewriter(local) is rewriter

    served = Settings(
        home=tmp_path, caption={"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}
    )
    assert shard_rewriter(served) is not shard_rewriter(served)
