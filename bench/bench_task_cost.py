"""The fixed cost of a GPU task against its share of a 10,000-row shard's work, measured on CPU.

A GPU stage runs as one Airflow task per shard, each a process of its own: before it does a
shard's work it starts an interpreter, parses its DAG file, imports the pipeline and its
model library, loads the model (session creation, weights) and pays a first call's warm-up.
This script times those steps in fresh processes, the way a task meets them, for each GPU
stage with the model it runs offline: detect with the packaged RetinaFace; attribute with
the demo's image-statistics ONNX model (the offline default) and with a ResNet-50 CelebA-40
of random weights at 256 px (the production model's compute); caption with the tiny
random-weight Qwen2 in process (the demo's) and with the grammar alone (the template
backend). Against that, the per-item work of each stage, timed on a few hundred items after
the warm-up, extrapolated to a 10,000-row shard by the items a row yields (arguments).

Each child process reports, in seconds: `start` (from the parent's spawn to the child's first
statement: the interpreter), `airflow` (importing Airflow's DagBag, as the task runner has
it), `parse` (the build DAG file parsed), `facecaption` (the imports a stage task makes: the
Pipeline and the stage registry, i.e. every stage module), `libraries` (the backend's model
library: onnxruntime and OpenCV, or torch and transformers), `load` (the model loaded as the
stage loads it), `warm-up` (the first call on one batch minus the median of three more calls
on it, 0 when that is negative). The DAG parse alone (and with `--before REV`, the build DAG
file of that git revision) is also timed in fresh processes of its own. Medians over
`--reps` processes; the per-item work from one long pass.

    python bench/bench_task_cost.py [--items 200] [--reps 3] [--write docs/benchmarks.md]

No GPU is needed or used: every model runs on onnxruntime's or torch's CPU backend.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARD_ROWS = 10_000
PHASES = ("start", "airflow", "parse", "facecaption", "libraries", "load", "warm-up")
WARM_CALLS = 3  # calls on the first batch after the first: their median is the warm speed


# ---- the child: one task process's fixed steps, then (with --steady) the per-item work ----


def child(kind: str, spec_file: Path, spawned: float) -> None:
    marks = {"spawned": spawned, "started": time.monotonic()}
    spec = json.loads(spec_file.read_text())
    parsed = parse_dag(spec, marks)  # Airflow's imports, then the DAG file: as a task process
    if kind == "dag-parse":
        print(json.dumps(parsed))
        return
    marks["airflow"] = marks["started"] + parsed["airflow"]
    marks["parse"] = marks["airflow"] + parsed["parse"]
    from facecaption.core.pipeline import Pipeline  # noqa: F401  (what the operator imports)
    from facecaption.core.stage import stage_registry

    stage_registry()  # the runner builds it: every stage module
    marks["facecaption"] = time.monotonic()
    from facecaption.settings import Settings

    work = STAGE_WORK[kind]
    work.libraries()
    marks["libraries"] = time.monotonic()
    settings = Settings(**spec["settings"])
    model = work.load(settings)
    marks["load"] = time.monotonic()
    items = work.items(spec, settings)
    batch = items[: work.batch_size(settings)]
    calls = []
    for _ in range(1 + WARM_CALLS):
        before = time.monotonic()
        work.run(model, batch, settings)
        calls.append(time.monotonic() - before)
    phases = phase_seconds(marks)
    # a negative difference is noise on a shared machine: no warm-up to speak of
    phases["warm-up"] = max(0.0, calls[0] - statistics.median(calls[1:]))
    result = {"phases": phases, "batch": len(batch)}
    if spec.get("steady"):
        wall, cpu = time.perf_counter(), time.process_time()
        work.run(model, items, settings)
        result["steady"] = {
            "items": len(items),
            "wall": time.perf_counter() - wall,
            "cpu": time.process_time() - cpu,
        }
    again = time.monotonic()
    work.load(settings)  # the next shard's load in this process (`facecaption run`)
    result["load_again"] = time.monotonic() - again
    print(json.dumps(result))


def phase_seconds(marks: dict[str, float]) -> dict[str, float]:
    """Each phase's seconds from consecutive marks (`start`: spawn to first statement)."""
    order = ["spawned", "started", "airflow", "parse", "facecaption", "libraries", "load"]
    names = ["start", "airflow", "parse", "facecaption", "libraries", "load"]
    steps = zip(names, order[:-1], order[1:], strict=True)
    return {name: marks[after] - marks[before] for name, before, after in steps}


