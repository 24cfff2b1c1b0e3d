"""The options of attribute models and of `facecaption models train-attributes`: choices,
defaults and the training configuration. Imports nothing heavy, so the CLI reads them when it
builds its parser without loading numpy, PIL or torch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

INPUT_SIZE = 256  # He et al.'s preprocessing; the attribute models' default input side
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CALIBRATIONS = ("auto", "temperature", "platt")
# The settings a checkpoint must share with the run that resumes it.
RESUME_KEYS = (
    "dataset", "backbone", "epochs", "batch_size", "lr", "weight_decay", "warmup_fraction",
    "input_size", "balanced", "align", "seed", "limit",
)  # fmt: skip
ALIGN_CHOICES = ("auto", "landmarks", "detector", "celeba-mean")


@dataclass(frozen=True)
class TrainingConfig:
    dataset: str  # Hub id[:config] or a local folder (facecaption.attribute.celeba)
    backbone: str  # Hub id or local folder of a transformers image model
    name: str  # the model's name in the cache
    work_dir: Path  # checkpoints, landmark caches, the trained weights before export
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    input_size: int = INPUT_SIZE
    precision: str = "auto"
    balanced: bool = False
    calibration: str = "auto"  # auto: platt when balanced (it shifts priors), else temperature
    checkpoint_every: int = 500
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    align: str = "auto"
    seed: int = 0
    limit: int | None = None  # rows per split, for a quick try
    device: str | None = None
    replace: bool = False
    restart: bool = False
    backbone_revision: str | None = None  # Hub: branch, tag or commit (resolved and recorded)
    dataset_revision: str | None = None

    def resume_settings(self) -> dict:
        return {key: getattr(self, key) for key in RESUME_KEYS}
