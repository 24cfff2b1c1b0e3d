"""A run that fails fast: `facecaption run` refuses before planning or downloading anything
when a selected stage's model is missing, with the command that fixes it; `facecaption doctor`
says which model every stage would use, its identity, where it came from and what is
missing."""

from __future__ import annotations

import json

import pytest
from support.sampledata import write_source

from facecaption.cli import main
from facecaption.models.errors import ModelNotFoundError
from facecaption.models.preflight import check_stage_models, require_stage_models
from facecaption.settings import Settings

RETINAFACE_ID = (
    "retinaface.onnx@sha256:b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"
)


@pytest.fixture
def bare_env(tmp_path, settings_env, monkeypatch):
    """The test settings with the defaults' models: nothing in the model cache."""
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    for name in (
        "FACECAPTION_DETECT__BACKEND",
        "FACECAPTION_ATTRIBUTE__MODEL_PATH",
        "FACECAPTION_CAPTION__BACKEND",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FACECAPTION_MODELS_DIR", str(tmp_path / "empty-cache"))


def test_defaults_without_a_model_cache(tmp_path):
    settings = Settings(home=tmp_path, models_dir=tmp_path / "models")
    detect, attribute, caption = check_stage_models(settings)
    assert (detect.backend, detect.identity, detect.problem) == ("retinaface", RETINAFACE_ID, None)
    assert "packaged with facecaption" in detect.origin
    assert not attribute.ready and "facecaption models pull attributes --hf" in attribute.problem
    assert not caption.ready
    assert "facecaption models pull llm Qwen/Qwen2.5-1.5B-Instruct" in caption.problem
    with pytest.raises(ModelNotFoundError) as raised:
        require_stage_models(settings, ["fetch", "detect", "caption"])
    message = str(raised.value)
    assert "1 stage(s)" in message and "caption:" in message and "attribute:" not in message
    require_stage_models(settings, ["fetch", "detect", "export"])  # their models are there


def test_openai_without_a_url_and_a_damaged_sidecar_are_problems(tmp_path, statistics_model):
    sidecar = tmp_path / "m.json"
    sidecar.write_text('{"name": "m", "input_size": 64, "labels": ["Male"]}')
    (tmp_path / "m.onnx").write_bytes(statistics_model.read_bytes())
    settings = Settings(
        home=tmp_path,
        attribute={"model_path": str(tmp_path / "m.onnx")},
        caption={"backend": "openai"},
    )
    _, attribute, caption = check_stage_models(settings)
    assert "40 CelebA names" in attribute.problem
    assert "needs caption.base_url" in caption.problem


def test_run_refuses_before_planning_or_fetching(tmp_path, bare_env, sample, sample_site, capsys):
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    assert main(["run", "--source", str(source)]) == 1
    err = capsys.readouterr().err
    assert "not starting: 2 stage(s) cannot load their model" in err
    assert "facecaption models pull attributes --hf REPO --name celeba40-resnet50" in err
    assert "facecaption models pull llm Qwen/Qwen2.5-1.5B-Instruct" in err
    assert sample_site.hits == {}  # nothing was downloaded
    assert main(["status"]) == 0
    assert "no shards registered" in capsys.readouterr().out  # nor planned
    # the stages whose models are there still run on their own
    assert main(["run", "--source", str(source), "--stage", "fetch", "--stage", "detect"]) == 0
    assert sample_site.hits


def test_doctor_prints_every_stage_and_exits_nonzero_when_one_is_missing(bare_env, capsys):
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "detect: retinaface\n" in out and RETINAFACE_ID in out
    assert "attribute: auto  NOT READY" in out and "caption: transformers  NOT READY" in out
    assert "missing:  " in out and "facecaption models pull llm" in out


def test_doctor_json_when_every_model_is_there(settings_env, monkeypatch, capsys):
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    assert main(["doctor", "--json"]) == 0
    detect, attribute, caption = json.loads(capsys.readouterr().out)
    assert detect["backend"] == "cascade" and detect["identity"].startswith("opencv-")
    assert attribute["backend"] == "onnx" and attribute["origin"] == "attribute.model_path"
    assert attribute["identity"].startswith("statistics.onnx@sha256:")
    assert caption == {
        "stage": "caption",
        "backend": "template",
        "model": None,
        "identity": "template",
        "origin": "the grammar alone (no LLM)",
        "problem": None,
    }
