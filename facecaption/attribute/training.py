"""`facecaption models train-attributes`: fine-tune a pretrained image backbone into a calibrated
CelebA-40 classifier, evaluate it, and install it in the model cache where the attribute stage
finds it.

One run, in order:
1. read the dataset (`facecaption.attribute.celeba`: the Hub schema, refused with DatasetError
   when its columns are not the 40 attributes) and align every face as the pipeline does;
2. train: `AutoModelForImageClassification` from the backbone (any transformers image model
   with an image-classification class: ResNet, ConvNeXt, ViT, Swin, ...) with a new 40-way
   head; one sigmoid per attribute, binary cross-entropy (optionally with class-balanced
   `pos_weight` = negatives / positives per attribute, from the train labels); AdamW, linear
   warm-up then cosine decay; random horizontal flips (no CelebA attribute is left/right);
   mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling);
3. checkpoint every `checkpoint_every` steps and at each epoch's end into the work folder
   (`checkpoint.pt`, written whole then renamed): a killed run started again with the same
   settings continues from there, batch for batch (epoch orders and flips are functions of
   the seed, the RNG state is saved). Other settings against an old checkpoint are refused;
   `restart` starts over;
4. calibrate on the valid split (`facecaption.attribute.evaluation`: per-attribute
   temperature, or Platt scaling), evaluate on the test split;
5. fold the calibration into the head (logit' = scale * logit + shift is a linear layer, so
   both exports give calibrated probabilities with no reader-side step), export ONNX + sidecar
   and the transformers folder, check each against torch, and install both under `name` in
   the model cache with a model card (`attributes/{name}.md`) and a manifest entry recording
   dataset and backbone revisions, settings, metrics and calibration.

With the default name (the `attribute.model` setting) the result is what the attribute stage
loads next (`facecaption.models.locate.attribute_model`); a name that already holds a model is
refused up front unless `replace`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from facecaption.attribute.backends.onnx import AttributeModelSpec, preprocess
from facecaption.attribute.celeba import (
    CelebaSplit,
    aligned_crop,
    decode_rgb,
    detect_landmarks,
    landmark_source,
    load_splits,
)
from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.attribute.options import (
    CALIBRATIONS,
    PRECISIONS,
    RESUME_KEYS,
    TrainingConfig,
)
from facecaption.core.errors import PermanentError

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
DEFAULT_MEAN_STD = (0.5, 0.5, 0.5)


class TrainingError(PermanentError, ValueError):
    """The backbone, the settings or the checkpoint cannot make a model; the message says why."""


@dataclass
class TrainingRun:
    model: object  # the trained transformers model (uncalibrated head)
    spec: AttributeModelSpec
    history: list[tuple[int, float]]  # (step, mean loss of that step)
    resumed_from: int  # the step the run started at (0: from scratch)
    steps: int
    skipped_images: int  # image cells that did not decode (left out of the loss)
    alignment: dict[str, str]


# ---- the data ------------------------------------------------------------------------------


class CropDataset:
    """Faces of one split as model inputs: decode, align (the pipeline's crop), the sidecar's
    preprocessing, and a flip decided by (seed, epoch, index) when training. Items are
    (pixels, labels, usable); an image that does not decode gives usable = False."""

    def __init__(
        self,
        split: CelebaSplit,
        landmarks: np.ndarray | None,
        spec: AttributeModelSpec,
        seed: int,
    ) -> None:
        self.split, self.landmarks, self.spec, self.seed = split, landmarks, spec, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]):  # noqa: ANN204
        import torch

        epoch, index = key if isinstance(key, tuple) else (None, key)
        labels = torch.from_numpy(self.split.labels[index])
        image = decode_rgb(self.split.image_bytes(index))
        if image is None:
            side = self.spec.input_size
            return torch.zeros(3, side, side), labels, False
        points = None if self.landmarks is None else self.landmarks[index]
        pixels = preprocess(aligned_crop(image, points), self.spec)
        if epoch is not None and np.random.default_rng([self.seed, epoch, index]).random() < 0.5:
            pixels = np.ascontiguousarray(pixels[:, :, ::-1])
        return torch.from_numpy(pixels), labels, True


def epoch_batches(size: int, batch: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """The epoch's batches of (epoch, index): a permutation that depends on seed and epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(size)
    return [
        [(epoch, int(i)) for i in order[start : start + batch]] for start in range(0, size, batch)
    ]


def _loader(dataset: CropDataset, batches, workers: int, device):  # noqa: ANN001, ANN202
    import multiprocessing

    import torch

    # fork shares the memory-mapped tables with the workers; other start methods would
    # pickle whole splits into each of them
    fork = workers > 0 and "fork" in multiprocessing.get_all_start_methods()
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        multiprocessing_context="fork" if fork else None,
    )