def parse_dag(spec: dict, marks: dict[str, float]) -> dict:
    """Airflow imported (as the task process has it), then the DAG file parsed."""
    home = spec["airflow_home"]
    os.environ.update(
        {
            "AIRFLOW_HOME": home,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        }
    )
    sys.path.insert(0, spec["plugins"])
    from airflow.dag_processing.dagbag import DagBag

    airflow_loaded = time.monotonic()
    before = set(sys.modules)
    bag = DagBag(dag_folder=spec["dag_file"])
    parsed = time.monotonic()
    if bag.import_errors:
        raise RuntimeError(f"the DAG file did not parse: {bag.import_errors}")
    new = set(sys.modules) - before
    return {
        "airflow": airflow_loaded - marks["started"],
        "parse": parsed - airflow_loaded,
        "modules": len(new),
        "heavy": sorted({name.split(".")[0] for name in new} & set(HEAVY)),
    }


HEAVY = ("pyarrow", "numpy", "PIL", "aiohttp", "onnxruntime", "torch", "transformers", "cv2")


class DetectWork:
    """Decode upright and detect, in the stage's batches (the stage adds alignment and crop
    encoding: within 10% of detection, see "Face detection")."""

    def libraries(self) -> None:
        import cv2  # noqa: F401
        import onnxruntime  # noqa: F401

    def load(self, settings):
        from facecaption.detect.stage import shard_detector

        return shard_detector(settings)

    def items(self, spec: dict, settings) -> list[bytes]:
        return [path.read_bytes() for path in sorted(Path(spec["items"]).glob("*.jpg"))]

    def batch_size(self, settings) -> int:
        return settings.detect.batch_size

    def run(self, detector, bodies: list[bytes], settings) -> None:
        from facecaption.core.imaging import decode_upright

        size = settings.detect.batch_size
        for start in range(0, len(bodies), size):
            chunk = bodies[start : start + size]
            detector.detect([decode_upright(b, settings.detect.max_pixels).pixels for b in chunk])


class AttributeWork:
    """Read the crops from a faces tar, predict in the stage's batches, apply the label rules:
    the stage's loop without its parquet write."""

    def libraries(self) -> None:
        import onnxruntime  # noqa: F401

    def load(self, settings):
        from facecaption.attribute.stage import shard_attribute_model

        return shard_attribute_model(settings)

    def items(self, spec: dict, settings) -> list[tuple[str, object]]:
        from facecaption.attribute.stage import face_crops

        with open(spec["items"], "rb") as tar:
            return list(face_crops(tar))

    def batch_size(self, settings) -> int:
        return settings.attribute.batch_size

    def run(self, model, faces: list, settings) -> None:
        from facecaption.attribute.labels import CELEBA_ATTRIBUTES, label_set

        limits = settings.attribute
        for start in range(0, len(faces), model.batch_size):
            chunk = faces[start : start + model.batch_size]
            for row in model.predict([crop for _, crop in chunk]):
                probabilities = dict(zip(CELEBA_ATTRIBUTES, row.tolist(), strict=True))
                label_set(probabilities, limits.threshold, limits.min_labels)


class CaptionWork:
    """Grammar, rewrite (asked again once when the fidelity check fails), fidelity check: the
    stage's `caption_faces`, in its chunks of PROMPTS_PER_CALL faces."""

    def libraries(self) -> None:
        from facecaption.caption.rewriters import load_rewriter  # noqa: F401

        if self.in_process:
            import torch  # noqa: F401
            import transformers  # noqa: F401

            from facecaption.caption.rewriters.in_process import TransformersRewriter  # noqa: F401

    def __init__(self, in_process: bool) -> None:
        self.in_process = in_process

    def load(self, settings):
        from facecaption.caption.stage import grammar_for, shard_rewriter

        grammar = grammar_for(settings.caption)
        return grammar, shard_rewriter(settings) if self.in_process else None

    def items(self, spec: dict, settings) -> list[dict]:
        return json.loads(Path(spec["items"]).read_text())

    def batch_size(self, settings) -> int:
        return settings.caption.batch_size

    def run(self, model, faces: list[dict], settings) -> None:
        from facecaption.caption.stage import PROMPTS_PER_CALL, caption_faces

        grammar, rewriter = model
        for start in range(0, len(faces), PROMPTS_PER_CALL):
            caption_faces(faces[start : start + PROMPTS_PER_CALL], grammar, settings.caption,
                          rewriter)  # fmt: skip


