"""The one settings object: environment (`FACECAPTION_*`) over an optional TOML file over defaults.

Nested sections use a double underscore in the environment, e.g.
`FACECAPTION_FETCH__CONCURRENCY=128` or `FACECAPTION_COLUMNS__URL='["URL"]'`. The TOML file is
`$FACECAPTION_CONFIG` when set, else `{home}/facecaption.toml` when it exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_HOME = Path("~/.facecaption")


class SourceColumns(BaseModel):
    """Candidate column names in source parquet files; the first present one is used."""

    url: list[str] = ["url", "URL"]
    caption: list[str] = ["caption", "TEXT"]
    sample_id: list[str] = ["id", "SAMPLE_ID", "key"]


class FetchSettings(BaseModel):
    """Limits and manners of the fetch stage. Only the fields named in `OUTPUT_FIELDS` change
    what it writes; the others change how fast it gets there."""

    concurrency: int = Field(64, ge=1, description="simultaneous downloads per shard (process)")
    per_host_concurrency: int = Field(
        16, ge=1, description="most simultaneous requests to one host"
    )
    per_host_rate: float = Field(
        250.0,
        ge=0,
        description="most requests per second to one host: the adaptive rate never goes"
        " above it; 0: no rate at all (only per_host_concurrency and Retry-After pauses)",
    )
    host_start_rate: float = Field(
        4.0, gt=0, description="requests/s to a host not seen before (nothing learned yet)"
    )
    host_min_rate: float = Field(
        0.5, gt=0, description="the adaptive rate never goes below this (requests/s)"
    )
    host_backoff_factor: float = Field(
        0.5, gt=0, lt=1, description="a host's rate is multiplied by this when it pushes back"
    )
    host_recover_s: float = Field(
        4.0, gt=0, description="seconds after a cut to climb back to the rate that was cut"
    )
    host_latency_rise: float = Field(
        4.0,
        gt=1,
        description="answers this many times slower than the host's fastest count as push-back",
    )
    host_latency_floor_s: float = Field(
        1.0, ge=0, description="...and only when slower than this (average seconds to headers)"
    )
    report_hosts: int = Field(
        20,
        ge=0,
        description="hosts (the most asked) whose requests, 429s, pause and learned rate a"
        " shard's fetch keeps with its state",
    )
    host_budget_redis_url: str | None = Field(
        None,
        description="a Redis URL: processes fetching at once share one budget per host there;"
        " unset: each process keeps its own",
    )
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0, description="longest wait for the next bytes")
    total_timeout_s: float = Field(
        30.0, gt=0, description="deadline for one download attempt, redirects included"
    )
    retries: int = Field(
        2, ge=0, description="extra attempts for resets, 5xx and 429 (quick failures)"
    )
    timeout_retries: int = Field(
        0, ge=0, description="extra attempts after a timeout; each costs a full deadline"
    )
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(8.0, ge=0)
    retry_after_max_s: float = Field(
        60.0, ge=0, description="longest Retry-After waited out within a run"
    )
    max_redirects: int = Field(5, ge=0)
    max_bytes: int = Field(20_000_000, ge=1, description="larger bodies get status too_large")
    max_pixels: int = Field(
        89_478_485, ge=1, description="decompression-bomb guard, checked from the image header"
    )
    user_agent: str = "facecaption/0.1 (+https://github.com/facecaption/facecaption)"
    user_agent_token: str = Field(
        "facecaption", description="our name in robots.txt groups and X-Robots-Tag scopes"
    )
    respect_robots_txt: bool = True
    robots_max_bytes: int = Field(512_000, ge=1)
    robots_timeout_s: float = Field(5.0, gt=0)
    opt_out_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    allowed_schemes: list[str] = ["http", "https"]
    allow_networks: list[str] = Field(
        [], description="CIDRs reachable despite being loopback/private, e.g. 127.0.0.0/8"
    )
    warn_error_rate: float = Field(
        0.5, ge=0, le=1, description="warn in the shard summary above this failure share"
    )
    # Across runs: a row that failed transiently is fetched again by later runs (a refresh),
    # each waiting longer, until `row_max_runs` runs have tried it; then it is `gave_up`.
    row_max_runs: int = Field(
        4, ge=1, description="runs that may fetch a row failing transiently; then it is gave_up"
    )
    row_retry_pause_s: float = Field(
        3600.0,
        ge=0,
        description="wait before a later run fetches such a row again; doubles with each run",
    )

    OUTPUT_FIELDS: ClassVar[tuple[str, ...]] = (
        "max_bytes",
        "max_pixels",
        "max_redirects",
        "user_agent_token",
        "respect_robots_txt",
        "opt_out_directives",
        "allowed_schemes",
        "allow_networks",
    )

    def output_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.OUTPUT_FIELDS}


class StageModelSettings(BaseModel):
    """Settings of a model stage: all of them shape its output except the runtime ones."""

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("batch_size", "providers")

    def output_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k not in self.RUNTIME_FIELDS}


# Detector input sides when `detect.input_size` is unset. insightface's packs are made for
# 640. The packaged RetinaFace gets 1024: at 640, small faces in large photos fall under 0.98,
# and at native size large faces get boxes too small (its anchors end at 512 px).
INSIGHTFACE_INPUT_SIZE = 640
RETINAFACE_INPUT_SIZE = 1024


class DetectSettings(StageModelSettings):
    """Face detection and alignment. Paper defaults: score > 0.98, both sides >= 128 px."""

    backend: Literal["auto", "retinaface", "insightface", "cascade"] = Field(
        "auto",
        description="auto: insightface when its model pack (or model_path) is there, else"
        " retinaface; retinaface: the packaged RetinaFace MobileNet-0.25 (offline);"
        " insightface: RetinaFace/SCRFD ONNX from the model cache (production);"
        " cascade: OpenCV's frontal-face cascade (CPU, offline, lower quality)",
    )
    model_pack: str = Field("buffalo_l", description="insightface model pack in the cache")
    model_path: str | None = Field(None, description="an explicit detector .onnx (overrides)")
    input_size: int | None = Field(
        None,
        ge=32,
        description="detector input side, letterboxed; unset: the backend's own"
        f" (insightface {INSIGHTFACE_INPUT_SIZE}, retinaface {RETINAFACE_INPUT_SIZE})",
    )
    batch_size: int = Field(8, ge=1, description="images per inference call when batchable")
    min_score: float = Field(
        0.98, ge=0, le=1, description="RetinaFace/SCRFD score to keep a face (paper)"
    )
    cascade_min_score: float = Field(
        3.0, description="cascade level weight to keep a face (not comparable to min_score)"
    )
    nms_threshold: float = Field(0.4, ge=0, le=1)
    min_face_px: int = Field(128, ge=1, description="a kept face's box is this big on both sides")
    max_faces_per_image: int = Field(0, ge=0, description="0: no cap; else the N best scores")
    crop_format: Literal["png", "jpeg"] = Field(
        "png", description="aligned crops: png is lossless, jpeg is quality 95 with 4:4:4"
    )
    max_pixels: int = Field(89_478_485, ge=1, description="larger images are not decoded")
    providers: list[str] | None = Field(
        None, description="onnxruntime providers; unset: CUDA when available, else CPU"
    )

    def input_side(self, backend: str) -> int:
        """The letterboxed input side for a resolved backend."""
        if self.input_size is not None:
            return self.input_size
        return RETINAFACE_INPUT_SIZE if backend == "retinaface" else INSIGHTFACE_INPUT_SIZE


class AttributeSettings(StageModelSettings):
    """CelebA-40 attributes. Paper defaults: a label is valid above 0.85, a face is kept with
    at least 5 valid labels."""

    backend: Literal["auto", "onnx", "transformers"] = Field(
        "auto",
        description="onnx: an .onnx with its sidecar .json; transformers: a Hugging Face"
        " image-classification folder with a multi-label head; auto: whichever the model is",
    )
    model: str = Field(
        "celeba40-resnet50",
        description="attribute model in the cache: {models}/attributes/NAME.onnx (+ .json) or"
        " {models}/attributes/NAME/ (transformers)",
    )
    model_path: str | None = Field(
        None,
        description="an explicit .onnx (its sidecar .json beside it) or transformers folder;"
        " overrides model",
    )
    threshold: float = Field(0.85, ge=0, le=1, description="a label is valid above this")
    min_labels: int = Field(5, ge=0, description="a face is kept with at least this many")
    batch_size: int = Field(32, ge=1)
    providers: list[str] | None = Field(
        None, description="onnx backend: onnxruntime providers; unset: CUDA when available"
    )


DEFAULT_SYSTEM_PROMPT = (
    "You describe faces for an image-text dataset. Write one natural, fluent paragraph of one"
    " to three sentences. Keep every stated fact, add no new ones, never contradict them."
)
DEFAULT_PROMPT = (
    "Rewrite these notes about a person's face as one natural description.\n\nNotes: {raw_text}"
)
# The second request for a reply that failed the fidelity check: the conversation so far plus
# this, so that it differs from the first (a greedy model would repeat its first answer).
DEFAULT_RETRY_PROMPT = (
    "That description does not match the notes: {problems}. Rewrite it as one natural"
    " description that keeps every fact in the notes and adds none."
)


class CaptionSettings(StageModelSettings):
    """Captions: grammar raw text, an LLM rewrite, and a fidelity check."""

    backend: Literal["transformers", "openai", "template"] = Field(
        "transformers",
        description="transformers: in-process LLM; openai: any /v1/chat/completions server;"
        " template: the grammar's raw text only, no LLM",
    )
    model: str = Field(
        "Qwen2.5-1.5B-Instruct", description="LLM in the cache: {models}/llm/NAME (HF format)"
    )
    model_path: str | None = Field(None, description="an explicit HF model folder (overrides)")
    base_url: str | None = Field(None, description="openai backend: e.g. http://host:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="env var holding the server's key")
    server_model: str | None = Field(
        None, description="model name sent to the server (default: `model`)"
    )
    prompt_version: str = "1"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    prompt_template: str = Field(DEFAULT_PROMPT, description="must contain {raw_text}")
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.7, ge=0, description="0: greedy")
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = Field(0, description="seeds the grammar (with each face id) and sampling")
    grammar_path: str | None = Field(None, description="a grammar TOML; unset: the packaged one")
    exclude_labels: list[str] = Field(
        ["Attractive", "Blurry"], description="valid labels the captions leave out"
    )
    absent_below: float = Field(
        0.15, ge=0, le=1, description="an attribute this improbable may not be stated"
    )
    retry_prompt: str = Field(
        DEFAULT_RETRY_PROMPT,
        description="asked after a reply that failed the fidelity check, with that reply"
        " in the conversation and the seed plus one; {problems} says what was wrong",
    )
    max_caption_words: int = Field(
        120, ge=1, description="a longer reply is cut to this many words (reply_truncated)"
    )
    max_caption_chars: int = Field(
        1000, ge=1, description="and to this many characters, at a word boundary"
    )
    batch_size: int = Field(16, ge=1, description="prompts per generate call / in flight")
    concurrency: int = Field(8, ge=1, description="openai backend: requests at once")
    timeout_s: float = Field(
        60.0, gt=0, description="openai backend: deadline of one request, whole reply read"
    )
    retries: int = Field(2, ge=0, description="openai backend: for 429/5xx/timeouts")
    max_reply_bytes: int = Field(
        1_048_576, ge=1, description="openai backend: reading stops here and the reply is refused"
    )
    # Across runs: a face whose request met a transient fault (timeout, connection error,
    # malformed HTTP, 429/5xx after `retries`) is asked again by later runs (a refresh), each
    # waiting longer, until `face_max_runs` runs have tried it; then it gave up (its caption is
    # the grammar's text). The same budget as fetch's rows (`facecaption.core.retry_budget`).
    face_max_runs: int = Field(
        4, ge=1, description="runs that may ask the LLM for a face failing transiently"
    )
    face_retry_pause_s: float = Field(
        3600.0,
        ge=0,
        description="wait before a later run asks for such a face again; doubles with each run",
    )

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = (
        "batch_size", "concurrency", "timeout_s", "retries", "api_key_env",
        "base_url", "max_reply_bytes", "face_max_runs", "face_retry_pause_s",
    )  # fmt: skip


class RefreshSettings(BaseModel):
    """The scheduled refresh: which sources it re-plans and how often it runs."""

    schedule: str | None = Field(
        "@daily", description="cron or preset for the refresh DAG; unset: manual only"
    )
    sources: list[str] = Field(
        [], description="parquet files, folders or globs re-planned each time (new files)"
    )


class AirflowSettings(BaseModel):
    """How the DAGs lay out a shard's tasks; read when the DAG files are parsed."""

    gpu_stages_in_one_task: bool = Field(
        False,
        description="run a shard's GPU stages (detect, attribute, and caption with an"
        " in-process LLM) in one `gpu` task: one process start, DAG parse and gpu slot per"
        " shard instead of one per stage",
    )


