"""CelebA-40 attribute classifiers as ONNX files with a sidecar that says how to feed them.

Any classifier plugs in as `name.onnx` plus `name.json`:

    {
      "name": "celeba40-resnet50",
      "input_size": 256,                 # square side the model takes
      "crop": "center_square",           # or "none": resize the whole crop, aspect ignored
      "interpolation": "bicubic",        # bicubic | bilinear | nearest | lanczos (Pillow's)
      "mean": [0.5, 0.5, 0.5],           # per RGB channel, on pixels scaled to [0, 1]
      "std": [0.5, 0.5, 0.5],
      "output": "logits",                # or "probabilities"
      "labels": ["5_o_Clock_Shadow", ...]  # the model's output order, CelebA names
    }

Preprocessing is exactly: centre square crop of side min(H, W) (offsets rounded down), Pillow
resize to input_size x input_size, scale to [0, 1], subtract mean, divide by std, NCHW float32.
Outputs are turned into probabilities (sigmoid of logits) and reordered to CelebA order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from facecaption.attribute.labels import CELEBA_ATTRIBUTES, check_celeba_labels
from facecaption.models.errors import ModelNotFoundError
from facecaption.models.identity import onnx_attribute_identity
from facecaption.models.runtime import default_providers

RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class AttributeModelSpec:
    name: str
    input_size: int
    labels: tuple[str, ...]
    crop: Literal["center_square", "none"] = "center_square"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    output: Literal["logits", "probabilities"] = "logits"

    @classmethod
    def load(cls, path: Path) -> AttributeModelSpec:
        raw = json.loads(path.read_text())
        spec = cls(
            name=raw["name"],
            input_size=int(raw["input_size"]),
            labels=tuple(raw["labels"]),
            crop=raw.get("crop", "center_square"),
            interpolation=raw.get("interpolation", "bicubic"),
            mean=tuple(raw.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(raw.get("std", (0.5, 0.5, 0.5))),
            output=raw.get("output", "logits"),
        )
        spec.validate(path)
        return spec

    def validate(self, where: Path | str) -> None:
        check_celeba_labels(self.labels, where)
        if self.crop not in ("center_square", "none"):
            raise ValueError(f"{where}: crop must be center_square or none")
        if self.interpolation not in RESAMPLING:
            raise ValueError(f"{where}: interpolation must be one of {sorted(RESAMPLING)}")
        if self.output not in ("logits", "probabilities"):
            raise ValueError(f"{where}: output must be logits or probabilities")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"{where}: mean and std need 3 values, std above 0")

    def as_json(self) -> dict:
        return {
            "name": self.name, "input_size": self.input_size, "crop": self.crop,
            "interpolation": self.interpolation, "mean": list(self.mean),
            "std": list(self.std), "output": self.output, "labels": list(self.labels),
        }  # fmt: skip

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_json(), indent=2))


def preprocess(image: np.ndarray, spec: AttributeModelSpec) -> np.ndarray:
    """One RGB uint8 H x W x 3 face crop -> 3 x S x S float32, as the module docstring says."""
    if spec.crop == "center_square":
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image = image[top : top + side, left : left + side]
    size = (spec.input_size, spec.input_size)
    resized = np.asarray(
        Image.fromarray(image).resize(size, RESAMPLING[spec.interpolation]), dtype=np.float32
    )
    normalised = (resized / 255.0 - np.asarray(spec.mean, np.float32)) / np.asarray(
        spec.std, np.float32
    )
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


class OnnxAttributeModel:
    """An ONNX CelebA-40 classifier run by onnxruntime (CUDA first when present)."""

    def __init__(
        self, model_file: Path, *, batch_size: int = 32, providers: list[str] | None = None
    ) -> None:
        import onnxruntime

        sidecar = model_file.with_suffix(".json")
        if not model_file.is_file() or not sidecar.is_file():
            raise ModelNotFoundError(f"no attribute model at {model_file} (+ {sidecar.name})")
        self.spec = AttributeModelSpec.load(sidecar)
        self.model_id = onnx_attribute_identity(model_file)
        self.session = onnxruntime.InferenceSession(
            str(model_file), providers=providers or default_providers()
        )
        model_input = self.session.get_inputs()[0]
        self._input_name = model_input.name
        # A fixed batch dimension of 1 means one face per call.
        self.batch_size = batch_size if model_input.shape[0] != 1 else 1
        self._to_celeba = np.array([self.spec.labels.index(n) for n in CELEBA_ATTRIBUTES])

    def predict(self, faces: list[np.ndarray]) -> np.ndarray:
        """Probabilities, one row per face, columns in CelebA order."""
        rows = []
        for start in range(0, len(faces), self.batch_size):
            batch = np.stack(
                [preprocess(f, self.spec) for f in faces[start : start + self.batch_size]]
            )
            [outputs] = self.session.run(None, {self._input_name: batch})[:1]
            outputs = np.asarray(outputs, dtype=np.float64)
            if self.spec.output == "logits":
                outputs = 1.0 / (1.0 + np.exp(-outputs))
            rows.append(outputs[:, self._to_celeba])
        if not rows:
            return np.zeros((0, len(CELEBA_ATTRIBUTES)))
        return np.concatenate(rows)
