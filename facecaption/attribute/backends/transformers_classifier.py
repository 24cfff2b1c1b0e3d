"""CelebA-40 attribute classifiers as Hugging Face transformers image-classification
checkpoints with a multi-label head.

The contract, for anyone training or exporting one (`save_pretrained` writes all of it):

    {folder}/config.json               an image-classification config that
                                       AutoModelForImageClassification loads (ViT, ConvNeXt,
                                       ResNet, Swin, ...), with
                                         "problem_type": "multi_label_classification"
                                       (one independent sigmoid per label) and "id2label"
                                       naming the 40 CelebA attributes in CelebA's spelling
                                       ("5_o_Clock_Shadow", ..., "Young"), once each, any order
    {folder}/celeba_labels.json        optional: a JSON list of the 40 CelebA names in output
                                       order; it wins over id2label (for heads labelled
                                       otherwise)
    {folder}/preprocessor_config.json  the image processor (AutoImageProcessor): how a crop
                                       is resized and normalised
    {folder}/*.safetensors             the weights

Input: each aligned face crop (RGB, square, at the face's native resolution) goes through the
folder's image processor as it is. Output: sigmoid of the logits, reordered to CelebA order.
Install one with `facecaption models pull attributes --hf REPO` (or copy the folder into
`{models_dir}/attributes/NAME/`) and select it with `attribute.model = NAME`, or point
`attribute.model_path` at the folder. Runs on CUDA when available, else CPU, in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from facecaption.attribute.labels import CELEBA_ATTRIBUTES, check_celeba_labels
from facecaption.core.errors import PermanentError
from facecaption.models.identity import transformers_attribute_identity

LABELS_FILE = "celeba_labels.json"
MULTI_LABEL = "multi_label_classification"


class AttributeModelError(PermanentError, ValueError):
    """The folder does not meet the contract in this module's docstring."""


def read_celeba_labels(folder: Path) -> tuple[str, ...]:
    """The model's output labels in output order, after checking the contract."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        if config.get("problem_type") != MULTI_LABEL:
            raise AttributeModelError(
                f"{folder}: problem_type is {config.get('problem_type')!r}; a CelebA-40 model"
                f" needs a multi-label head (problem_type = {MULTI_LABEL!r}: one sigmoid per"
                " attribute)"
            )
        if (folder / LABELS_FILE).is_file():
            labels = json.loads((folder / LABELS_FILE).read_text())
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise ValueError(f"{LABELS_FILE} is not a list of names")
        else:
            id2label = config.get("id2label") or {}
            labels = [id2label[str(index)] for index in range(len(id2label))]
        check_celeba_labels(labels, folder)
    except AttributeModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AttributeModelError(
            f"{folder} is not a CelebA-40 transformers classifier: {error}"
        ) from None
    return tuple(labels)


class TransformersAttributeModel:
    """A transformers multi-label image classifier whose labels are the 40 CelebA names."""

    def __init__(self, folder: Path, *, batch_size: int = 32, device: str | None = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        folder = Path(folder)
        labels = read_celeba_labels(folder)
        self.model_id = transformers_attribute_identity(folder)
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForImageClassification.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32
        ).to(self.device)
        self.model.eval()
        if self.model.config.num_labels != len(labels):
            raise AttributeModelError(
                f"{folder}: the head has {self.model.config.num_labels} outputs for"
                f" {len(labels)} labels"
            )
        self._to_celeba = np.array([labels.index(name) for name in CELEBA_ATTRIBUTES])

    def predict(self, faces: list[np.ndarray]) -> np.ndarray:
        """Probabilities, one row per face, columns in CelebA order."""
        import torch

        rows = []
        with torch.inference_mode():
            for start in range(0, len(faces), self.batch_size):
                batch = self.processor(
                    images=faces[start : start + self.batch_size], return_tensors="pt"
                )
                pixels = batch["pixel_values"].to(self.device, torch.float32)
                logits = self.model(pixel_values=pixels).logits.double()
                rows.append(torch.sigmoid(logits).cpu().numpy()[:, self._to_celeba])
        if not rows:
            return np.zeros((0, len(CELEBA_ATTRIBUTES)))
        return np.concatenate(rows)