class ExportSettings(BaseModel):
    """The release: links-only parquet (FaceCaption columns + ours) and, on request, training
    shards of aligned crops."""

    rows_per_file: int = Field(
        500_000, ge=1, description="release parquet file size target (files hold whole shards)"
    )
    row_group_size: int = Field(50_000, ge=1, description="rows per parquet row group")
    training_shards: bool = Field(
        False, description="also write webdataset tars of crops (.jpg), captions and metadata"
    )
    jpeg_quality: int = Field(95, ge=1, le=100, description="training shard crops")
    license: str = Field(
        "Captions: CC-BY-4.0. Images are not distributed: each URL's image belongs to its"
        " owner. For research and education.",
        description="license note stored in every release row and the manifest",
    )
    report_max_crops: int = Field(
        2000, ge=0, description="crops whose image quality (BRISQUE) the report shows"
    )
    quality_crops_per_shard: int = Field(
        8,
        ge=0,
        description="released crops of each shard scored with BRISQUE when it is exported"
        " (its first ones in row order): what the report samples from",
    )
    gallery_faces_per_shard: int = Field(
        4,
        ge=0,
        description="released faces of each shard kept (as small thumbnails) when it is"
        " exported (its first ones in row order): what the report's gallery samples from",
    )
    report_gallery_faces: int = Field(
        24,
        ge=0,
        description="faces shown in the report's gallery, chosen by face id from what the"
        " exports kept",
    )

    # the release's file layout and the report: not part of any shard's export (a changed
    # quality_crops_per_shard or gallery_faces_per_shard applies to shards exported from
    # then on)
    NOT_SHARD_FIELDS: ClassVar[tuple[str, ...]] = (
        "rows_per_file",
        "row_group_size",
        "report_max_crops",
        "quality_crops_per_shard",
        "gallery_faces_per_shard",
        "report_gallery_faces",
    )

    def output_settings(self) -> dict[str, Any]:
        """What shapes a shard's export."""
        return {k: v for k, v in self.model_dump().items() if k not in self.NOT_SHARD_FIELDS}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FACECAPTION_", env_nested_delimiter="__", extra="forbid"
    )

    home: Path = Field(
        DEFAULT_HOME, description="working dir: embedded DB, demo, temp files, model digest cache"
    )
    db_url: str | None = Field(
        None, description="state DB (Postgres) SQLAlchemy URL; unset: embedded Postgres in home"
    )
    store_root: str | None = Field(
        None, description="artifact root, any fsspec URL; unset: {home}/artifacts"
    )
    shard_size: int = Field(10_000, ge=1, description="source rows per shard")
    busy_wait_s: float = Field(
        3600.0,
        ge=0,
        description="how long `run` and `publish` wait for a shard stage or the release that"
        " another worker holds (after running the rest); 0: do not wait",
    )
    columns: SourceColumns = SourceColumns()
    fetch: FetchSettings = FetchSettings()
    detect: DetectSettings = DetectSettings()
    attribute: AttributeSettings = AttributeSettings()
    caption: CaptionSettings = CaptionSettings()
    refresh: RefreshSettings = RefreshSettings()
    export: ExportSettings = ExportSettings()
    airflow: AirflowSettings = AirflowSettings()
    models_dir: Path | None = Field(
        None, description="model cache (`facecaption models pull`); unset: {home}/models"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = config_path()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def model_cache_dir(self) -> Path:
        return (self.models_dir or self.home_dir / "models").expanduser().resolve()

    @property
    def artifact_root(self) -> str:
        return self.store_root or str(self.home_dir / "artifacts")


def config_path() -> Path | None:
    """The TOML file to read, if any."""
    explicit = os.environ.get("FACECAPTION_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FACECAPTION_CONFIG names {path}, which is not a file")
        return path
    home = Path(os.environ.get("FACECAPTION_HOME", str(DEFAULT_HOME))).expanduser()
    default = home / "facecaption.toml"
    return default if default.is_file() else None