STAGE_WORK = {
    "detect": DetectWork(),
    "attribute": AttributeWork(),
    "caption": CaptionWork(in_process=True),
    "caption-template": CaptionWork(in_process=False),
}


# ---- the parent: inputs, models, child processes, the table ----


def run_child(kind: str, spec: dict, scratch: Path) -> dict:
    (scratch / "airflow").mkdir(exist_ok=True)
    spec_file = scratch / f"{kind}-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps({**spec, "airflow_home": str(scratch / "airflow")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACECAPTION_")}
    env["FACECAPTION_HOME"] = str(scratch / "home")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    spawned = time.monotonic()
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--spec", str(spec_file),
         "--spawned", repr(spawned)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{kind} child failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_inputs(scratch: Path, items: int, seed: int) -> dict[str, Path]:
    """JPEGs for detect (the packaged photos, cropped and resized as in "Face detection"), a
    faces tar of face crops for attribute, attribute rows for caption."""
    import random

    import numpy as np
    from bench_detect import make_photos
    from PIL import Image
    from support.sampledata import encode, package_file

    from facecaption.attribute.labels import CELEBA_ATTRIBUTES
    from facecaption.core.writers import WebDatasetWriter

    photos = scratch / "photos"
    photos.mkdir()
    for index, body in enumerate(make_photos(items, seed)):
        (photos / f"{index:05d}.jpg").write_bytes(body)

    rng = np.random.default_rng(seed)
    astronaut = package_file("skimage", "data/astronaut.png")
    face = Image.open(astronaut).convert("RGB").crop((125, 15, 305, 195)) if astronaut else None
    faces_tar = scratch / "faces.tar"
    with WebDatasetWriter(faces_tar) as writer:
        for index in range(items):
            size = tuple(int(s) for s in rng.integers(128, 301, 2))
            crop = (
                face.resize(size, Image.Resampling.BILINEAR)
                if face is not None
                else Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
            )
            key = f"{index:05d}_0"
            writer.write_json(key, encode(crop, "PNG"), "png", {"face_id": key})

    chooser = random.Random(seed)
    rows = []
    for index in range(items):
        valid = sorted(chooser.sample(CELEBA_ATTRIBUTES, chooser.randint(5, 10)))
        rows.append(
            {
                "face_id": f"{index:05d}_0",
                "valid_labels": valid,
                **{f"p_{name}": 0.95 if name in valid else 0.05 for name in CELEBA_ATTRIBUTES},
            }
        )
    captions = scratch / "faces.json"
    captions.write_text(json.dumps(rows))
    return {"detect": photos, "attribute": faces_tar, "caption": captions}


def make_models(scratch: Path) -> dict[str, Path]:
    import torch
    from support.statistics_model import build_statistics_model
    from support.tiny_llm import build_tiny_qwen2

    from facecaption.attribute.conversion import convert_attribute_model
    from facecaption.attribute.resnet import ResNet50

    models = scratch / "models"
    torch.manual_seed(0)
    checkpoint = models / "resnet50.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save(ResNet50(40).state_dict(), checkpoint)
    return {
        "statistics": build_statistics_model(models / "demo-image-statistics.onnx"),
        "resnet50": convert_attribute_model(
            checkpoint, models / "celeba40-resnet50.onnx", input_size=256
        ),
        "tiny-qwen2": build_tiny_qwen2(models / "demo-tiny-qwen2"),
    }


def contenders(models: dict[str, Path], inputs: dict[str, Path]) -> list[tuple[str, str, dict]]:
    """(row name, child kind, spec) of each stage and model measured."""
    cpu = ["CPUExecutionProvider"]
    return [
        ("detect: packaged RetinaFace (MobileNet-0.25, 1024 px)", "detect",
         {"settings": {"detect": {"backend": "retinaface", "providers": cpu}},
          "items": str(inputs["detect"])}),
        ("attribute: the demo's image-statistics model (a stand-in: tiny work)", "attribute",
         {"settings": {"attribute": {"model_path": str(models["statistics"]), "providers": cpu}},
          "items": str(inputs["attribute"])}),
        ("attribute: ResNet-50 CelebA-40 shape, random weights (256 px)", "attribute",
         {"settings": {"attribute": {"model_path": str(models["resnet50"]), "providers": cpu}},
          "items": str(inputs["attribute"])}),
        ("caption: tiny Qwen2 in process (the demo's, at most 24 new tokens)", "caption",
         {"settings": {"caption": {"backend": "transformers", "max_new_tokens": 24,
                                   "model_path": str(models["tiny-qwen2"])}},
          "items": str(inputs["caption"])}),
        ("caption: grammar only (template backend)", "caption-template",
         {"settings": {"caption": {"backend": "template"}}, "items": str(inputs["caption"])}),
    ]  # fmt: skip


