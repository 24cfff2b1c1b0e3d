"""Model identities: one function per backend that names the model exactly, used both by the
stage fingerprints (so a changed model makes outputs stale) and by the backends for the
`*_model_id` / `detector_id` they write into rows (so outputs say what made them).

A file's identity is its name and the sha256 of its bytes, hashed once per process while the
file's size and mtime stay the same (thousands of shard fingerprints name the same model).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from facecaption.core.store import sha256_file
from facecaption.settings import Settings

# Files that change what a transformers LLM writes: weights, architecture, tokenizer, chat
# template, generation defaults.
LLM_IDENTITY_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "*.safetensors",
)


def model_file_sha256(path: Path) -> str:
    """sha256 of a model file, memoised per process by path, size and mtime."""
    stat = path.stat()
    return _sha256_of_version(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def file_identity(path: Path) -> str:
    """`{file name}@sha256:{digest}`: an ONNX detector or classifier."""
    return f"{path.name}@sha256:{model_file_sha256(path)}"


def cascade_identity() -> str:
    """OpenCV's cascade: its name and OpenCV's version (the XML ships with OpenCV)."""
    import cv2

    from facecaption.detect.backends.cascade import FACE_CASCADE

    return f"opencv-{FACE_CASCADE.removesuffix('.xml')}@{cv2.__version__}"


def detector_identity(settings: Settings) -> str:
    if settings.detect.backend == "cascade":
        return cascade_identity()
    from facecaption.models.locate import detector_model_file

    return file_identity(detector_model_file(settings))


def onnx_attribute_identity(model_file: Path) -> str:
    """The classifier file and its sidecar (the sidecar's preprocessing changes outputs)."""
    sidecar = model_file.with_suffix(".json")
    return f"{file_identity(model_file)}+sidecar:{model_file_sha256(sidecar)[:16]}"


def attribute_identity(settings: Settings) -> str:
    from facecaption.models.locate import attribute_model_file

    return onnx_attribute_identity(attribute_model_file(settings))


def transformers_llm_identity(folder: Path) -> str:
    """`{folder name}@sha256:{digest}` over the folder's config, tokenizer, chat template and
    weights files."""
    folder = Path(folder)
    files = sorted({path for pattern in LLM_IDENTITY_PATTERNS for path in folder.glob(pattern)})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{model_file_sha256(path)}\n".encode())
    return f"{folder.name}@sha256:{digest.hexdigest()}"


def served_llm_identity(served_model: str) -> str:
    """A model behind an OpenAI-compatible server: the name it serves, never the server's
    URL (URLs are internal and change when the service moves)."""
    return f"openai:{served_model}"


def caption_identity(settings: Settings) -> str:
    """The rewriting model, named without loading it."""
    caption = settings.caption
    if caption.backend == "template":
        return "template"
    if caption.backend == "openai":
        return served_llm_identity(caption.server_model or caption.model)
    from facecaption.models.locate import configured_llm_folder

    folder = configured_llm_folder(settings)
    if not (folder / "config.json").is_file():
        return f"{folder.name}:missing"  # loading it will say what to do
    return transformers_llm_identity(folder)
