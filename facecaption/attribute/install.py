"""Installing a trained CelebA-40 classifier: calibration folded into its head, exported to
both formats the attribute stage loads (ONNX + sidecar, and a transformers folder), each
checked against torch on real crops, then put in the model cache with a model card and a
manifest entry that records where it came from.

Files, for name N under `{models_dir}/attributes/`: `N.onnx` + `N.json` (the sidecar, with
`calibration` and `training` keys the loader ignores), `N/` (config.json with the 40 CelebA
labels, the weights, an image processor doing the sidecar's preprocessing, `training.json`),
and `N.md` (the card). Everything is written in a scratch folder inside the cache and renamed
into place, the sidecar before its .onnx, so a failed install leaves the old model or nothing.
The ONNX file comes first in `attribute_model`'s `auto` order, so that is what runs; it gives
torch's probabilities within `EXPORT_TOLERANCE`, the transformers folder within
`PROCESSOR_TOLERANCE` (its image processor may resize with torchvision instead of Pillow).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecaption.attribute.backends.onnx import AttributeModelSpec, preprocess
from facecaption.attribute.evaluation import Calibration, evaluation_markdown, sigmoid
from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.core.errors import PermanentError
from facecaption.core.store import sha256_file
from facecaption.models.cache import ModelCache

EXPORT_TOLERANCE = 1e-3  # max |p_export - p_torch| on the check crops
# The transformers folder's image processor resizes with torchvision where it is installed
# (Pillow otherwise, as the sidecar does): a resize filter apart, so a looser bound.
PROCESSOR_TOLERANCE = 0.02
CARD_SUFFIX = ".md"
TRAINING_FILE = "training.json"
BICUBIC = 3  # PIL's code, as transformers' image processors take it


class ModelNameTaken(PermanentError, ValueError):
    """The name already holds a model and replacing it was not asked for."""


@dataclass(frozen=True)
class InstalledModel:
    onnx: Path
    folder: Path
    card: Path
    key: str  # the manifest entry


def refuse_taken_name(cache: ModelCache, name: str, replace: bool) -> None:
    """Before any training: a name holding a model needs `replace`."""
    taken = [
        path
        for path in (cache.attribute_model(name), cache.attribute_folder(name))
        if path.exists()
    ]
    if taken and not replace:
        raise ModelNameTaken(
            f"the model cache already holds {', '.join(map(str, taken))}: pass --replace to"
            " install the trained model over it (outputs made with the old one become stale),"
            " or --name to install it beside it"
        )


def head_linear(model):  # noqa: ANN001, ANN201
    """The 40-way linear layer of a transformers image classifier's head (`classifier`)."""
    import torch

    head = getattr(model, "classifier", None)
    layers = [
        m for m in (head.modules() if head is not None else ()) if isinstance(m, torch.nn.Linear)
    ]
    if not layers or layers[-1].out_features != len(CELEBA_ATTRIBUTES):
        raise PermanentError(
            f"{type(model).__name__}: no 40-way linear `classifier` head to fold calibration into"
        )
    return layers[-1]


def fold_calibration(model, calibration: Calibration) -> None:  # noqa: ANN001
    """Make the head output scale * logit + shift (exact: the head is linear)."""
    import torch

    layer = head_linear(model)
    with torch.no_grad():
        where = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        scale = torch.as_tensor(calibration.scale, **where)
        shift = torch.as_tensor(calibration.shift, **where)
        layer.weight.mul_(scale[:, None])
        bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        layer.bias = torch.nn.Parameter(bias * scale + shift)


def logits_module(model):  # noqa: ANN001, ANN201
    """The transformers model as NCHW pixels -> logits (what the ONNX graph computes)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixels).logits

    return LogitsOnly().eval()


def torch_probabilities(model, crops: list[np.ndarray], spec: AttributeModelSpec) -> np.ndarray:  # noqa: ANN001
    """The model's own probabilities for RGB crops, preprocessed as the sidecar says."""
    import torch

    batch = torch.from_numpy(np.stack([preprocess(crop, spec) for crop in crops]))
    with torch.no_grad():
        return sigmoid(model.cpu().float()(pixel_values=batch).logits.double().numpy())


def save_transformers(model, spec: AttributeModelSpec, folder: Path, training: dict) -> None:  # noqa: ANN001
    """`save_pretrained` plus an image processor that does the sidecar's preprocessing (the
    crops are square: resizing to S x S is the sidecar's centre square then resize)."""
    from transformers import ViTImageProcessor

    model.save_pretrained(folder)
    ViTImageProcessor(
        do_resize=True,
        size={"height": spec.input_size, "width": spec.input_size},
        resample=BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    ).save_pretrained(folder)
    (folder / TRAINING_FILE).write_text(json.dumps(training, indent=2, sort_keys=True))


