"""Which model files the settings name: the detector's ONNX, the attribute classifier with
its sidecar, the LLM's folder. Each either returns a path that exists or raises
ModelNotFoundError naming the command that fixes it; nothing is loaded or downloaded here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from facecaption.models.cache import ModelCache
from facecaption.models.errors import ModelNotFoundError
from facecaption.settings import Settings

DEFAULT_LLM_REPO = "Qwen/Qwen2.5-1.5B-Instruct"  # the default `caption.model`'s Hub repo


def detector_backend(settings: Settings) -> str:
    """The detector backend that runs: `detect.backend`, with `auto` resolved to insightface
    when its model (`model_path`, or the pack in the cache) is there, else the packaged
    retinaface."""
    backend = settings.detect.backend
    if backend != "auto":
        return backend
    try:
        detector_model_file(settings)
    except ModelNotFoundError:
        return "retinaface"
    return "insightface"


def detector_model_file(settings: Settings) -> Path:
    """The insightface backend's ONNX: `model_path`, else the pack's detector in the cache."""
    detect = settings.detect
    if detect.model_path:
        path = Path(detect.model_path).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"FACECAPTION_DETECT__MODEL_PATH names {path}: no such file")
        return path
    return ModelCache(settings.model_cache_dir).detector_file(detect.model_pack)


@dataclass(frozen=True)
class AttributeModelLocation:
    backend: str  # "onnx" (path: the .onnx, its sidecar .json beside it) or "transformers"
    path: Path  # the .onnx file or the transformers folder


def attribute_model(settings: Settings) -> AttributeModelLocation:
    """The attribute model the settings name and its backend, or a ModelNotFoundError naming
    the commands that get one. `auto` takes an .onnx (with its sidecar) or a folder holding a
    config.json, whichever is there (the .onnx first)."""
    attribute = settings.attribute
    if attribute.model_path:
        path = Path(attribute.model_path).expanduser()
        backend = attribute.backend
        if backend == "auto":
            backend = "transformers" if path.is_dir() else "onnx"
        candidates = {backend: path}
        where = f"FACECAPTION_ATTRIBUTE__MODEL_PATH names {path}"
    else:
        cache = ModelCache(settings.model_cache_dir)
        candidates = {
            "onnx": cache.attribute_model(attribute.model),
            "transformers": cache.attribute_folder(attribute.model),
        }
        if attribute.backend != "auto":
            candidates = {attribute.backend: candidates[attribute.backend]}
        where = f"no attribute model {attribute.model!r} in the model cache ({cache.root})"
    for backend, path in candidates.items():
        if backend == "onnx" and path.is_file() and path.with_suffix(".json").is_file():
            return AttributeModelLocation("onnx", path)
        if backend == "transformers" and (path / "config.json").is_file():
            if not attribute.model_path:
                ModelCache(settings.model_cache_dir).verify(f"attributes/{path.name}", path)
            return AttributeModelLocation("transformers", path)
    name = attribute.model
    raise ModelNotFoundError(
        f"{where}, which holds no attribute model ({_expected(candidates)}). Pull a transformers"
        f" CelebA-40 classifier with `facecaption models pull attributes --hf REPO --name"
        f" {name}`, or an ONNX one with `facecaption models pull attributes --url URL.onnx"
        f" --sidecar-url URL.json --name {name}`, or convert a ResNet-50 checkpoint with"
        f" `facecaption models convert-attributes CHECKPOINT --name {name}`; or set"
        " FACECAPTION_ATTRIBUTE__MODEL_PATH to an .onnx (sidecar beside it) or a"
        " transformers folder"
    )


def _expected(candidates: dict[str, Path]) -> str:
    return " or ".join(
        f"{path} with {path.with_suffix('.json').name}"
        if backend == "onnx"
        else f"a folder {path} with config.json"
        for backend, path in candidates.items()
    )


def configured_llm_folder(settings: Settings) -> Path:
    """Where the settings say the transformers model is: `model_path`, else the cache."""
    caption = settings.caption
    if caption.model_path:
        return Path(caption.model_path).expanduser()
    return settings.model_cache_dir / "llm" / caption.model


def llm_folder(settings: Settings) -> Path:
    """The transformers model folder the settings name (its files checked against what their
    pull recorded), or a ModelNotFoundError naming the command that gets one."""
    caption = settings.caption
    folder = configured_llm_folder(settings)
    if caption.model_path:
        where = f"FACECAPTION_CAPTION__MODEL_PATH names {folder}"
    else:
        where = f"caption model {caption.model!r} is not in the model cache: {folder}"
    if not (folder / "config.json").is_file():
        qwen = folder.name.lower().startswith("qwen")
        repo = f"Qwen/{folder.name if qwen else DEFAULT_LLM_REPO.split('/')[1]}"
        name = "" if repo.endswith(f"/{folder.name}") else f" --name {folder.name}"
        if caption.model_path:
            fix = f"`facecaption models pull llm {repo}` and unset model_path"
        else:
            fix = f"`facecaption models pull llm {repo}{name}` (any chat model in HF format)"
        raise ModelNotFoundError(
            f"{where}, which holds no Hugging Face model (no config.json). On a machine with"
            f" internet: {fix}; or set caption.backend = 'openai' with a base_url, or"
            " 'template' for no LLM."
        )
    if not caption.model_path:
        ModelCache(settings.model_cache_dir).verify(f"llm/{folder.name}", folder)
    return folder


def transformers_folder_problem(folder: Path, kind: str) -> str | None:
    """What keeps a transformers folder from loading as a `kind` ("llm" or "attributes")
    model, or None: a readable config.json, safetensors weights, and a tokenizer (LLMs) or an
    image processor (classifiers). The classifier's labels are checked by its backend."""
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        return f"{folder}/config.json is not readable JSON ({error})"
    if not any(folder.glob("*.safetensors")):
        return f"{folder} has no .safetensors weights: facecaption reads safetensors only"
    if kind == "llm":
        if not any(
            (folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
        ):
            return f"{folder} has no tokenizer (tokenizer.json): not a chat model"
    elif not (folder / "preprocessor_config.json").is_file():
        return f"{folder} has no preprocessor_config.json: its image preprocessing is unknown"
    return None
