"""`facecaption models train-attributes`: a tiny backbone trained on a tiny synthetic CelebA in
the Hub schema, on CPU. The loss falls, a killed run resumes where its checkpoint left it, the
calibration moves the probabilities, and the installed model is what the attribute stage loads
by default, giving the torch model's own probabilities in both formats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.synthetic_celeba import build_tiny_resnet, write_synthetic_celeba

from facecaption.attribute.backends import load_attribute_model
from facecaption.attribute.backends.onnx import AttributeModelSpec, preprocess
from facecaption.attribute.backends.transformers_classifier import TransformersAttributeModel
from facecaption.attribute.celeba import DatasetError, aligned_crop, decode_rgb, load_splits
from facecaption.attribute.evaluation import expected_calibration_error, fit_calibration, sigmoid
from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.attribute.training import CHECKPOINT, TrainingConfig, load_backbone, train
from facecaption.cli import main
from facecaption.core.errors import PermanentError
from facecaption.models.cache import ModelCache
from facecaption.models.locate import attribute_model
from facecaption.settings import Settings

SIZES = {"train": 48, "valid": 40, "test": 40}
INPUT_SIZE = 32
TRAIN_OPTIONS = dict(epochs=2, batch_size=8, lr=1e-2, input_size=INPUT_SIZE, workers=0)
KILL_AT_STEP, CHECKPOINT_EVERY = 5, 2  # 6 steps per epoch: killed mid-epoch, after step 4's save


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("celeba")
    return {
        "dataset": write_synthetic_celeba(root / "celeba", SIZES),
        "backbone": build_tiny_resnet(root / "tiny-resnet"),
    }


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    """The command as a user runs it, with the default model name."""
    home = tmp_path_factory.mktemp("home")
    argv = [
        "models", "train-attributes", "--dataset", str(data["dataset"]),
        "--backbone", str(data["backbone"]), "--epochs", "3", "--batch-size", "8",
        "--lr", "0.01", "--input-size", str(INPUT_SIZE), "--workers", "0",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACECAPTION_HOME", str(home))
        assert main(argv) == 0
    settings = Settings(home=home)
    name = settings.attribute.model
    return {
        "settings": settings,
        "name": name,
        "entry": ModelCache(settings.model_cache_dir).manifest()[f"attributes/{name}"],
        "checkpoint": torch.load(
            home / "training" / name / CHECKPOINT, map_location="cpu", weights_only=True
        ),
        "argv": argv,
        "home": home,
    }


def pipeline_crops(data) -> list[np.ndarray]:
    """Aligned crops of the test split, as the pipeline would cut them."""
    test = load_splits(str(data["dataset"]))["test"]
    crops = [aligned_crop(decode_rgb(test.image_bytes(i)), test.landmarks[i]) for i in range(6)]
    assert all(crop.shape[0] == crop.shape[1] and crop.shape[2] == 3 for crop in crops)
    return crops


def test_training_loss_falls(trained):
    losses = [loss for _, loss in trained["checkpoint"]["history"]]
    assert len(losses) == 3 * 6
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
    assert trained["entry"]["training"]["final_loss"] < losses[0]


def test_the_trained_model_is_the_default_and_records_where_it_came_from(trained):
    located = attribute_model(trained["settings"])
    assert located.backend == "onnx"
    assert located.path == trained["settings"].model_cache_dir / "attributes" / (
        f"{trained['name']}.onnx"
    )
    entry = trained["entry"]
    assert entry["source"] == "trained"
    assert entry["backbone"]["identity"].startswith("tiny-resnet@sha256:")
    assert entry["dataset"]["rows"] == SIZES
    assert set(entry["calibration"]["temperature"]) == set(CELEBA_ATTRIBUTES)
    assert 0.5 < entry["metrics"]["mean"]["accuracy"] <= 1
    assert entry["command"].startswith("facecaption models train-attributes --dataset")
    card = (
        trained["settings"].model_cache_dir / "attributes" / f"{trained['name']}.md"
    ).read_text()
    assert "| **mean** |" in card and "MOON" in card and card.count("\n| ") > 40
    for relative, digest in entry["files"].items():
        assert len(digest) == 64, relative
    sidecar = json.loads(located.path.with_suffix(".json").read_text())
    assert sidecar["input_size"] == INPUT_SIZE and sidecar["calibration"]


def test_exports_match_the_calibrated_torch_model(trained, data):
    crops = pipeline_crops(data)
    folder = trained["settings"].model_cache_dir / "attributes" / trained["name"]
    spec = AttributeModelSpec.load(folder.with_suffix(".json"))
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True).eval()
    batch = torch.from_numpy(np.stack([preprocess(crop, spec) for crop in crops]))
    with torch.no_grad():
        expected = sigmoid(model(pixel_values=batch).logits.double().numpy())
    stage_model = load_attribute_model(trained["settings"])  # what the attribute stage runs
    assert np.abs(stage_model.predict(crops) - expected).max() < 1e-4
    transformers_model = TransformersAttributeModel(folder, device="cpu")
    assert np.abs(transformers_model.predict(crops) - expected).max() < 1e-4
    assert expected.std() > 0.01  # not a constant: the comparison can fail


def test_calibration_changes_the_probabilities(trained, data):
    crops = pipeline_crops(data)
    folder = trained["settings"].model_cache_dir / "attributes" / trained["name"]
    spec = AttributeModelSpec.load(folder.with_suffix(".json"))
    uncalibrated = load_backbone(str(data["backbone"]), None)
    uncalibrated.load_state_dict(trained["checkpoint"]["model"])
    batch = torch.from_numpy(np.stack([preprocess(crop, spec) for crop in crops]))
    with torch.no_grad():
        before = sigmoid(uncalibrated.eval()(pixel_values=batch).logits.double().numpy())
    after = load_attribute_model(trained["settings"]).predict(crops)
    temperatures = np.array(list(trained["entry"]["calibration"]["temperature"].values()))
    assert np.abs(temperatures - 1).max() > 0.05
    assert np.abs(after - before).max() > 0.01
    # a temperature keeps each probability on its side of 0.5
    assert ((after > 0.5) == (before > 0.5)).all()


def test_temperature_fitting_recovers_an_overconfident_model():
    rng = np.random.default_rng(0)
    truth_logits = rng.normal(0, 2, (4000, 40))
    labels = (rng.random(truth_logits.shape) < sigmoid(truth_logits)).astype(float)
    overconfident = 3 * truth_logits
    calibration = fit_calibration(overconfident, labels)
    assert np.allclose(1 / calibration.scale, 3, rtol=0.15)
    before = expected_calibration_error(sigmoid(overconfident), labels).mean()
    after = expected_calibration_error(sigmoid(calibration.apply(overconfident)), labels).mean()
    assert after < before / 2
    shifted = fit_calibration(truth_logits + 1.5, labels, shift=True)
    assert np.allclose(shifted.shift / shifted.scale, -1.5, atol=0.3)


CHILD = """
import json, os, signal, sys
from pathlib import Path
from facecaption.attribute.training import TrainingConfig, train
from facecaption.settings import Settings
options = json.loads(sys.argv[1])
options["work_dir"] = Path(options["work_dir"])
def kill(step):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
train(TrainingConfig(**options), Settings(), on_step=kill, log=lambda line: None)
"""


def test_a_killed_run_resumes_from_its_checkpoint(data, tmp_path):
    options = dict(
        dataset=str(data["dataset"]), backbone=str(data["backbone"]), name="resume",
        checkpoint_every=CHECKPOINT_EVERY, **TRAIN_OPTIONS,
    )  # fmt: skip
    killed = subprocess.run(
        [
            sys.executable, "-c", CHILD.replace("{kill_at}", str(KILL_AT_STEP)),
            json.dumps({**options, "work_dir": str(tmp_path / "killed")}),
        ],
        env={**os.environ, "FACECAPTION_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = torch.load(tmp_path / "killed" / CHECKPOINT, map_location="cpu", weights_only=True)
    assert saved["step"] == KILL_AT_STEP - 1  # the last save before the kill

    settings = Settings(home=tmp_path / "home")
    lines: list[str] = []
    resumed = train(
        TrainingConfig(**options, work_dir=tmp_path / "killed"), settings, log=lines.append
    )
    assert resumed.resumed_from == KILL_AT_STEP - 1 and resumed.steps == 12
    assert [step for step, _ in resumed.history] == list(range(1, 13))
    assert any("resuming from step 4" in line for line in lines)

    straight = train(TrainingConfig(**options, work_dir=tmp_path / "straight"), settings)
    assert straight.resumed_from == 0
    np.testing.assert_allclose(
        [loss for _, loss in resumed.history], [loss for _, loss in straight.history], atol=1e-5
    )
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-5, rtol=1e-4)

    other = TrainingConfig(**{**options, "lr": 0.5}, work_dir=tmp_path / "killed")
    with pytest.raises(PermanentError, match="other settings \\(lr\\).*--restart"):
        train(other, settings)


def test_a_dataset_without_the_40_attribute_columns_is_refused(data, tmp_path, capsys):
    dataset = write_synthetic_celeba(tmp_path / "bad", {"train": 4, "valid": 4, "test": 4},
                                     drop=("Young", "Wearing_Necktie"))  # fmt: skip
    with pytest.raises(DatasetError, match="missing \\['Wearing_Necktie', 'Young'\\]"):
        load_splits(str(dataset))
    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACECAPTION_HOME", str(home))
        code = main(["models", "train-attributes", "--dataset", str(dataset),
                     "--backbone", str(data["backbone"])])  # fmt: skip
    assert code == 1
    assert "not CelebA-40 in the Hugging Face schema" in capsys.readouterr().err
    assert not (home / "models" / "attributes").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no parquet files for the train split"):
        load_splits(str(tmp_path / "empty"))


def test_a_name_that_holds_a_model_needs_replace(trained, capsys):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACECAPTION_HOME", str(trained["home"]))
        assert main(trained["argv"]) == 1
    assert "pass --replace" in capsys.readouterr().err


def test_the_detector_aligns_images_without_landmark_columns(tmp_path):
    """--align detector: the packaged RetinaFace's five points, kept in the work folder; an
    image without a face (or that does not decode) falls back to CelebA's fixed points."""
    import pyarrow as pa
    from support.sampledata import packaged_photos

    from facecaption.attribute.celeba import CelebaSplit, detect_landmarks
    from facecaption.detect.backends import load_detector

    photo = packaged_photos().get("tom_hanks.png")
    if photo is None:
        pytest.skip("insightface's sample photo is not installed")
    cells = [Path(photo).read_bytes(), b"not an image"]
    table = pa.table({"image": pa.array([{"bytes": c, "path": "x"} for c in cells])})
    split = CelebaSplit("test", table, np.zeros((2, 40), np.float32), None)
    cache = tmp_path / "landmarks-test.npy"
    points = detect_landmarks(split, load_detector(Settings(home=tmp_path)), cache)
    assert np.isfinite(points[0]).all() and np.isnan(points[1]).all()
    eyes = points[0][:2]
    assert eyes[0, 0] < eyes[1, 0] and abs(eyes[0, 1] - eyes[1, 1]) < 10  # left, then right
    crop = aligned_crop(decode_rgb(cells[0]), points[0])
    assert crop.shape[0] == crop.shape[1] > 50
    assert np.array_equal(detect_landmarks(split, None, cache), points, equal_nan=True)


