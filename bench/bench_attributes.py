"""Attribute inference throughput: one face per onnxruntime call against batches.

Exports a ResNet-50 CelebA-40 model with random weights at the paper's 256 px input (speed
does not depend on the weights), cuts N face crops of varied size out of scikit-image's
astronaut photo (random pixels when scikit-image is absent) and times
`OnnxAttributeModel.predict` three ways with the same onnxruntime defaults: one call per face
(batch_size=1), and all faces at batch_size 8 and 32. Preprocessing is included in every
timing. Each contender is warmed up, then timed twice; the faster run is reported.

    python bench/bench_attributes.py [--faces 64] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from benchreport import write_section
from PIL import Image
from support.sampledata import package_file

from facecaption.attribute.backends.onnx import OnnxAttributeModel
from facecaption.attribute.conversion import convert_attribute_model
from facecaption.attribute.resnet import ResNet50

INPUT_SIZE = 256
WARMUP_FACES = 4
FACE_CENTRE = (215, 105)  # x, y of the astronaut's face in the 512 x 512 photo


def face_crops(count: int) -> tuple[list[np.ndarray], str]:
    rng = np.random.default_rng(0)
    photo = package_file("skimage", "data/astronaut.png")
    if photo is None:
        sizes = rng.integers(100, 301, (count, 2))
        crops = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
        return crops, "random-pixel crops"
    image = Image.open(photo).convert("RGB")
    crops = []
    for _ in range(count):
        half = int(rng.integers(70, 110))
        cx, cy = (c + int(rng.integers(-15, 16)) for c in FACE_CENTRE)
        box = (cx - half, max(0, cy - half), cx + half, cy + half)
        size = tuple(int(s) for s in rng.integers(100, 301, 2))
        crops.append(np.asarray(image.crop(box).resize(size, Image.Resampling.BILINEAR)))
    return crops, "crops of scikit-image's astronaut face"


def one_per_call(model: OnnxAttributeModel, faces: list[np.ndarray]) -> None:
    for face in faces:
        model.predict([face])


def all_at_once(model: OnnxAttributeModel, faces: list[np.ndarray]) -> None:
    model.predict(faces)


def best_of(runs: int, call, model, faces) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of the fastest of `runs` runs."""
    timings = []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        call(model, faces)
        timings.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--write", type=Path, help="write the results as markdown here")
    args = parser.parse_args()

    faces, source = face_crops(args.faces)
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        checkpoint = Path(scratch) / "resnet50.pt"
        torch.save(ResNet50(40).state_dict(), checkpoint)
        model_file = convert_attribute_model(
            checkpoint, Path(scratch) / "celeba40-resnet50.onnx", input_size=INPUT_SIZE
        )
        contenders = [
            ("one face per call (batch_size=1)", 1, one_per_call),
            ("all faces, batch_size=8", 8, all_at_once),
            ("all faces, batch_size=32", 32, all_at_once),
        ]
        results = []
        for name, batch_size, call in contenders:
            model = OnnxAttributeModel(model_file, batch_size=batch_size)
            call(model, faces[: max(WARMUP_FACES, batch_size)])  # warm-up
            wall, cpu = best_of(args.runs, call, model, faces)
            results.append((name, wall, cpu))
            provider = model.session.get_providers()[0]
            del model
    baseline = len(faces) / results[0][1]
    shapes = [face.shape[:2] for face in faces]
    lines = [
        f"{len(faces)} {source}, {min(min(s) for s in shapes)}-{max(max(s) for s in shapes)} px,"
        f" ResNet-50 CelebA-40 (random weights) at {INPUT_SIZE} px, ONNX opset 17;"
        f" onnxruntime {onnxruntime.__version__} {provider} with its default threads;"
        f" {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}."
        f" Preprocessing included; best of {args.runs} after a warm-up.",
        "",
        "| contender | seconds | faces/s | CPU s per face | vs one per call |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {wall:.2f} | {len(faces) / wall:.1f} | {cpu / len(faces):.3f} |"
            f" {len(faces) / wall / baseline:.2f}x |"
            for name, wall, cpu in results
        ),
    ]
    print("\n".join(lines))
    if args.write:
        command = f"python bench/bench_attributes.py --faces {args.faces} --runs {args.runs}"
        write_section(args.write, "Attribute inference", command, lines)


if __name__ == "__main__":
    main()
