"""Pulling models from the Hugging Face Hub with the real `huggingface_hub` client against a
loopback Hub: what a pull records, the errors users meet, changed bytes refused, and the pulled
models (a tiny Qwen2 and a tiny ViT multi-label classifier) run through the attribute and
caption stages."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support.hubserver import HubServer
from support.sampledata import sample_rows
from support.samplesite import SampleSite
from support.tiny_classifier import CONFIDENT, build_tiny_vit
from support.tiny_llm import build_tiny_qwen2
from test_fetch import routes_source
from transformers import ViTForImageClassification

from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.core.pipeline import Pipeline
from facecaption.core.writers import read_webdataset
from facecaption.models.cache import ModelCache, ModelChecksumError
from facecaption.models.hub import HubPullError, ModelCacheConflict, pull_hub_model
from facecaption.models.identity import transformers_attribute_identity, transformers_llm_identity
from facecaption.models.locate import attribute_model, llm_folder
from facecaption.settings import Settings

LLM_REPO = "facecaption-test/tiny-qwen2"
VIT_REPO = "facecaption-test/tiny-vit-celeba"


def folder_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("built")
    return {
        "llm": build_tiny_qwen2(root / "tiny-qwen2"),
        "vit": build_tiny_vit(root / "tiny-vit-celeba"),
        "softmax": build_tiny_vit(root / "softmax-vit"),
    }


@pytest.fixture
def hub(tmp_path, built):
    with HubServer(tmp_path / "hub") as server:
        llm = folder_files(built["llm"])
        # a second weights format, as many repos carry: never downloaded
        llm_repo = {**llm, "pytorch_model.bin": b"torch pickle"}
        server.publish(LLM_REPO, llm_repo, refs=("main", "v1"))
        server.publish_folder(VIT_REPO, built["vit"])
        softmax = folder_files(built["softmax"])
        config = json.loads(softmax["config.json"])
        config["problem_type"] = "single_label_classification"
        softmax["config.json"] = json.dumps(config).encode()
        server.publish("facecaption-test/softmax-vit", softmax)
        server.publish("facecaption-test/gated", llm, gated=True)
        bin_only = {"config.json": b"{}", "pytorch_model.bin": b"x"}
        server.publish("facecaption-test/bin-only", bin_only)
        yield server


def pull(cache: ModelCache, hub: HubServer, kind: str, repo: str, **options):
    return pull_hub_model(cache, kind, repo, endpoint=hub.endpoint, **options)


def test_pull_llm_installs_a_commit_and_records_every_files_sha256(tmp_path, hub, built):
    cache = ModelCache(tmp_path / "models")
    pulled = pull(cache, hub, "llm", LLM_REPO, revision="v1")
    assert (
        pulled.folder == cache.llm_dir("tiny-qwen2") and pulled.commit == hub.refs(LLM_REPO)["v1"]
    )
    expected = folder_files(built["llm"])
    assert folder_files(pulled.folder) == expected  # no .bin, no client bookkeeping
    entry = cache.manifest()["llm/tiny-qwen2"]
    assert entry == {
        "source": "huggingface",
        "repo": LLM_REPO,
        "revision": "v1",
        "commit": hub.refs(LLM_REPO)["v1"],
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in expected.items()},
    }
    assert not any("pytorch_model.bin" in path for _, path in hub.requests)
    assert [p.name for p in cache.root.iterdir() if p.name.startswith(".")] == []
    settings = Settings(home=tmp_path, models_dir=cache.root, caption={"model": "tiny-qwen2"})
    assert llm_folder(settings) == pulled.folder


@pytest.mark.parametrize(
    ("kind", "repo", "revision", "message"),
    [
        ("llm", "facecaption-test/nope", None, "no model repo 'facecaption-test/nope'"),
        ("llm", LLM_REPO, "v9", "has no revision 'v9'"),
        ("llm", "facecaption-test/gated", None, "is gated: accept its terms"),
        ("llm", "facecaption-test/bin-only", None, "safetensors only"),
        ("attributes", "facecaption-test/softmax-vit", None, "multi-label head"),
        ("attributes", LLM_REPO, None, "problem_type"),
    ],
)
def test_pull_errors_say_what_is_wrong_and_install_nothing(
    tmp_path, hub, kind, repo, revision, message
):
    cache = ModelCache(tmp_path / "models")
    with pytest.raises((HubPullError, ValueError), match=message) as raised:
        pull(cache, hub, kind, repo, revision=revision)
    assert raised.type.__name__ in ("HubPullError", "AttributeModelError")
    assert cache.manifest() == {}
    leftovers = list(cache.root.rglob("*")) if cache.root.exists() else []
    assert leftovers == []


def test_changed_bytes_are_refused_at_pull_and_at_load(tmp_path, hub, built):
    cache = ModelCache(tmp_path / "models")
    settings = Settings(home=tmp_path, models_dir=cache.root, caption={"model": "tiny-qwen2"})
    first = pull(cache, hub, "llm", LLM_REPO, revision="v1")

    # main moves on: installing it under the same name must be asked for
    files = folder_files(built["llm"])
    config = json.loads(files["config.json"])
    files["config.json"] = json.dumps({**config, "rope_theta": 5000.0}).encode()
    newer = hub.publish(LLM_REPO, files)
    with pytest.raises(ModelCacheConflict, match="--replace"):
        pull(cache, hub, "llm", LLM_REPO)
    assert cache.manifest()["llm/tiny-qwen2"]["commit"] == first.commit
    replaced = pull(cache, hub, "llm", LLM_REPO, replace=True)
    assert replaced.commit == newer
    assert json.loads((replaced.folder / "config.json").read_text())["rope_theta"] == 5000.0

    # the same commit served with other bytes than recorded the first time
    entry = cache.manifest()["llm/tiny-qwen2"]
    cache.record("llm/tiny-qwen2", {**entry, "files": {**entry["files"], "config.json": "0" * 64}})
    with pytest.raises(ModelChecksumError, match="other bytes"):
        pull(cache, hub, "llm", LLM_REPO)
    cache.record("llm/tiny-qwen2", entry)

    # bytes that do not match the Hub's own listing never get installed
    hub.corrupt.add(f"{LLM_REPO}/model.safetensors")
    with pytest.raises(ModelChecksumError, match="model.safetensors arrived with sha256"):
        pull(cache, hub, "llm", LLM_REPO, name="second-copy")
    assert not cache.llm_dir("second-copy").exists()

    # an installed file edited afterwards: loading refuses it with the command that fixes it
    assert llm_folder(settings) == replaced.folder
    with open(replaced.folder / "tokenizer.json", "a") as tokenizer:
        tokenizer.write(" ")
    with pytest.raises(ModelChecksumError) as raised:
        llm_folder(settings)
    assert f"facecaption models pull llm {LLM_REPO} --revision {newer} --replace" in str(
        raised.value
    )


def test_a_folder_put_there_by_hand_is_not_overwritten_without_replace(tmp_path, hub):
    cache = ModelCache(tmp_path / "models")
    cache.llm_dir("tiny-qwen2").mkdir(parents=True)
    (cache.llm_dir("tiny-qwen2") / "config.json").write_text("{}")
    with pytest.raises(ModelCacheConflict, match="not pulled by facecaption"):
        pull(cache, hub, "llm", LLM_REPO)
    assert pull(cache, hub, "llm", LLM_REPO, replace=True).commit == hub.refs(LLM_REPO)["v1"]


def reference_probabilities(folder: Path, crop: np.ndarray) -> np.ndarray:
    """The ViT's CelebA-ordered probabilities for one crop, preprocessed by hand (bicubic
    resize, [0, 1], mean = std = 0.5) and run by torch directly."""
    model = ViTForImageClassification.from_pretrained(folder).eval()
    size = model.config.image_size
    resized = np.asarray(
        Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC), np.float32
    )
    pixels = torch.from_numpy(((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        probabilities = torch.sigmoid(model(pixel_values=pixels).logits.double())[0].numpy()
    order = [model.config.label2id[name] for name in CELEBA_ATTRIBUTES]
    return probabilities[order]


def test_pulled_models_run_through_the_attribute_and_caption_stages(tmp_path, hub, built, settings):
    cache = ModelCache(tmp_path / "models")
    pull(cache, hub, "llm", LLM_REPO, revision="v1")
    pull(cache, hub, "attributes", VIT_REPO)
    settings = settings.model_copy(
        update={
            "models_dir": cache.root,
            "detect": settings.detect.model_copy(update={"backend": "retinaface"}),
            "attribute": settings.attribute.model_copy(
                update={"model": "tiny-vit-celeba", "model_path": None}
            ),
            "caption": settings.caption.model_copy(
                update={"backend": "transformers", "model": "tiny-qwen2", "max_new_tokens": 8}
            ),
        }
    )
    assert attribute_model(settings).backend == "transformers"
    [large] = [row for row in sample_rows() if row.path == "generated/rotated_progressive.jpg"]
    with SampleSite({"large.jpg": large.route}) as site, Pipeline.open(settings) as pipeline:
        [shard_id] = pipeline.select_shards([str(routes_source(tmp_path, site, ["large.jpg"]))])
        for stage in ("fetch", "detect", "attribute", "caption"):
            assert pipeline.run(stage, shard_id).status == "done", stage
        read = {
            name: pq.read_table(pipeline.store.shard_path(shard_id, name)).to_pylist()
            for name in ("attributes.parquet", "captions.parquet")
        }
        with open(pipeline.store.shard_path(shard_id, "faces.tar"), "rb") as handle:
            crops = read_webdataset(handle)
    attributes, captions = read["attributes.parquet"], read["captions.parquet"]
    assert len(attributes) >= 1
    vit_id = transformers_attribute_identity(cache.attribute_folder("tiny-vit-celeba"))
    for row in attributes:
        assert row["model_id"] == vit_id and row["kept"]
        assert sorted(row["valid_labels"]) == sorted(CONFIDENT)
        meta_key = row["face_id"].split("/", 1)[1]
        with Image.open(io.BytesIO(crops[meta_key]["png"])) as crop:
            expected = reference_probabilities(built["vit"], np.asarray(crop.convert("RGB")))
        got = np.array([row[f"p_{name}"] for name in CELEBA_ATTRIBUTES])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    llm_id = transformers_llm_identity(cache.llm_dir("tiny-qwen2"))
    assert [c["face_id"] for c in captions] == [a["face_id"] for a in attributes]
    for caption in captions:
        assert caption["model_id"] == llm_id
        assert caption["fidelity"] in ("pass", "retry_pass", "fallback")  # the LLM was asked


def test_cli_pulls_through_hf_endpoint(tmp_path, hub):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FACECAPTION_")},
        "HF_ENDPOINT": hub.endpoint,
        "FACECAPTION_HOME": str(tmp_path / "home"),
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "facecaption.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = cli("models", "pull", "llm", LLM_REPO, "--revision", "v1")
    assert done.returncode == 0, done.stderr
    assert f"{LLM_REPO}@{hub.refs(LLM_REPO)['v1']}" in done.stdout
    assert "model.safetensors" in done.stdout
    done = cli("models", "pull", "attributes", "--hf", VIT_REPO)
    assert done.returncode == 0, done.stderr
    assert "FACECAPTION_ATTRIBUTE__MODEL=tiny-vit-celeba" in done.stdout  # not the default name
    listed = cli("models", "list")
    assert f"llm/tiny-qwen2: {LLM_REPO}@{hub.refs(LLM_REPO)['v1']}" in listed.stdout
    refused = cli("models", "pull", "attributes", "--hf", "facecaption-test/gated")
    assert refused.returncode == 1 and "is gated" in refused.stderr
