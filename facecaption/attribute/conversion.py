"""Turn a torch CelebA-40 checkpoint into an attribute model: `name.onnx` plus `name.json`.

Supported checkpoints (read with `torch.load(map_location="cpu", weights_only=True)`, so
tensors and plain containers only, never pickled code):

- a state_dict of torchvision's `resnet50` layout with a 40-way head: `conv1.weight`,
  `bn1.*`, `layer1.0.conv1.weight` ... `layer4.2.bn3.*`, `layerN.0.downsample.{0,1}.*`,
  `fc.weight` (40 x 2048) and `fc.bias` (40);
- or a dict holding that state_dict under "state_dict" or "model" (training scripts' usual
  `{"epoch": ..., "state_dict": ..., "optimizer": ...}`);
- either of them saved from `nn.DataParallel` / DDP, whose keys start with "module.": the
  prefix is stripped.

A whole pickled `nn.Module` is not accepted: load it yourself and save its `state_dict()`.
The model is rebuilt by `facecaption.attribute.resnet.ResNet50` (torchvision's layout, no
torchvision needed) and loaded strictly, so a missing, extra or mis-shaped tensor is an error
that names the keys. `labels` gives the order of the 40 outputs (CelebA's own order by
default); the sidecar records it, so a head trained in another order still reads correctly.

Which weights? The FaceCaption-15M authors point to a ResNet-50 fine-tuned on CelebA's 40
attributes with adaptively weighted multi-task losses (He et al., ACM MM 2017; about 90.8%
mean accuracy), preprocessed as this function's defaults say: centre square crop, 256 px
bicubic, mean = std = 0.5, sigmoid. We do not distribute those weights, in torch format or
any other, and have not checked the layout of any file its authors published; any
checkpoint in torchvision's ResNet-50 layout with a 40-way `fc` works, e.g. one you
fine-tune yourself from torchvision's ImageNet weights on CelebA's `list_attr_celeba.txt`.

The export is checked before it is installed: onnxruntime's output on a random batch must
match torch's within 1e-3 (max absolute difference of the outputs). Files are written under
temporary names and renamed into place, the sidecar first, so a failed export leaves nothing
and a reader that finds the .onnx also finds its .json.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from facecaption.attribute.backends.onnx import AttributeModelSpec
from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.attribute.options import INPUT_SIZE
from facecaption.core.errors import PermanentError

OPSET = 17
TOLERANCE = 1e-3
CHECK_BATCH = 2


class CheckpointError(PermanentError, ValueError):
    """A checkpoint that is not a state_dict of the expected architecture."""


def load_state_dict(checkpoint: Path) -> dict:
    """The tensors of `checkpoint`, unwrapped from "state_dict"/"model" and "module."."""
    import torch

    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(raw, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(f"{checkpoint}: expected a state_dict (a dict of tensors)")
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(raw):
        others = sorted(str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor))
        raise CheckpointError(f"{checkpoint}: not a state_dict; non-tensor entries {others[:5]}")
    if all(str(k).startswith("module.") for k in tensors):
        tensors = {str(k).removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def build_model(arch: str, state: dict, num_classes: int, where: Path):
    from facecaption.attribute.resnet import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHITECTURES)}")
    model = ARCHITECTURES[arch](num_classes=num_classes)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or shapes:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if keys
        ]
        raise CheckpointError(
            f"{where}: not a torchvision {arch} state_dict with {num_classes} outputs; "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def convert_attribute_model(
    checkpoint: Path,
    out: Path,
    *,
    arch: str = "resnet50",
    input_size: int = INPUT_SIZE,
    labels: Sequence[str] = CELEBA_ATTRIBUTES,
    crop: str = "center_square",
    interpolation: str = "bicubic",
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    output: str = "logits",
    name: str | None = None,
) -> Path:
    """Export `checkpoint` to `out` (.onnx) and its sidecar; returns the .onnx path.

    `output="probabilities"` appends a sigmoid to the graph; the default leaves logits.
    """
    import torch

    out = Path(out).with_suffix(".onnx")
    spec = AttributeModelSpec(
        name=name or out.stem,
        input_size=int(input_size),
        labels=tuple(labels),
        crop=crop,  # type: ignore[arg-type]
        interpolation=interpolation,
        mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
        std=tuple(float(s) for s in std),  # type: ignore[arg-type]
        output=output,  # type: ignore[arg-type]
    )
    spec.validate(out.with_suffix(".json"))
    model = build_model(arch, load_state_dict(checkpoint), len(spec.labels), checkpoint)
    if output == "probabilities":
        model = torch.nn.Sequential(model, torch.nn.Sigmoid()).eval()

    return export_onnx(model, spec, out, where=checkpoint)


def export_onnx(
    model, spec: AttributeModelSpec, out: Path, *, where: object, extra: dict | None = None
) -> Path:  # noqa: ANN001
    """Export a torch module (NCHW float32 -> the spec's output) to `out` and write its
    sidecar (`extra`: more keys for it, e.g. provenance), after checking onnxruntime against
    torch on a random batch (see the module docstring); returns the .onnx path."""
    import json

    import onnxruntime
    import torch

    out = Path(out).with_suffix(".onnx")
    sidecar = out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    onnx_tmp = out.with_name(f".{out.name}{tag}")
    json_tmp = sidecar.with_name(f".{sidecar.name}{tag}")
    sample = torch.randn(
        CHECK_BATCH, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0)
    )
    output = spec.output
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model,
                (sample,),
                str(onnx_tmp),
                dynamo=False,  # the torch.export-based exporter needs onnxscript
                opset_version=OPSET,
                input_names=["input"],
                output_names=[output],
                dynamic_axes={"input": {0: "batch"}, output: {0: "batch"}},
            )
            expected = model(sample).numpy()
        session = onnxruntime.InferenceSession(str(onnx_tmp), providers=["CPUExecutionProvider"])
        [got] = session.run(None, {"input": sample.numpy()})[:1]
        diff = float(np.max(np.abs(np.asarray(got) - expected)))
        if not diff < TOLERANCE:
            raise RuntimeError(
                f"ONNX export of {where} differs from torch by {diff:.3g} (limit {TOLERANCE})"
            )
        json_tmp.write_text(json.dumps({**spec.as_json(), **(extra or {})}, indent=2))
        os.replace(json_tmp, sidecar)
        os.replace(onnx_tmp, out)
    finally:
        _remove(onnx_tmp, json_tmp)
    return out
