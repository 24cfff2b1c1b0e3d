"""Model identities: one function per backend that names the model exactly, used both by the
stage fingerprints (so a changed model makes outputs stale) and by the backends for the
`*_model_id` / `detector_id` they write into rows (so outputs say what made them).

A file's identity is its name and the sha256 of its bytes. Hashing multi-GB LLM weights for
each of thousands of shard tasks (each its own process) would cost more than the work, so a
digest is computed once per file version (resolved path, size, mtime) and kept: in memory for
the process, and, where the settings are known, on disk in `{home}/cache/model-digests.json`
(`digest_cache_file`), so the next process reads it instead. That file is only an
optimisation: unreadable, it is ignored; unwritable, the digest is computed again next time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from facecaption.core.store import sha256_file
from facecaption.settings import Settings

if TYPE_CHECKING:
    from facecaption.models.locate import AttributeModelLocation

DIGEST_CACHE_MAX_ENTRIES = 4096  # bounds the file; the oldest entries go first
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

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


# Files that change what a transformers attribute classifier outputs.
ATTRIBUTE_IDENTITY_PATTERNS = (
    "config.json",
    "celeba_labels.json",
    "preprocessor_config.json",
    "*.safetensors",
)


# Stand-in models (the demo's image-statistics "classifier", its random tiny LLM) are named
# with this prefix: they run the real code but their outputs mean nothing, and the report and
# `facecaption doctor` say so wherever they made something.
DEMO_MODEL_PREFIX = "demo-"


def is_demo_model(model_id: str | None) -> bool:
    """Whether an identity names a stand-in model (see DEMO_MODEL_PREFIX)."""
    return bool(model_id) and model_id.startswith(DEMO_MODEL_PREFIX)


def digest_cache_file(settings: Settings) -> Path:
    """Where model digests are kept between processes."""
    return settings.home_dir / "cache" / "model-digests.json"


def model_file_sha256(path: Path, digest_cache: Path | None = None) -> str:
    """sha256 of a model file, computed once per version (path, size, mtime) and kept: per
    process, and in `digest_cache` when given."""
    stat = path.stat()
    cache = str(digest_cache) if digest_cache is not None else None
    return _sha256_of_version(str(path.resolve()), stat.st_size, stat.st_mtime_ns, cache)


@functools.lru_cache(maxsize=256)
def _sha256_of_version(path: str, size: int, mtime_ns: int, digest_cache: str | None) -> str:
    key = f"{path}|{size}|{mtime_ns}"
    if digest_cache is not None:
        known = read_digests(Path(digest_cache)).get(key)
        if known:
            return known
    digest = sha256_file(Path(path))
    if digest_cache is not None:
        write_digest(Path(digest_cache), key, digest)
    return digest


def read_digests(cache: Path) -> dict[str, str]:
    """The digests a cache file holds; {} when it is missing or not ours to trust."""
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {
        key: value
        for key, value in entries.items()
        if isinstance(value, str) and _SHA256_HEX.match(value)
    }


def write_digest(cache: Path, key: str, digest: str) -> bool:
    """Add one digest to a cache file (written whole, renamed into place); False where the
    folder is not writable."""
    entries = read_digests(cache)
    entries.pop(key, None)
    entries[key] = digest
    kept = dict(list(entries.items())[-DIGEST_CACHE_MAX_ENTRIES:])
    written = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=cache.parent, prefix=f"{cache.name}.", suffix=".tmp", delete=False
        ) as tmp:
            written = Path(tmp.name)
            json.dump(kept, tmp, indent=0)
        os.replace(written, cache)
    except OSError:
        if written is not None:
            written.unlink(missing_ok=True)
        return False
    return True


def file_identity(path: Path, digest_cache: Path | None = None) -> str:
    """`{file name}@sha256:{digest}`: an ONNX detector or classifier."""
    return f"{path.name}@sha256:{model_file_sha256(path, digest_cache)}"


def cascade_identity() -> str:
    """OpenCV's cascade: its name and OpenCV's version (the XML ships with OpenCV)."""
    import cv2

    from facecaption.detect.backends.cascade import FACE_CASCADE

    return f"opencv-{FACE_CASCADE.removesuffix('.xml')}@{cv2.__version__}"


def retinaface_identity() -> str:
    """The packaged RetinaFace: its file name and sha256 (`retinaface.onnx@sha256:b7a7...`)."""
    from facecaption.detect.backends.retinaface import PACKAGED_MODEL

    return file_identity(PACKAGED_MODEL)


def detector_identity(settings: Settings) -> str:
    from facecaption.models.locate import detector_backend, detector_model_file

    backend = detector_backend(settings)
    if backend == "cascade":
        return cascade_identity()
    if backend == "retinaface":
        return retinaface_identity()
    return file_identity(detector_model_file(settings), digest_cache_file(settings))


def onnx_attribute_identity(model_file: Path, digest_cache: Path | None = None) -> str:
    """The classifier file and its sidecar (the sidecar's preprocessing changes outputs)."""
    sidecar = model_file.with_suffix(".json")
    weights = file_identity(model_file, digest_cache)
    return f"{weights}+sidecar:{model_file_sha256(sidecar, digest_cache)[:16]}"


def transformers_attribute_identity(folder: Path, digest_cache: Path | None = None) -> str:
    """`{folder name}@sha256:{digest}` over a transformers classifier's config, label list,
    image processor and weights."""
    return folder_identity(Path(folder), ATTRIBUTE_IDENTITY_PATTERNS, digest_cache)


def attribute_identity(settings: Settings, located: AttributeModelLocation | None = None) -> str:
    """The identity of the attribute model the settings name (`located`: already found)."""
    from facecaption.models.locate import attribute_model

    located = located or attribute_model(settings)
    if located.backend == "transformers":
        return transformers_attribute_identity(located.path, digest_cache_file(settings))
    return onnx_attribute_identity(located.path, digest_cache_file(settings))


def folder_identity(
    folder: Path, patterns: tuple[str, ...], digest_cache: Path | None = None
) -> str:
    """`{folder name}@sha256:{digest}` over the files matching `patterns`, by name and sha256."""
    files = sorted({path for pattern in patterns for path in folder.glob(pattern)})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{model_file_sha256(path, digest_cache)}\n".encode())
    return f"{folder.name}@sha256:{digest.hexdigest()}"


def transformers_llm_identity(folder: Path, digest_cache: Path | None = None) -> str:
    """`{folder name}@sha256:{digest}` over the folder's config, tokenizer, chat template and
    weights files."""
    return folder_identity(Path(folder), LLM_IDENTITY_PATTERNS, digest_cache)


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
    return transformers_llm_identity(folder, digest_cache_file(settings))
