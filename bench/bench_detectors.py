"""The three detector backends side by side in one run, on the same images: the packaged
RetinaFace (the offline default), OpenCV's cascade, and insightface's SCRFD path with an
SCRFD-10G-like network of random weights (`bench_detect_model.py`: the production path's
compute; its faces mean nothing).

Each contender decodes the JPEGs upright and detects in batches of 8, as the detect stage
drives it, with the stage's own settings (`load_detector`: the backend's input side, candidate
scores, the cascade's minimum size). Counted: images/s, CPU per image, candidates after NMS,
faces at the backend's keep score (`min_score` 0.98, the cascade's `cascade_min_score`), and
on insightface's t1.jpg (six people, two with tilted heads) the faces at the keep score that
overlap a face of the six (IoU >= 0.5 with the boxes below: RetinaFace's, each checked by eye on
the photo, so they favour its box shape a little) and those that do not.

    python bench/bench_detectors.py [--images 32] [--reps 2] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import cv2
import onnxruntime
from bench_detect import letterboxed_blobs, make_photos, ours, timed
from bench_detect_model import build_onnx
from benchreport import write_section
from support.sampledata import packaged_photos

from facecaption.core.imaging import decode_upright
from facecaption.detect.backends import load_detector
from facecaption.detect.stage import keep_score_for
from facecaption.settings import DetectSettings, Settings

CPU = ["CPUExecutionProvider"]
BATCH = 8
CALIBRATION_IMAGES = 14
# The six faces of insightface's t1.jpg (1280 x 886), x1, y1, x2, y2: RetinaFace's boxes at
# 1024 px, each checked by eye to frame one face.
T1_FACES = [
    (59, 256, 170, 399), (270, 145, 370, 273), (467, 268, 574, 414),
    (746, 344, 846, 476), (902, 57, 1009, 206), (1131, 277, 1224, 398),
]  # fmt: skip


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2, help="timed runs each; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, help="write the results as markdown here")
    args = parser.parse_args()

    bodies = make_photos(args.images, args.seed)
    t1_path = packaged_photos().get("t1.jpg")
    t1 = decode_upright(t1_path.read_bytes(), 10**9).pixels if t1_path else None
    with tempfile.TemporaryDirectory() as scratch:
        model_file = Path(scratch) / "scrfd_random.onnx"
        build_onnx(model_file, letterboxed_blobs(bodies[:CALIBRATION_IMAGES]), args.seed)

        def settings(**detect: object) -> Settings:
            return Settings(home=Path(scratch), detect=DetectSettings(providers=CPU, **detect))

        backends = {
            "retinaface (packaged MobileNet-0.25, 1024 px)": settings(backend="retinaface"),
            "cascade (OpenCV Haar)": settings(backend="cascade"),
            "insightface SCRFD-10G-like, random weights (640 px)": settings(
                backend="insightface", model_path=str(model_file)
            ),
        }
        contenders = []
        for name, chosen in backends.items():
            detector = load_detector(chosen)
            keep = keep_score_for(detector.backend, chosen.detect)
            contenders.append((name, detector, keep, ours(detector, BATCH)))
        for _name, _detector, _keep, contender in contenders:
            contender(bodies[:BATCH])  # warm-up
        print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        best: dict[str, dict] = {}
        for rep in range(args.reps):
            for name, _detector, _keep, contender in contenders:
                result = timed(contender, bodies)
                print(f"run {rep + 1}: {name}: {result}", flush=True)
                if name not in best or result["wall"] < best[name]["wall"]:
                    best[name] = result
        print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
        rows = []
        for name, detector, keep, _contender in contenders:
            images = [decode_upright(body, 10**9).pixels for body in bodies]
            found = [f for faces in detector.detect(images) for f in faces]
            kept = sum(face.score >= keep for face in found)
            t1_cells = ["", ""]
            if t1 is not None:
                [t1_found] = detector.detect([t1])
                confident = [f for f in t1_found if f.score >= keep]
                hits = sum(any(iou(f.box, true) >= 0.5 for f in confident) for true in T1_FACES)
                extra = sum(all(iou(f.box, true) < 0.5 for true in T1_FACES) for f in confident)
                t1_cells = [f"{hits}/6", str(extra)]
            rows.append((name, best[name], len(found), kept, keep, *t1_cells))
    baseline = args.images / best[contenders[1][0]]["wall"]  # the cascade
    lines = [
        f"{args.images} JPEGs (the packaged photos cropped and resized to 645-1598 px long side,"
        " as in the face detection benchmark), decoded upright and detected in batches of"
        f" {BATCH} with each backend's stage settings. onnxruntime {onnxruntime.__version__} CPU"
        f" provider, default threads; OpenCV {cv2.__version__}; {platform.machine()},"
        f" {os.cpu_count()} cores, Python {platform.python_version()}. Best of {args.reps} runs"
        " after a warm-up; CPU time is the whole process's and includes decoding.",
        "",
        "| backend | images/s | CPU s / image | vs cascade | candidates | faces at keep score"
        " | t1.jpg: of 6 faces found | t1.jpg: other boxes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result, found, kept, keep, hits, extra in rows:
        rate = args.images / result["wall"]
        lines.append(
            f"| {name} | {rate:.2f} | {result['cpu'] / args.images:.3f} |"
            f" {rate / baseline:.2f}x | {found} | {kept} (>= {keep:g}) | {hits} | {extra} |"
        )
    lines += [
        "",
        "The SCRFD row measures the production path's compute only: its weights are random, so"
        " its faces are noise (its scores are calibrated to give a few candidates per image)."
        " Real insightface packs are pulled with `facecaption models pull detector`.",
    ]
    print("\n".join(lines))
    if args.write:
        command = (
            f"python bench/bench_detectors.py --images {args.images} --reps {args.reps}"
            f" --seed {args.seed}"
        )
        write_section(args.write, "Detector backends", command, lines)


if __name__ == "__main__":
    main()
