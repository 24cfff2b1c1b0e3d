"""A tiny CelebA-40 attribute classifier in transformers format, built offline: a random ViT
with a multi-label head, saved with `save_pretrained` exactly as a trained one would be.

Its head's weights are scaled down and its biases set, so whatever the face, the labels in
`CONFIDENT` come out near sigmoid(+BIAS) and the others near sigmoid(-BIAS): tests and the demo
know which labels are valid. The outputs are in a shuffled order (`id2label` says which), so
the backend's reordering to CelebA order is exercised.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from facecaption.attribute.labels import CELEBA_ATTRIBUTES

CONFIDENT = (
    "Male", "Young", "Smiling", "Black_Hair", "Straight_Hair", "No_Beard", "High_Cheekbones",
    "Mouth_Slightly_Open",
)  # fmt: skip
BIAS = 5.0
HEAD_WEIGHT_SCALE = 0.01
IMAGE_SIZE = 32


def shuffled_labels(seed: int = 40) -> list[str]:
    labels = list(CELEBA_ATTRIBUTES)
    random.Random(seed).shuffle(labels)
    return labels


def build_tiny_vit(folder: Path, *, seed: int = 0, labels_file: bool = False) -> Path:
    """Write the model folder. With `labels_file`, id2label says LABEL_i and the CelebA names
    are in celeba_labels.json instead."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = shuffled_labels()
    names = [f"LABEL_{i}" for i in range(len(labels))] if labels_file else labels
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=len(labels),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        problem_type="multi_label_classification",
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(HEAD_WEIGHT_SCALE)
        model.classifier.bias.copy_(
            torch.tensor([BIAS if name in CONFIDENT else -BIAS for name in labels])
        )
    model.save_pretrained(folder)
    ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # bicubic
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(folder)
    if labels_file:
        (folder / "celeba_labels.json").write_text(json.dumps(labels))
    return folder