# ---- the model -----------------------------------------------------------------------------


def resolve_backbone(backbone: str, revision: str | None) -> tuple[str, str | None, dict]:
    """(where to load from, the revision to load, provenance): a local folder is named by
    the sha256s of its files; a Hub id by the commit its revision resolves to."""
    path = Path(backbone).expanduser()
    looks_local = backbone.startswith(("/", ".", "~")) or backbone.count("/") > 1
    if looks_local and not path.is_dir():
        raise TrainingError(f"--backbone {backbone}: no such folder (nor a Hub id: org/name)")
    if path.is_dir():
        from facecaption.models.identity import ATTRIBUTE_IDENTITY_PATTERNS, folder_identity

        identity = folder_identity(path, ATTRIBUTE_IDENTITY_PATTERNS)
        return str(path), None, {"backbone": str(path.resolve()), "identity": identity}
    from huggingface_hub import HfApi

    from facecaption.models.hub import _hub_errors

    with _hub_errors(backbone, revision, None):
        info = HfApi().model_info(backbone, revision=revision)
    return backbone, info.sha, {"backbone": backbone, "revision": revision, "commit": info.sha}


def load_backbone(source: str, revision: str | None):  # noqa: ANN201
    """The backbone with a fresh 40-way multi-label head, in CelebA order."""
    from transformers import AutoModelForImageClassification

    labels = list(CELEBA_ATTRIBUTES)
    try:
        return AutoModelForImageClassification.from_pretrained(
            source,
            revision=revision,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            problem_type="multi_label_classification",
            ignore_mismatched_sizes=True,  # the backbone's own head (if any) is replaced
            local_files_only=Path(source).is_dir(),
        )
    except (OSError, ValueError, KeyError) as error:
        raise TrainingError(
            f"{source} is not a transformers image model with an image-classification class"
            f" (AutoModelForImageClassification): {error}"
        ) from None


