"""A tiny CelebA-40 "classifier" whose logits are a fixed linear function of image statistics.

It is not a face attribute model: it exists so that the demo runs the attribute stage offline
and the tests know the right answer. Its logits are `features @ WEIGHTS + BIASES` where the
features are the preprocessed input's per-channel means and standard deviations (6 numbers),
computed inside a real ONNX graph run by onnxruntime. `expected_logits` computes the same in
numpy for checking.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facecaption.attribute.backends.onnx import AttributeModelSpec
from facecaption.attribute.labels import CELEBA_ATTRIBUTES

FEATURES = 6  # mean and standard deviation of each of the 3 channels
INPUT_SIZE = 64
SEED = 40
OPSET = 17


def weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return (
        rng.normal(0, 4, (FEATURES, len(CELEBA_ATTRIBUTES))).astype(np.float32),
        rng.normal(0, 2, len(CELEBA_ATTRIBUTES)).astype(np.float32),
    )


def expected_logits(batch: np.ndarray) -> np.ndarray:
    """The model's output for a preprocessed N x 3 x S x S batch, in numpy."""
    mean = batch.mean(axis=(2, 3))
    std = np.sqrt(((batch - mean[:, :, None, None]) ** 2).mean(axis=(2, 3)))
    weight, bias = weights()
    return np.concatenate([mean, std], axis=1) @ weight + bias


def build_statistics_model(path: Path, name: str = "demo-image-statistics") -> Path:
    """Write `path` (.onnx) and its sidecar (.json); labels in CelebA order, logits out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = weights()
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean4"], axes=[2, 3], keepdims=1),
        helper.make_node("Sub", ["input", "mean4"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["var4"], axes=[2, 3], keepdims=1),
        helper.make_node("Sqrt", ["var4"], ["std4"]),
        helper.make_node("Flatten", ["mean4"], ["mean"], axis=1),
        helper.make_node("Flatten", ["std4"], ["std"], axis=1),
        helper.make_node("Concat", ["mean", "std"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "weight"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", 3, INPUT_SIZE, INPUT_SIZE]
            )
        ],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", len(CELEBA_ATTRIBUTES)]
            )
        ],
        initializer=[
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    AttributeModelSpec(
        name=name,
        input_size=INPUT_SIZE,
        labels=CELEBA_ATTRIBUTES,
        crop="center_square",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        output="logits",
    ).save(path.with_suffix(".json"))
    return path