def test_a_hub_backbone_is_pinned_to_the_commit_its_revision_names(data, tmp_path):
    """--backbone ORG/NAME --revision TAG through the real client (HF_ENDPOINT: a loopback
    Hub): the commit the tag resolves to is what is loaded and what the manifest records."""
    from support.hubserver import HubServer

    home = tmp_path / "home"
    with HubServer(tmp_path / "hub") as hub:
        commit = hub.publish_folder("facecaption-test/tiny-resnet", data["backbone"], refs=("v1",))
        finished = subprocess.run(
            [
                sys.executable, "-m", "facecaption.cli", "models", "train-attributes",
                "--dataset", str(data["dataset"]), "--backbone", "facecaption-test/tiny-resnet",
                "--revision", "v1", "--epochs", "1", "--batch-size", "16", "--limit", "16",
                "--input-size", str(INPUT_SIZE), "--workers", "0", "--name", "from-hub",
            ],
            env={
                **os.environ, "FACECAPTION_HOME": str(home), "HF_ENDPOINT": hub.endpoint,
                "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            },
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "FACECAPTION_ATTRIBUTE__MODEL=from-hub" in finished.stdout
    entry = ModelCache(home / "models").manifest()["attributes/from-hub"]
    assert entry["backbone"] == {
        "backbone": "facecaption-test/tiny-resnet", "revision": "v1", "commit": commit
    }  # fmt: skip
    assert entry["dataset"]["rows"] == {"train": 16, "valid": 16, "test": 16}