def measure(kind: str, spec: dict, reps: int, scratch: Path) -> dict:
    spec = {**spec, "dag_file": str(REPO / "dags" / "facecaption_build.py")}
    spec["plugins"] = str(REPO / "plugins")
    runs = [run_child(kind, {**spec, "steady": rep == 0}, scratch) for rep in range(reps)]
    phases = {p: statistics.median(run["phases"][p] for run in runs) for p in PHASES}
    return {
        "phases": phases,
        "steady": runs[0]["steady"],
        "batch": runs[0]["batch"],
        "load_again": statistics.median(run["load_again"] for run in runs),
    }


def measure_dag_parse(dag_file: Path, reps: int, scratch: Path) -> dict:
    spec = {"dag_file": str(dag_file), "plugins": str(REPO / "plugins")}
    runs = [run_child("dag-parse", spec, scratch) for _ in range(reps)]
    return {
        "airflow": statistics.median(run["airflow"] for run in runs),
        "parse": statistics.median(run["parse"] for run in runs),
        "modules": runs[0]["modules"],
        "heavy": runs[0]["heavy"],
    }


def build_dag_at(rev: str, scratch: Path) -> Path:
    """The build DAG file as it was at git revision `rev` (parsed against today's library)."""
    path = scratch / f"dags-{rev}" / "facecaption_build.py"
    path.parent.mkdir()
    text = subprocess.run(
        ["git", "show", f"{rev}:dags/facecaption_build.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200, help="images, faces: per-item pass")
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--images-per-row", type=float, default=0.84,
        help="images detect gets per source row (fetch's kept share, Fetch vs img2dataset)",
    )  # fmt: skip
    parser.add_argument(
        "--faces-per-row",
        type=float,
        default=0.3,
        help="faces attribute and caption get per source row (FaceCaption-15M: 15M captions"
        " from LAION-Face's 50M rows)",
    )
    parser.add_argument(
        "--before", help="git revision whose build DAG file to parse too, for comparison"
    )
    parser.add_argument("--write", type=Path, help="write the results as markdown here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.spec, args.spawned)
        return
    report(args)


def report(args: argparse.Namespace) -> None:
    import platform

    import benchreport  # noqa: F401  (puts tests/ on sys.path for `support`)
    import onnxruntime
    import torch

    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fc-bench-task-") as name:
        scratch = Path(name)
        inputs = make_inputs(scratch, args.items, args.seed)
        models = make_models(scratch)
        print(f"inputs and models ready in {time.perf_counter() - wall:.0f} s", flush=True)
        dag = measure_dag_parse(REPO / "dags" / "facecaption_build.py", args.reps, scratch)
        print(f"build DAG parse: {dag}", flush=True)
        before = None
        if args.before:
            before = measure_dag_parse(build_dag_at(args.before, scratch), args.reps, scratch)
            print(f"build DAG parse at {args.before}: {before}", flush=True)
        results = []
        for row, kind, spec in contenders(models, inputs):
            result = measure(kind, spec, args.reps, scratch)
            print(f"{row}: {result}", flush=True)
            results.append((row, kind, result))
    load = os.getloadavg()[0]
    lines = [
        f"CPU only (no GPU was lent to this work): {platform.machine()}, {os.cpu_count()} cores"
        f" shared with other work (load average {load:.1f} at the end), Python"
        f" {platform.python_version()}, onnxruntime {onnxruntime.__version__} CPU provider,"
        f" torch {torch.__version__}. Whole run {(time.perf_counter() - wall) / 60:.1f} min."
        f" Fixed steps: medians of {args.reps} fresh processes each (files already in the OS"
        f" cache); per-item work: one pass over {args.items} items after the warm-up, the"
        " stage's batch sizes. A 10,000-row shard gives detect"
        f" {args.images_per_row * SHARD_ROWS:,.0f} images ({args.images_per_row:.0%} of rows"
        f" fetched) and attribute and caption {args.faces_per_row * SHARD_ROWS:,.0f} faces"
        f" ({args.faces_per_row} per row: FaceCaption-15M's yield from LAION-Face).",
        "",
        f"Parsing the build DAG file, as every task process does before it runs (Airflow"
        f" imported first, {dag['airflow']:.2f} s): **{dag['parse']:.2f} s**, {dag['modules']}"
        f" modules imported, heavy ones: {', '.join(dag['heavy']) or 'none'}."
        + (
            f" The same file at {args.before}, which built the stage list from the stage"
            f" registry: {before['parse']:.2f} s, {before['modules']} modules, heavy ones:"
            f" {', '.join(before['heavy']) or 'none'}."
            if before
            else ""
        ),
        "",
        "| stage: model | start s | Airflow imports s | DAG parse s | facecaption imports s |"
        " model library imports s | model load s | warm-up s | fixed s |"
        " load again, same process s | work per item ms (CPU) | 10k-row shard work s |"
        " fixed / shard work | GPU speed-up at which fixed = work |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, kind, result in results:
        phases, steady = result["phases"], result["steady"]
        fixed = sum(phases.values())
        per_item = steady["wall"] / steady["items"]
        per_row = args.images_per_row if kind == "detect" else args.faces_per_row
        shard = per_item * per_row * SHARD_ROWS
        lines.append(
            f"| {row} | {phases['start']:.2f} | {phases['airflow']:.2f} |"
            f" {phases['parse']:.2f} | {phases['facecaption']:.2f} |"
            f" {phases['libraries']:.2f} | {phases['load']:.2f} | {phases['warm-up']:.2f} |"
            f" {fixed:.2f} | {result['load_again']:.3f} |"
            f" {1000 * per_item:.1f} ({1000 * steady['cpu'] / steady['items']:.1f})"
            f" | {shard:.0f} | {fixed / shard:.1%} |"
            f" {f'{shard / fixed:.0f}x' if shard > fixed else 'below 1x'} |"
        )
    lines += [
        "",
        "Fixed s: the seven steps, Airflow's imports and the DAG parse included (the"
        " facecaption imports come after Airflow's, which already hold SQLAlchemy, pydantic"
        " and fsspec, as in a task process); Airflow's scheduling, the task runner's"
        ' supervisor and its API calls come on top (see "Airflow per shard" in "Scale:'
        ' LAION-Face size").'
        " Load again: the stage asking for its model a second time in"
        " the same process, as the next shard of a `facecaption run` does (the loaded model is"
        " reused, see `facecaption/models/loaded.py`): what such a shard pays instead of the"
        " load and warm-up; an Airflow task is a new process and pays them every time. Work"
        " per item: wall ms per image (detect) or face, CPU ms in brackets. The last column:"
        " how many times faster than this CPU a GPU would have to do the stage's work for the"
        " fixed cost to equal it (the shard's work divided by the fixed cost).",
        "",
        "Reading it: on this CPU a GPU stage's fixed cost is a small share of a 10,000-row"
        " shard's work in that stage (the ResNet-50 and RetinaFace rows; the stand-in rows do"
        " next to no work, and the tiny Qwen2's replies are noise that fail the fidelity check"
        " and are asked again, so its per-face figure says little about a real LLM's). What"
        " every task pays is mostly Airflow's own imports; ours are the DAG parse and the"
        " pipeline's imports (every stage module, pyarrow); an in-process LLM adds torch and"
        " transformers and its weights: a"
        " real 1.5B to 7B model reads 3 to 15 GB, and on a GPU each task also creates its CUDA"
        " context and moves the weights to the device, none of which a CPU run can measure."
        " Warm-ups are within the noise of this shared machine. On a GPU the stage's work"
        " shrinks by the GPU's speed-up over this CPU; past the last column's factor the"
        " task is mostly fixed cost, before Airflow's scheduling is counted. Cut here: the"
        " DAG parse without the stages (the comparison above) and, where one process runs"
        " many shards (`facecaption run`), the model loaded once (the load-again column). For"
        " Airflow, where each task is a process: bigger shards (the cost is per task), captions"
        ' from a long-lived model server (`caption.backend = "openai"`, the compose file\'s'
        " `vllm`: the task loads no weights and needs no GPU), or a shard's GPU stages in one"
        " task (not done: it changes the DAG's shape).",
    ]
    print("\n".join(lines))
    if args.write:
        command = f"python bench/bench_task_cost.py --items {args.items} --reps {args.reps}"
        command += f" --before {args.before}" if args.before else ""
        from benchreport import write_section

        write_section(args.write, "GPU task fixed cost", command + f" --write {args.write}",
                      lines)  # fmt: skip


if __name__ == "__main__":
    main()