def check_exports(
    model, spec: AttributeModelSpec, onnx_file: Path, folder: Path, crops: list[np.ndarray]
) -> dict[str, float]:  # noqa: ANN001
    """Each export, loaded by the attribute stage's own backend, against torch: the largest
    probability difference per format; RuntimeError above EXPORT_TOLERANCE."""
    from facecaption.attribute.backends.onnx import OnnxAttributeModel
    from facecaption.attribute.backends.transformers_classifier import TransformersAttributeModel

    expected = torch_probabilities(model, crops, spec)
    got = {
        "onnx": OnnxAttributeModel(onnx_file, providers=["CPUExecutionProvider"]).predict(crops),
        "transformers": TransformersAttributeModel(folder, device="cpu").predict(crops),
    }
    differences = {kind: float(np.abs(p - expected).max()) for kind, p in got.items()}
    limits = {"onnx": EXPORT_TOLERANCE, "transformers": PROCESSOR_TOLERANCE}
    for kind, difference in differences.items():
        if not difference < limits[kind]:
            raise RuntimeError(
                f"the {kind} export differs from torch by {difference:.3g} in probability"
                f" (limit {limits[kind]}); nothing was installed"
            )
    return differences


def model_card(name: str, record: dict, table: str) -> str:
    training = record["training"]
    return "\n".join(
        [
            f"# {name}: a CelebA-40 attribute classifier trained by facecaption",
            "",
            f"- dataset: {json.dumps(record['dataset'])}",
            f"- backbone: {json.dumps(record['backbone'])}",
            f"- alignment: {json.dumps(training['alignment'])}",
            f"- settings: {json.dumps(training['settings'], sort_keys=True)}",
            f"- steps: {training['steps']}, final loss {training['final_loss']:.4f}",
            f"- calibration: {record['calibration']['method']} per attribute, fitted on the"
            " valid split, folded into the head of both exports",
            f"- exports agree with torch within: {json.dumps(record['export_check'])}",
            f"- command: `{record['command']}`",
            "- terms: weights learnt from CelebA carry its release agreement (non-commercial"
            " research use only)",
            "",
            "## Evaluation",
            "",
            table,
        ]
    )


def install_trained_model(
    cache: ModelCache,
    model,  # noqa: ANN001
    spec: AttributeModelSpec,
    calibration: Calibration,
    report: dict,
    record: dict,
    check_crops: list[np.ndarray],
) -> InstalledModel:
    """Fold `calibration` into `model`, export, check, install (see the module docstring)."""
    from facecaption.attribute.conversion import export_onnx

    name = spec.name
    model = model.cpu().float().eval()
    fold_calibration(model, calibration)
    record = {**record, "calibration": calibration.as_json(), "metrics": report}
    target_onnx, target_folder = cache.attribute_model(name), cache.attribute_folder(name)
    card_path = target_onnx.with_suffix(CARD_SUFFIX)
    with cache.scratch() as scratch:
        onnx_file = export_onnx(
            logits_module(model),
            spec,
            scratch / f"{name}.onnx",
            where=f"trained model {name}",
            extra={"calibration": "folded into the graph", "training": record["training"]},
        )
        folder = scratch / name
        save_transformers(model, spec, folder, {k: v for k, v in record.items() if k != "metrics"})
        record["export_check"] = check_exports(model, spec, onnx_file, folder, check_crops)
        card = model_card(name, record, evaluation_markdown(report))
        (scratch / f"{name}{CARD_SUFFIX}").write_text(card)
        target_onnx.parent.mkdir(parents=True, exist_ok=True)
        if target_folder.exists():
            target_folder.rename(scratch / "replaced")  # removed with the scratch folder
        onnx_file.with_suffix(".json").replace(target_onnx.with_suffix(".json"))
        onnx_file.replace(target_onnx)
        folder.rename(target_folder)
        (scratch / f"{name}{CARD_SUFFIX}").replace(card_path)
    root = target_onnx.parent
    files = [target_onnx, target_onnx.with_suffix(".json"), card_path]
    files += sorted(p for p in target_folder.rglob("*") if p.is_file())
    key = f"attributes/{name}"
    cache.record(
        key,
        {
            **record,
            "source": "trained",
            "files": {p.relative_to(root).as_posix(): sha256_file(p) for p in files},
        },
    )
    return InstalledModel(target_onnx, target_folder, card_path, key)
