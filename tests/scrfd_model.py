"""A fake SCRFD detector as a real ONNX file: the signature insightface routes to SCRFD with
keypoints (one NCHW input, 9 outputs), and outputs that encode faces chosen by the test.

The graph ignores pixel values (it adds 0 * mean(input) so the input is consumed) and always
answers the same faces, given in detector-input pixels (the letterboxed input_size square).
Each face is written at the anchor of its stride nearest the box centre, with distances divided
by the stride, so that insightface's `distance2bbox`/`distance2kps` decode it exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STRIDES = (8, 16, 32)  # SCRFD's three feature levels, in insightface's output order
ANCHORS_PER_CELL = 2  # SCRFD with 3 levels has 2 anchors per feature-map cell
DEFAULT_STRIDE = 16
OPSET = 17
IR_VERSION = 8  # the IR that introduced opset 17; every supported onnxruntime reads it
INPUT_NAME = "input.1"
BATCH_AXIS = "batch"
KEYPOINTS = 5


def anchor_count(input_size: int, stride: int) -> int:
    return (input_size // stride) ** 2 * ANCHORS_PER_CELL


def _encoded_outputs(faces: list[dict[str, Any]], input_size: int) -> list[np.ndarray]:
    scores = {s: np.zeros((anchor_count(input_size, s), 1), np.float32) for s in STRIDES}
    boxes = {s: np.zeros((anchor_count(input_size, s), 4), np.float32) for s in STRIDES}
    kpss = {s: np.zeros((anchor_count(input_size, s), 2 * KEYPOINTS), np.float32) for s in STRIDES}
    for face in faces:
        stride = face.get("stride", DEFAULT_STRIDE)
        cells = input_size // stride
        x1, y1, x2, y2 = face["box"]
        col = int(np.clip(round((x1 + x2) / 2 / stride), 0, cells - 1))
        row = int(np.clip(round((y1 + y2) / 2 / stride), 0, cells - 1))
        free = [
            (row * cells + col) * ANCHORS_PER_CELL + a
            for a in range(ANCHORS_PER_CELL)
            if scores[stride][(row * cells + col) * ANCHORS_PER_CELL + a, 0] == 0
        ]
        if not free:
            raise ValueError(f"too many faces at the anchor cell of {face['box']}")
        anchor = free[0]
        ax, ay = col * stride, row * stride  # insightface's anchor centres have no half offset
        scores[stride][anchor, 0] = face["score"]
        boxes[stride][anchor] = np.array([ax - x1, ay - y1, x2 - ax, y2 - ay]) / stride
        kps = np.asarray(face["kps"], np.float64).reshape(KEYPOINTS, 2)
        kpss[stride][anchor] = ((kps - (ax, ay)) / stride).reshape(-1)
    return [scores[s] for s in STRIDES] + [boxes[s] for s in STRIDES] + [kpss[s] for s in STRIDES]


def build_scrfd_onnx(
    path: Path, faces: list[dict[str, Any]], input_size: int = 640, batched: bool = False
) -> Path:
    """Write the fake detector to `path`. faces: {"box": (x1, y1, x2, y2), "kps": 5 (x, y),
    "score": float, optional "stride": 8 | 16 | 32}, in detector-input pixels."""
    if input_size % max(STRIDES):
        raise ValueError(f"input_size must be a multiple of {max(STRIDES)}")
    batch_dim: str | int = BATCH_AXIS if batched else 1
    graph_input = helper.make_tensor_value_info(
        INPUT_NAME, TensorProto.FLOAT, [batch_dim, 3, input_size, input_size]
    )
    # batched: one zero per batch item, (B, 1, 1), so outputs broadcast to (B, N, k);
    # otherwise a scalar zero, so outputs keep insightface's 2-D (N, k) shape.
    reduce_axes = [1, 2, 3] if batched else [0, 1, 2, 3]
    nodes = [
        helper.make_node("ReduceMean", [INPUT_NAME], ["pixel_mean"], axes=reduce_axes, keepdims=0),
        helper.make_node("Mul", ["pixel_mean", "zero"], ["zero_per_item"]),
        helper.make_node("Unsqueeze", ["zero_per_item", "item_axes"], ["offset"])
        if batched
        else helper.make_node("Identity", ["zero_per_item"], ["offset"]),
    ]
    initializers = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    if batched:
        initializers.append(numpy_helper.from_array(np.array([1, 2], np.int64), "item_axes"))
    graph_outputs = []
    kinds = ("score", "bbox", "kps")
    for index, constant in enumerate(_encoded_outputs(faces, input_size)):
        name = f"{kinds[index // len(STRIDES)]}_{STRIDES[index % len(STRIDES)]}"
        initializers.append(numpy_helper.from_array(constant, f"{name}_value"))
        nodes.append(helper.make_node("Add", ["offset", f"{name}_value"], [name]))
        shape = [batch_dim, *constant.shape] if batched else list(constant.shape)
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, "fake_scrfd", [graph_input], graph_outputs, initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save_model(model, str(path))
    return path
