"""Exporting torch CelebA-40 checkpoints to attribute models, checked against torch itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from facecaption.attribute.backends.onnx import OnnxAttributeModel, preprocess
from facecaption.attribute.conversion import CheckpointError, convert_attribute_model
from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.attribute.resnet import ResNet50

SIZE = 64  # small input keeps ResNet-50 fast; the architecture is the same at 256


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[ResNet50, dict]:
    """A random ResNet-50 whose head is scaled so probabilities are not all 0 or 1."""
    torch.manual_seed(0)
    model = ResNet50(len(CELEBA_ATTRIBUTES)).eval()
    with torch.no_grad():
        model.fc.weight.mul_(0.02)
    return model, model.state_dict()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained) -> dict:
    _, state = trained
    folder = tmp_path_factory.mktemp("export")
    torch.save(state, folder / "plain.pt")
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}
    torch.save(wrapped, folder / "wrapped.pt")
    return {
        kind: convert_attribute_model(
            folder / f"{kind}.pt", folder / "models" / f"{kind}.onnx", input_size=SIZE
        )
        for kind in ("plain", "wrapped")
    }


def faces() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.integers(0, 256, shape, dtype=np.uint8)
        for shape in ((SIZE, SIZE, 3), (97, 150, 3), (211, 80, 3))
    ]


def test_resnet50_has_torchvision_layout():
    state = ResNet50(1000).state_dict()
    assert sum(p.numel() for p in ResNet50(1000).parameters()) == 25_557_032
    assert sum(p.numel() for p in ResNet50(40).parameters()) == 23_589_992
    assert len(state) == 320  # 161 parameters + 159 batch-norm buffers, as torchvision's
    assert state["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert state["layer3.5.bn3.running_var"].shape == (1024,)
    assert state["fc.weight"].shape == (1000, 2048)


@pytest.mark.parametrize("kind", ["plain", "wrapped"])
def test_onnx_probabilities_match_torch(exported, trained, kind):
    model, _ = trained
    onnx_model = OnnxAttributeModel(exported[kind], providers=["CPUExecutionProvider"])
    assert onnx_model.spec.input_size == SIZE and onnx_model.spec.name == kind
    crops = faces()
    got = onnx_model.predict(crops)
    batch = torch.from_numpy(np.stack([preprocess(f, onnx_model.spec) for f in crops]))
    with torch.no_grad():
        expected = torch.sigmoid(model(batch)).double().numpy()
    assert got.shape == (3, 40)
    assert np.abs(got - expected).max() < 1e-4
    assert ((got > 0.05) & (got < 0.95)).mean() > 0.5  # a comparison that can fail
    # one face per call gives the same rows
    single = OnnxAttributeModel(exported[kind], batch_size=1, providers=["CPUExecutionProvider"])
    assert np.abs(single.predict(crops) - got).max() < 1e-5


def test_export_writes_sidecar_and_no_temporary_files(exported):
    path = exported["plain"]
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["labels"] == list(CELEBA_ATTRIBUTES)
    assert sidecar["interpolation"] == "bicubic" and sidecar["mean"] == [0.5, 0.5, 0.5]
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["plain.json", "plain.onnx", "wrapped.json", "wrapped.onnx"]


def test_wrong_key_is_a_clear_error(tmp_path, trained):
    _, state = trained
    broken = dict(state)
    broken["head.weight"] = broken.pop("fc.weight")
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing \(1\): fc.weight.*unexpected.*head"):
        convert_attribute_model(tmp_path / "broken.pt", tmp_path / "m.onnx", input_size=SIZE)
    assert list(tmp_path.iterdir()) == [tmp_path / "broken.pt"]


def test_wrong_head_size_is_a_clear_error(tmp_path):
    torch.save(ResNet50(1000).state_dict(), tmp_path / "imagenet.pt")
    with pytest.raises(CheckpointError, match=r"fc.weight: \(1000, 2048\) != \(40, 2048\)"):
        convert_attribute_model(tmp_path / "imagenet.pt", tmp_path / "m.onnx", input_size=SIZE)


def test_permuted_labels_reorder_predict_columns(tmp_path, trained, exported):
    _, state = trained
    order = np.random.default_rng(2).permutation(len(CELEBA_ATTRIBUTES))
    # a head trained in another label order: output j is CelebA attribute order[j]
    permuted = dict(state)
    permuted["fc.weight"] = state["fc.weight"][order].clone()
    permuted["fc.bias"] = state["fc.bias"][order].clone()
    torch.save(permuted, tmp_path / "permuted.pt")
    labels = [CELEBA_ATTRIBUTES[i] for i in order]
    path = convert_attribute_model(
        tmp_path / "permuted.pt", tmp_path / "permuted.onnx", input_size=SIZE, labels=labels
    )
    crops = faces()
    got = OnnxAttributeModel(path, providers=["CPUExecutionProvider"]).predict(crops)
    reference = OnnxAttributeModel(exported["plain"], providers=["CPUExecutionProvider"])
    expected = reference.predict(crops)
    assert np.abs(got - expected).max() < 1e-5
    # and without the sidecar's order the columns would be wrong
    assert np.abs(got[:, order] - expected).max() > 1e-2


def test_cli_exports_a_checkpoint_into_the_model_cache(tmp_path, trained, monkeypatch, capsys):
    from facecaption.cli import main
    from facecaption.models.cache import ModelCache

    _, state_dict = trained
    checkpoint = tmp_path / "celeba.pt"
    torch.save(state_dict, checkpoint)
    monkeypatch.setenv("FACECAPTION_MODELS_DIR", str(tmp_path / "models"))
    argv = ["models", "convert-attributes", str(checkpoint), "--input-size", "64"]
    assert main([*argv, "--name", "mine"]) == 0
    assert "onnxruntime matches torch" in capsys.readouterr().out
    exported_model = ModelCache(tmp_path / "models").attribute_model("mine")
    model = OnnxAttributeModel(exported_model)
    assert model.spec.input_size == 64 and model.spec.name == "mine"
