"""CelebA-40 attribute classifiers behind one interface, and the router that loads the one the
settings name: an ONNX file with its sidecar (`onnx`) or a transformers image-classification
folder with a multi-label head (`transformers_classifier`). Their `model_id`s come from
`facecaption.models.identity`, the same functions the attribute fingerprint uses."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from facecaption.models.locate import attribute_model
from facecaption.settings import Settings


class AttributeModel(Protocol):
    model_id: str  # what produced the probabilities, recorded per face
    batch_size: int

    def predict(self, faces: list[np.ndarray]) -> np.ndarray:
        """Probabilities (faces x 40, CelebA order) for RGB uint8 face crops."""
        ...


def load_attribute_model(settings: Settings) -> AttributeModel:
    attribute = settings.attribute
    located = attribute_model(settings)
    if located.backend == "transformers":
        from facecaption.attribute.backends.transformers_classifier import (
            TransformersAttributeModel,
        )

        return TransformersAttributeModel(located.path, batch_size=attribute.batch_size)
    from facecaption.attribute.backends.onnx import OnnxAttributeModel

    return OnnxAttributeModel(
        located.path, batch_size=attribute.batch_size, providers=attribute.providers
    )