def backbone_mean_std(source: str, revision: str | None) -> tuple[tuple, tuple]:
    """The backbone's own normalisation (its image processor's), else mean = std = 0.5."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(
            source, revision=revision, local_files_only=Path(source).is_dir()
        )
        mean, std = processor.image_mean, processor.image_std
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return DEFAULT_MEAN_STD, DEFAULT_MEAN_STD


# ---- training ------------------------------------------------------------------------------


def _precision(requested: str, device) -> tuple[object, bool]:  # noqa: ANN001
    """(autocast dtype or None, whether to scale the loss)."""
    import torch

    if requested not in PRECISIONS:
        raise TrainingError(f"precision must be one of {PRECISIONS}, not {requested!r}")
    if device.type != "cuda" or requested == "fp32":
        if requested in ("bf16", "fp16") and device.type != "cuda":
            raise TrainingError(f"precision {requested} needs a CUDA device; this run is on CPU")
        return None, False
    if requested == "bf16" or (requested == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _landmarks_for(
    split: CelebaSplit, align: str, work_dir: Path, settings, log: Callable[[str], None]
) -> tuple[np.ndarray | None, str]:  # noqa: ANN001
    source = landmark_source(split, align)
    if source == "landmarks":
        return split.landmarks, "CelebA landmark columns"
    if source == "celeba-mean":
        return None, "CelebA's fixed aligned landmarks (approximate per face)"
    from tqdm import tqdm

    from facecaption.detect.backends import load_detector

    detector = load_detector(settings)
    with tqdm(
        total=len(split), desc=f"landmarks {split.name}", unit="img", disable=None, file=sys.stderr
    ) as bar:
        points = detect_landmarks(
            split, detector, work_dir / f"landmarks-{split.name}.npy", bar.update
        )
    missed = int(np.isnan(points[:, 0, 0]).sum())
    log(
        f"{split.name}: {detector.backend} found no face in {missed} of {len(split)} images"
        " (aligned with CelebA's fixed landmarks instead)"
    )
    return points, f"detector {detector.backend} ({missed} of {len(split)} fell back to fixed)"


def prepare_data(
    config: TrainingConfig, settings, log: Callable[[str], None]
) -> tuple[dict[str, CelebaSplit], dict[str, np.ndarray | None], dict[str, str]]:  # noqa: ANN001
    splits = {
        name: split.limited(config.limit)
        for name, split in load_splits(config.dataset, revision=config.dataset_revision).items()
    }
    landmarks, alignment = {}, {}
    for name, split in splits.items():
        landmarks[name], alignment[name] = _landmarks_for(
            split, config.align, config.work_dir, settings, log
        )
    return splits, landmarks, alignment


def train(
    config: TrainingConfig,
    settings,  # noqa: ANN001 (facecaption.settings.Settings: the detector, when aligning with it)
    *,
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
    prepared: tuple | None = None,
) -> TrainingRun:
    """Steps 1-3 of the module docstring; returns the trained (uncalibrated) model."""
    import torch
    from tqdm import tqdm

    splits, landmarks, alignment = prepared or prepare_data(config, settings, log)
    source, revision, _ = resolve_backbone(config.backbone, config.backbone_revision)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast_dtype, scaled = _precision(config.precision, device)
    mean, std = backbone_mean_std(source, revision)
    spec = AttributeModelSpec(
        name=config.name,
        input_size=config.input_size,
        labels=CELEBA_ATTRIBUTES,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )
    torch.manual_seed(config.seed)
    model = load_backbone(source, revision).to(device)
    train_split = splits["train"]
    pos_weight = None
    if config.balanced:
        positives = train_split.labels.sum(axis=0)
        pos_weight = torch.as_tensor(
            (len(train_split) - positives) / np.maximum(positives, 1), dtype=torch.float32
        ).to(device)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    per_epoch = math.ceil(len(train_split) / config.batch_size)
    total = config.epochs * per_epoch
    warmup = max(1, int(total * config.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: _schedule(step, total, warmup)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=scaled)

    config.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = config.work_dir / CHECKPOINT
    step, history = 0, []
    if checkpoint_path.is_file() and not config.restart:
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if (
            saved.get("format") != CHECKPOINT_FORMAT
            or saved["settings"] != config.resume_settings()
        ):
            changed = sorted(
                k for k in RESUME_KEYS if saved.get("settings", {}).get(k) != getattr(config, k)
            )
            raise TrainingError(
                f"{checkpoint_path} was made with other settings ({', '.join(changed)}): run"
                " with the same ones to resume it, or with --restart to start over"
            )
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and saved.get("cuda_rng"):
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        step, history = int(saved["step"]), [tuple(h) for h in saved["history"]]
        log(f"resuming from step {step} of {total} ({checkpoint_path})")
    resumed_from = step

    def save() -> None:
        _save_checkpoint(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "settings": config.resume_settings(),
                "step": step,
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "history": [list(h) for h in history],
            },
        )

    dataset = CropDataset(train_split, landmarks["train"], spec, config.seed)
    skipped = 0
    model.train()
    with tqdm(
        total=total, initial=step, desc="train", unit="step", disable=None, file=sys.stderr
    ) as bar:
        while step < total:
            epoch, first = divmod(step, per_epoch)
            batches = epoch_batches(len(train_split), config.batch_size, config.seed, epoch)
            for pixels, labels, usable in _loader(dataset, batches[first:], config.workers, device):
                pixels, labels = pixels.to(device), labels.to(device)
                usable = usable.to(device)
                skipped += int((~usable).sum())
                with torch.autocast(
                    device.type, dtype=autocast_dtype, enabled=bool(autocast_dtype)
                ):
                    logits = model(pixel_values=pixels).logits
                losses = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits.float(), labels, pos_weight=pos_weight, reduction="none"
                ).mean(dim=1)
                loss = (losses * usable).sum() / usable.sum().clamp(min=1)
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
                scheduler.step()
                step += 1
                history.append((step, float(loss.detach())))
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1][1]:.4f}", epoch=epoch + 1)
                if step % config.checkpoint_every == 0 or step % per_epoch == 0:
                    save()
                    if bar.disable:  # no terminal (a log file): a line per checkpoint instead
                        recent = np.mean([loss for _, loss in history[-config.checkpoint_every :]])
                        log(f"step {step}/{total} (epoch {epoch + 1}): loss {recent:.4f}, saved")
                if on_step is not None:
                    on_step(step)
    model.eval()
    return TrainingRun(model, spec, history, resumed_from, step, skipped, alignment)


def predict_logits(
    model, split: CelebaSplit, landmarks, spec: AttributeModelSpec, config: TrainingConfig
) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(logits, labels) of a split's usable faces, in the split's order."""
    import torch
    from tqdm import tqdm

    device = next(model.parameters()).device
    autocast_dtype, _ = _precision(config.precision, device)
    dataset = CropDataset(split, landmarks, spec, config.seed)
    batches = [
        list(range(start, min(start + config.batch_size, len(split))))
        for start in range(0, len(split), config.batch_size)
    ]
    logits, labels = [], []
    model.eval()
    with torch.inference_mode():
        for pixels, truth, usable in tqdm(
            _loader(dataset, batches, config.workers, device),
            desc=split.name, unit="batch", disable=None, file=sys.stderr,
        ):  # fmt: skip
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=bool(autocast_dtype)):
                out = model(pixel_values=pixels.to(device)).logits
            logits.append(out.float().cpu().numpy()[usable.numpy()])
            labels.append(truth.numpy()[usable.numpy()])
    return np.concatenate(logits).astype(np.float64), np.concatenate(labels)


