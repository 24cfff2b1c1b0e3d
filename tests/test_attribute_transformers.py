"""The transformers attribute backend: a multi-label image classifier whose labels name the 40
CelebA attributes (or a mapping file does), refused with a reason when it is not one, and
found where the settings say."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from support.tiny_classifier import CONFIDENT, build_tiny_vit

from facecaption.attribute.backends import load_attribute_model
from facecaption.attribute.backends.transformers_classifier import (
    AttributeModelError,
    TransformersAttributeModel,
)
from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.models.errors import ModelNotFoundError
from facecaption.models.identity import attribute_identity
from facecaption.models.locate import attribute_model
from facecaption.settings import Settings


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return build_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit")


def crops(count: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (40 + 9 * i, 40 + 9 * i, 3), dtype=np.uint8) for i in range(count)]


def test_probabilities_come_back_in_celeba_order(vit):
    probabilities = TransformersAttributeModel(vit, device="cpu").predict(crops())
    assert probabilities.shape == (5, 40)
    confident = probabilities > 0.85
    for row in confident:
        assert [CELEBA_ATTRIBUTES[i] for i in np.flatnonzero(row)] == [
            name for name in CELEBA_ATTRIBUTES if name in CONFIDENT
        ]
    assert len({tuple(row.round(6)) for row in probabilities}) == 5  # the input still counts


def test_a_label_file_names_the_outputs_of_a_head_labelled_otherwise(vit, tmp_path):
    mapped = build_tiny_vit(tmp_path / "mapped", labels_file=True)
    assert json.loads((mapped / "config.json").read_text())["id2label"]["0"] == "LABEL_0"
    faces = crops()
    np.testing.assert_allclose(
        TransformersAttributeModel(mapped, device="cpu").predict(faces),
        TransformersAttributeModel(vit, device="cpu").predict(faces),
        atol=1e-6,
    )


def test_batches_do_not_change_the_answer(vit):
    faces = crops(7)
    one = TransformersAttributeModel(vit, batch_size=1, device="cpu").predict(faces)
    many = TransformersAttributeModel(vit, batch_size=32, device="cpu").predict(faces)
    np.testing.assert_allclose(one, many, atol=1e-6)
    assert TransformersAttributeModel(vit, device="cpu").predict([]).shape == (0, 40)


def unreadable_config(folder, config):
    (folder / "config.json").write_text("{not json")


def single_label_head(folder, config):
    config["problem_type"] = "single_label_classification"


def a_label_short(folder, config):
    config["id2label"].pop("39")


def an_unknown_label(folder, config):
    config["id2label"]["3"] = "Sunglasses"


def a_label_file_that_is_no_list(folder, config):
    (folder / "celeba_labels.json").write_text('{"a": 1}')


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (unreadable_config, "not a CelebA-40 transformers classifier"),
        (single_label_head, "needs a multi-label head"),
        (a_label_short, "missing \\['"),
        (an_unknown_label, "unknown \\['Sunglasses'\\]"),
        (a_label_file_that_is_no_list, "not a list of names"),
    ],
)
def test_folders_that_break_the_contract_are_refused(vit, tmp_path, change, message):
    folder = tmp_path / "broken"
    shutil.copytree(vit, folder)
    config = json.loads((folder / "config.json").read_text())
    change(folder, config)
    if change is not unreadable_config:
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AttributeModelError, match=message):
        TransformersAttributeModel(folder, device="cpu")


def test_settings_find_a_folder_by_path_or_in_the_cache(vit, tmp_path):
    by_path = Settings(home=tmp_path, attribute={"model_path": str(vit)})
    assert attribute_model(by_path).backend == "transformers"
    assert load_attribute_model(by_path).model_id == attribute_identity(by_path)
    assert attribute_identity(by_path).startswith("tiny-vit@sha256:")
    cache = tmp_path / "models"
    shutil.copytree(vit, cache / "attributes" / "celeba-vit")
    cached = Settings(home=tmp_path, models_dir=cache, attribute={"model": "celeba-vit"})
    located = attribute_model(cached)
    assert (located.backend, located.path) == ("transformers", cache / "attributes" / "celeba-vit")
    before = attribute_identity(cached)
    processor = located.path / "preprocessor_config.json"
    processor.write_text(processor.read_text().replace('"resample": 3', '"resample": 2'))
    assert attribute_identity(cached) != before  # preprocessing is part of the model
    onnx_only = cached.model_copy(
        update={"attribute": cached.attribute.model_copy(update={"backend": "onnx"})}
    )
    with pytest.raises(ModelNotFoundError, match="pull attributes --hf REPO --name celeba-vit"):
        attribute_model(onnx_only)
