"""Which model files the settings name: the detector's ONNX, the attribute classifier with
its sidecar, the LLM's folder. Each either returns a path that exists or raises
ModelNotFoundError naming the command that fixes it; nothing is loaded or downloaded here.
"""

from __future__ import annotations

from pathlib import Path

from facecaption.models.cache import ModelCache
from facecaption.models.errors import ModelNotFoundError
from facecaption.settings import Settings


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


def attribute_model_file(settings: Settings) -> Path:
    """The configured model's .onnx (its sidecar beside it), or a ModelNotFoundError."""
    if settings.attribute.model_path:
        path = Path(settings.attribute.model_path).expanduser()
    else:
        path = ModelCache(settings.model_cache_dir).attribute_model(settings.attribute.model)
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise ModelNotFoundError(
            f"no attribute model at {path} (+ {path.with_suffix('.json').name}): export one"
            " with `facecaption models convert-attributes CHECKPOINT` or pull one with"
            " `facecaption models pull attributes --url ...`, or set"
            " FACECAPTION_ATTRIBUTE__MODEL_PATH to an .onnx with its sidecar"
        )
    return path


def configured_llm_folder(settings: Settings) -> Path:
    """Where the settings say the transformers model is: `model_path`, else the cache."""
    caption = settings.caption
    if caption.model_path:
        return Path(caption.model_path).expanduser()
    return settings.model_cache_dir / "llm" / caption.model


def llm_folder(settings: Settings) -> Path:
    """The transformers model folder the settings name, or a ModelNotFoundError saying how
    to get one."""
    caption = settings.caption
    folder = configured_llm_folder(settings)
    if caption.model_path:
        where = f"FACECAPTION_CAPTION__MODEL_PATH names {folder}"
    else:
        where = f"caption model {caption.model!r} is not in the model cache: {folder}"
    if not (folder / "config.json").is_file():
        qwen = folder.name.lower().startswith("qwen")
        hub_name = folder.name if qwen else "Qwen2.5-1.5B-Instruct"
        raise ModelNotFoundError(
            f"{where}, which holds no Hugging Face model (no config.json). On a machine with"
            f" internet: `huggingface-cli download Qwen/{hub_name} --local-dir {folder}`"
            f" (any chat model in HF format works), then copy the folder here; or set"
            f" caption.backend = 'openai' with a base_url, or 'template' for no LLM."
        )
    return folder