# ---- the whole command -------------------------------------------------------------------

CHECK_CROPS = 4  # test faces each export is checked on against torch


@dataclass(frozen=True)
class TrainedModel:
    installed: object  # facecaption.attribute.install.InstalledModel
    run: TrainingRun
    report: dict  # facecaption.attribute.evaluation.evaluation_report


def train_and_install(
    config: TrainingConfig,
    settings,  # noqa: ANN001
    *,
    command: str = "",
    log: Callable[[str], None] = print,
) -> TrainedModel:
    """The whole `train-attributes` command (the module docstring's steps 1-5)."""
    from facecaption.attribute.celeba import dataset_revision
    from facecaption.attribute.evaluation import evaluation_report, fit_calibration
    from facecaption.attribute.install import install_trained_model, refuse_taken_name
    from facecaption.models.cache import ModelCache

    if config.calibration not in CALIBRATIONS:
        raise TrainingError(f"calibration must be one of {CALIBRATIONS}")
    cache = ModelCache(settings.model_cache_dir)
    refuse_taken_name(cache, config.name, config.replace)
    # Hub revisions resolve to commits once, and those commits are what is loaded
    dataset = dataset_revision(config.dataset, config.dataset_revision)
    _, backbone_commit, backbone = resolve_backbone(config.backbone, config.backbone_revision)
    config = replace(
        config,
        dataset_revision=dataset.get("commit", config.dataset_revision),
        backbone_revision=backbone_commit,
    )
    prepared = prepare_data(config, settings, log)
    run = train(config, settings, log=log, prepared=prepared)
    splits, landmarks, _ = prepared
    valid = predict_logits(run.model, splits["valid"], landmarks["valid"], run.spec, config)
    test = predict_logits(run.model, splits["test"], landmarks["test"], run.spec, config)
    platt = config.calibration == "platt" or (config.calibration == "auto" and config.balanced)
    calibration = fit_calibration(*valid, shift=platt)
    report = evaluation_report(*test, *valid, calibration, settings.attribute.threshold)
    crops = [
        aligned_crop(image, None if landmarks["test"] is None else landmarks["test"][i])
        for i in range(min(CHECK_CROPS, len(splits["test"])))
        if (image := decode_rgb(splits["test"].image_bytes(i))) is not None
    ]
    record = {
        "dataset": {
            **dataset,
            "rows": {k: len(v) for k, v in splits.items()},
        },
        "backbone": backbone,
        "command": command,
        "training": {
            "settings": config.resume_settings(),
            "precision": config.precision,
            "alignment": run.alignment,
            "steps": run.steps,
            "final_loss": float(np.mean([loss for _, loss in run.history[-10:]])),
            "undecodable_images": run.skipped_images,
        },
    }
    installed = install_trained_model(
        cache, run.model, run.spec, calibration, report, record, crops
    )
    return TrainedModel(installed, run, report)
