"""The model cache: pulling a pack over real HTTP, checksums, and the missing-model message."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest
from scrfd_model import build_scrfd_onnx
from support.samplesite import Route, SampleSite

from facecaption.cli import main
from facecaption.models.cache import ModelCache, ModelChecksumError
from facecaption.models.errors import ModelNotFoundError
from facecaption.models.identity import detector_identity
from facecaption.settings import DetectSettings, Settings


@pytest.fixture(scope="module")
def pack_zip(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("pack")
    detector = build_scrfd_onnx(folder / "det_10g.onnx", [])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        # real packs nest a folder level sometimes, and carry other models and files
        bundle.write(detector, "buffalo_l/det_10g.onnx")
        bundle.writestr("buffalo_l/w600k_r50.onnx", b"a recognition model")
        bundle.writestr("README.txt", b"not a model")
    return buffer.getvalue()


def test_pull_installs_a_pinned_pack_and_records_checksums(tmp_path, pack_zip):
    cache = ModelCache(tmp_path / "models")
    digest = hashlib.sha256(pack_zip).hexdigest()
    with SampleSite({"buffalo_l.zip": Route(pack_zip, "application/zip")}) as site:
        folder = cache.pull("buffalo_l", url=site.url("buffalo_l.zip"), sha256=digest)
    assert sorted(p.name for p in folder.iterdir()) == ["det_10g.onnx", "w600k_r50.onnx"]
    entry = cache.manifest()["buffalo_l"]
    assert entry["archive_sha256"] == digest and entry["pinned"] is True
    detector = cache.detector_file("buffalo_l")
    assert entry["files"]["det_10g.onnx"] == hashlib.sha256(detector.read_bytes()).hexdigest()


def test_pull_refuses_a_wrong_checksum_and_installs_nothing(tmp_path, pack_zip):
    cache = ModelCache(tmp_path / "models")
    with (
        SampleSite({"buffalo_l.zip": Route(pack_zip, "application/zip")}) as site,
        pytest.raises(ModelChecksumError, match="nothing was installed"),
    ):
        cache.pull("buffalo_l", url=site.url("buffalo_l.zip"), sha256="0" * 64)
    assert not cache.pack_dir("buffalo_l").exists()
    assert cache.manifest() == {}
    assert [p.name for p in cache.root.iterdir()] == []  # no temporary leftovers


def test_unpinned_pull_records_the_hash_and_later_pulls_must_match(tmp_path, pack_zip):
    cache = ModelCache(tmp_path / "models")
    routes = {"buffalo_l.zip": Route(pack_zip, "application/zip")}
    with SampleSite(routes) as site:
        cache.pull("buffalo_l", url=site.url("buffalo_l.zip"))
        assert cache.manifest()["buffalo_l"]["pinned"] is False
        cache.pull("buffalo_l", url=site.url("buffalo_l.zip"))  # same bytes: fine
        routes["buffalo_l.zip"] = Route(pack_zip + b"tampered", "application/zip")
        with pytest.raises(ModelChecksumError):
            cache.pull("buffalo_l", url=site.url("buffalo_l.zip"))
    assert cache.detector_file("buffalo_l").is_file()  # the good install is untouched


def test_cli_pull_prints_what_it_installed(tmp_path, pack_zip, monkeypatch, capsys):
    monkeypatch.setenv("FACECAPTION_MODELS_DIR", str(tmp_path / "models"))
    with SampleSite({"p.zip": Route(pack_zip, "application/zip")}) as site:
        assert main(["models", "pull", "detector", "--url", site.url("p.zip")]) == 0
    out = capsys.readouterr().out
    assert "det_10g.onnx" in out and "not pinned" in out
    assert main(["models", "list"]) == 0
    assert "buffalo_l" in capsys.readouterr().out


def test_missing_insightface_pack_names_the_pull_command_and_retinaface(tmp_path):
    settings = Settings(
        home=tmp_path, models_dir=tmp_path / "models", detect={"backend": "insightface"}
    )
    with pytest.raises(ModelNotFoundError) as error:
        detector_identity(settings)
    message = str(error.value)
    assert "facecaption models pull detector" in message
    assert "FACECAPTION_DETECT__BACKEND=retinaface" in message


def test_detector_identity_follows_the_model_file(tmp_path):
    model = build_scrfd_onnx(tmp_path / "scrfd.onnx", [])
    settings = Settings(home=tmp_path, detect=DetectSettings(model_path=str(model)))
    identity = detector_identity(settings)
    assert identity == f"scrfd.onnx@sha256:{hashlib.sha256(model.read_bytes()).hexdigest()}"


def test_pull_attribute_model_installs_the_onnx_with_its_sidecar(tmp_path, statistics_model):
    cache = ModelCache(tmp_path / "models")
    onnx_bytes = statistics_model.read_bytes()
    sidecar = statistics_model.with_suffix(".json").read_bytes()
    routes = {
        "m.onnx": Route(onnx_bytes, "application/octet-stream"),
        "m.json": Route(sidecar, "application/json"),
        "bad.json": Route(b'{"name": "x", "input_size": 64, "labels": ["Male"]}', "text/json"),
    }
    with SampleSite(routes) as site:
        with pytest.raises(ValueError, match="40 CelebA names"):
            cache.pull_attribute_model("celeba", site.url("m.onnx"), site.url("bad.json"))
        assert not cache.attribute_model("celeba").exists()
        digest = hashlib.sha256(onnx_bytes).hexdigest()
        path = cache.pull_attribute_model(
            "celeba", site.url("m.onnx"), site.url("m.json"), sha256=digest
        )
    assert path == cache.attribute_model("celeba") and path.read_bytes() == onnx_bytes
    assert path.with_suffix(".json").read_bytes() == sidecar
    assert cache.manifest()["attributes/celeba"]["pinned"] is True
