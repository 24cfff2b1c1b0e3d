"""The `facecaption` command: db, plan, run, status, publish, report, takedown, models,
text-stats, config, doctor, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from facecaption.core.redaction import redact_text, redacted_settings
from facecaption.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by train-attributes
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `facecaption status | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (keeps the interpreter's flush quiet)
        return 0
    except (LookupError, ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"facecaption: error: {redact_text(str(error))}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facecaption", description="Build face image-text datasets from image URL lists."
    )
    commands = parser.add_subparsers(metavar="COMMAND")

    db = commands.add_parser("db", help="state DB: migrations and the embedded server")
    db_commands = db.add_subparsers(metavar="ACTION", required=True)
    db_commands.add_parser("upgrade", help="apply pending migrations (idempotent)").set_defaults(
        handler=_db_upgrade
    )
    db_commands.add_parser("version", help="print the applied schema version").set_defaults(
        handler=_db_version
    )
    db_commands.add_parser(
        "stop-embedded", help="stop the embedded Postgres under the home dir"
    ).set_defaults(handler=_db_stop)

    plan = commands.add_parser("plan", help="cut source parquet files into registered shards")
    plan.add_argument("sources", nargs="+", help="parquet files, folders or globs (fsspec URLs)")
    plan.set_defaults(handler=_plan)

    run = commands.add_parser("run", help="run stages on shards in this process (no Airflow)")
    run.add_argument("--source", action="append", default=[], help="plan and run this source")
    run.add_argument("--shard", action="append", default=[], help="run only this shard id")
    run.add_argument("--stage", action="append", default=[], help="stages to run (default all)")
    run.add_argument(
        "--force",
        action="store_true",
        help="re-run shards that are done (fetch and caption keep their final rows and faces and"
        " retry the transient failures at once)",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="with --force (implied): redo every row and face, the final ones too (fetch asks"
        " every URL again, caption asks the LLM for every face) and start retry budgets over",
    )
    run.add_argument(
        "--retry-transient",
        action="store_true",
        help="also run done stages that left retryable work that is due (fetch rows and caption"
        " faces that failed transiently, once their pause between runs has passed)",
    )
    run.add_argument(
        "--jobs", type=int, default=1, help="shards run at once, one process each (e.g. cores)"
    )
    run.set_defaults(handler=_run)

    status = commands.add_parser("status", help="shards x stages table with counts")
    status.add_argument("--shard", action="append", default=None, help="only these shards")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    export = commands.add_parser(
        "publish",
        aliases=["export"],
        help="publish the release: parquet files, training shards, manifest (incremental)",
    )
    export.add_argument(
        "--training-shards",
        action="store_true",
        default=None,
        help="also write webdataset training shards (default: the export.training_shards setting)",
    )
    export.add_argument("--no-report", action="store_true", help="skip writing the HTML report")
    export.set_defaults(handler=_publish)

    report = commands.add_parser("report", help="write the self-contained HTML dataset report")
    report.add_argument(
        "--out", default=None, help="a local file (default: release/report.html in the store)"
    )
    report.add_argument(
        "--max-crops", type=int, default=None, help="crops scored with BRISQUE (default: setting)"
    )
    report.set_defaults(handler=_report)

    takedown = commands.add_parser(
        "takedown", help="remove images from every release output and skip them from now on"
    )
    takedown_commands = takedown.add_subparsers(metavar="ACTION", required=True)
    request = takedown_commands.add_parser(
        "request", help="record a request and apply it (re-export the affected shards)"
    )
    request.add_argument("--url", action="append", default=[], help="an image URL (repeatable)")
    request.add_argument(
        "--sha256", action="append", default=[], help="an image's sha256 (repeatable)"
    )
    request.add_argument("--reason", default=None)
    request.add_argument("--requested-by", default=None)
    request.add_argument(
        "--no-apply", action="store_true", help="only record it (the next export applies it)"
    )
    request.set_defaults(handler=_takedown_request)
    takedown_commands.add_parser("list", help="requests and their audit trail").set_defaults(
        handler=_takedown_list
    )

    models = commands.add_parser("models", help="the model cache: pull and list real weights")
    model_commands = models.add_subparsers(metavar="ACTION", required=True)
    pull = model_commands.add_parser(
        "pull",
        help="download a model into the cache and record its sha256s (needs internet)",
        description="detector: an insightface pack; llm REPO: a chat model from the Hugging"
        " Face Hub; attributes --hf REPO: a transformers CelebA-40 classifier from the Hub;"
        " attributes --url: an ONNX classifier with its sidecar.",
    )
    pull.add_argument("kind", choices=["detector", "attributes", "llm"], help="which model")
    pull.add_argument(
        "repo", nargs="?", default=None, help="llm: the Hub repo, e.g. Qwen/Qwen2.5-1.5B-Instruct"
    )
    pull.add_argument("--hf", default=None, metavar="REPO", help="attributes: a Hub repo")
    pull.add_argument("--revision", default=None, help="Hub: branch, tag or commit (default main)")
    pull.add_argument(
        "--replace",
        action="store_true",
        help="Hub: install over another repo or commit kept under the same name",
    )
    pull.add_argument("--pack", default=None, help="detector: insightface pack (default: setting)")
    pull.add_argument("--url", default=None, help="download from here (attributes: the .onnx)")
    pull.add_argument("--sidecar-url", default=None, help="attributes: its sidecar .json")
    pull.add_argument(
        "--name", default=None, help="cache name (Hub: the repo's name; --url: the setting)"
    )
    pull.add_argument("--sha256", default=None, help="the download's expected sha256 (pin)")
    pull.set_defaults(handler=_models_pull)
    model_commands.add_parser("list", help="what the cache holds").set_defaults(
        handler=_models_list
    )
    export = model_commands.add_parser(
        "convert-attributes",
        aliases=["export-attributes"],
        help="turn a torchvision-layout ResNet-50 CelebA-40 checkpoint into ONNX + sidecar",
    )
    export.add_argument("checkpoint", help="a torch state_dict (.pt/.pth)")
    export.add_argument("--name", default=None, help="cache name (default: the setting)")
    export.add_argument("--input-size", type=int, default=256, help="the model's input side")
    export.add_argument("--interpolation", default="bicubic", help="resize filter (Pillow)")
    export.add_argument("--mean", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    export.add_argument("--std", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    export.set_defaults(handler=_models_convert)
    _train_attributes_parser(model_commands)

    stats = commands.add_parser(
        "text-stats", help="words per caption and distinct 4-grams: raw text vs LLM captions"
    )
    stats.add_argument("--shard", action="append", default=None, help="only these shards")
    stats.set_defaults(handler=_text_stats)

    config = commands.add_parser("config", help="print the effective settings")
    config.set_defaults(handler=_config)

    doctor = commands.add_parser(
        "doctor", help="per model stage: which model would run, its identity, where it came from"
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(handler=_doctor)

    demo = commands.add_parser(
        "demo", help="build a sample source, serve it on loopback, run the build DAG in Airflow"
    )
    demo.add_argument("--shard-size", type=int, default=8, help="rows per demo shard")
    demo.set_defaults(handler=_demo)
    return parser


def _train_attributes_parser(model_commands) -> None:  # noqa: ANN001
    from facecaption.attribute.options import (
        ALIGN_CHOICES,
        CALIBRATIONS,
        PRECISIONS,
        TrainingConfig,
    )

    defaults = TrainingConfig(dataset="", backbone="", name="", work_dir=None)  # type: ignore[arg-type]
    train = model_commands.add_parser(
        "train-attributes",
        help="fine-tune a pretrained image model on CelebA into a calibrated 40-attribute"
        " classifier and install it in the cache (needs the dataset; a GPU for real use)",
        description="Train, calibrate (on valid), evaluate (on test), export (ONNX + sidecar,"
        " transformers) and install under --name (default: the attribute.model setting, which"
        " makes it the model the attribute stage runs). A killed run started again with the"
        " same options resumes from its last checkpoint. See docs/attribute-model.md.",
    )
    train.add_argument(
        "--dataset",
        required=True,
        help="a Hub dataset id[:config], e.g. flwrlabs/celeba:img_align+identity+attr, or a local"
        " folder of parquet files in that schema (train-*, valid-*, test-*)",
    )
    train.add_argument(
        "--backbone",
        required=True,
        help="a Hub id or local folder of a pretrained transformers image model, e.g."
        " microsoft/resnet-50",
    )
    train.add_argument("--name", default=None, help="cache name (default: the setting)")
    train.add_argument("--revision", default=None, help="the backbone's Hub revision")
    train.add_argument("--dataset-revision", default=None, help="the dataset's Hub revision")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr, help="AdamW peak learning rate")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument(
        "--input-size",
        type=int,
        default=defaults.input_size,
        help="the model's input side (default: the attribute models' %(default)s px)",
    )
    train.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU",
    )
    train.add_argument(
        "--balanced",
        action="store_true",
        help="class-balanced loss: pos_weight = negatives / positives per attribute",
    )
    train.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default=defaults.calibration,
        help="per-attribute temperature, or Platt (temperature and shift); auto: platt with"
        " --balanced, else temperature",
    )
    train.add_argument(
        "--align",
        choices=ALIGN_CHOICES,
        default=defaults.align,
        help="five points for the pipeline's alignment: the dataset's landmark columns, the"
        " face detector, or CelebA's fixed aligned landmarks (auto: columns, else detector)",
    )
    train.add_argument(
        "--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps"
    )
    train.add_argument("--workers", type=int, default=defaults.workers, help="loader processes")
    train.add_argument("--limit", type=int, default=None, help="rows per split (a quick try)")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    train.add_argument(
        "--work-dir", default=None, help="checkpoints (default: {home}/training/NAME)"
    )
    train.add_argument(
        "--replace", action="store_true", help="install over a model already under the name"
    )
    train.add_argument("--restart", action="store_true", help="ignore the work folder's checkpoint")
    train.set_defaults(handler=_models_train)


def _db_upgrade(args: argparse.Namespace) -> int:
    from facecaption.state.db import create_state_engine, current_version, upgrade

    engine = create_state_engine(Settings())
    applied = upgrade(engine)
    for migration in applied:
        print(f"applied {migration.version:04d}_{migration.name}")
    print(f"schema version {current_version(engine)}")
    return 0


def _db_version(args: argparse.Namespace) -> int:
    from facecaption.state.db import create_state_engine, current_version

    print(current_version(create_state_engine(Settings())))
    return 0


def _db_stop(args: argparse.Namespace) -> int:
    from facecaption.state.db import stop_embedded_postgres

    stopped = stop_embedded_postgres(Settings().home_dir)
    print("stopped" if stopped else "not running")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from facecaption.core.pipeline import Pipeline

    with Pipeline.open() as pipeline:
        report = pipeline.plan(args.sources)
    for source in report.sources:
        print(
            f"{source.uri}: {source.num_rows} rows, {len(source.shard_ids)} shards"
            f" ({source.new_shards} new), source {source.source_id[:12]}"
        )
    for error in report.errors.values():
        print(f"facecaption: error: {error}", file=sys.stderr)
    return 1 if report.errors else 0


EXIT_BUSY = 75  # EX_TEMPFAIL: nothing failed, but some work is still running elsewhere


def _run(args: argparse.Namespace) -> int:
    """Exit 0 when every chosen stage of every chosen shard is done (here or by another
    worker), 1 when some failed or a source could not be planned, EXIT_BUSY when the rest is
    done but some shard's stage was still held by another worker after waiting
    `busy_wait_s`."""
    from facecaption.core.pipeline import Pipeline, run_shards
    from facecaption.core.progress import LineProgress, TerminalProgress
    from facecaption.core.status import stage_summaries
    from facecaption.models.preflight import require_stage_models

    settings = Settings()
    with Pipeline.open(settings) as pipeline:
        stages = args.stage or pipeline.stage_names
        require_stage_models(settings, stages)  # before planning or downloading anything
        selection = pipeline.select_work(args.source, args.shard, stages=stages)
    # A source file that cannot be planned is named now, the others still run.
    for error in selection.plan_errors.values():
        print(f"facecaption: error: {error}", file=sys.stderr)
    # a terminal gets live lines per shard; logs and pipes a line per finished stage
    live = sys.stdout.isatty()
    progress = TerminalProgress(sys.stdout, stages) if live else LineProgress(sys.stdout)
    last = {}
    try:
        for shard_run in run_shards(
            settings, selection.shard_ids, stages, force=args.force or args.fresh,
            fresh=args.fresh, retry_transient=args.retry_transient, jobs=args.jobs,
            progress=progress,
        ):  # fmt: skip
            last[shard_run.shard_id] = shard_run
            if shard_run.busy:
                if shard_run.waited:
                    then = f"still busy after waiting {settings.busy_wait_s:g} s"
                elif settings.busy_wait_s > 0:
                    then = "skipped; tried again after the other shards"
                else:
                    then = "skipped"
                print(f"{shard_run.shard_id} {shard_run.busy} ({then})", file=sys.stderr)
            if shard_run.error:
                print(f"{shard_run.shard_id} {shard_run.error}", file=sys.stderr)
    finally:
        progress.close()
    with Pipeline.open(settings) as pipeline:
        rows = pipeline.status(selection.shard_ids, artifacts=False)
        print("\n".join(stage_summaries(rows, stages)))
    if selection.plan_errors:
        print(
            f"facecaption: not all chosen work was done: {len(selection.plan_errors)} source"
            f" file(s) could not be planned: {', '.join(selection.plan_errors)}",
            file=sys.stderr,
        )
    if selection.plan_errors or any(shard_run.error for shard_run in last.values()):
        return 1
    return EXIT_BUSY if any(shard_run.busy for shard_run in last.values()) else 0


def _status(args: argparse.Namespace) -> int:
    from facecaption.core.pipeline import Pipeline
    from facecaption.core.status import format_status, status_json

    with Pipeline.open() as pipeline:
        rows = pipeline.status(args.shard, artifacts=args.json)
    print(json.dumps(status_json(rows), indent=2) if args.json else format_status(rows))
    return 0


def _publish(args: argparse.Namespace) -> int:
    from facecaption.core.pipeline import Pipeline
    from facecaption.release.publish import publish_release
    from facecaption.release.report import write_report

    settings = Settings()
    if args.training_shards:
        settings = _with_export(settings, training_shards=True)
    with Pipeline.open(settings) as pipeline:
        report = publish_release(pipeline)
        print(json.dumps(report.summary(), indent=2))
        if not args.no_report:
            print(f"report: {write_report(pipeline)}")
    return 0


def _with_export(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"export": settings.export.model_copy(update=changes)})


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from facecaption.core.pipeline import Pipeline
    from facecaption.release.report import write_report

    settings = Settings()
    if args.max_crops is not None:
        settings = settings.model_copy(
            update={
                "export": settings.export.model_copy(update={"report_max_crops": args.max_crops})
            }
        )
    with Pipeline.open(settings) as pipeline:
        print(write_report(pipeline, Path(args.out) if args.out else None))
    return 0


def _takedown_request(args: argparse.Namespace) -> int:
    from facecaption.core.pipeline import Pipeline
    from facecaption.release.publish import publish_release
    from facecaption.release.takedowns import request_takedown

    with Pipeline.open() as pipeline:
        request_id = request_takedown(
            pipeline, args.url, args.sha256, args.reason, args.requested_by
        )
        print(f"takedown request {request_id} recorded")
        if not args.no_apply:
            report = publish_release(pipeline)
            print(json.dumps(report.summary(), indent=2))
    return 0


def _takedown_list(args: argparse.Namespace) -> int:
    from facecaption.core.pipeline import Pipeline
    from facecaption.state.takedowns import TakedownIndex

    with Pipeline.open() as pipeline:
        for request in TakedownIndex(pipeline.state.engine).list():
            print(json.dumps(request.__dict__, default=str, sort_keys=True))
    return 0


def _models_pull(args: argparse.Namespace) -> int:
    from facecaption.models.cache import ModelCache

    settings = Settings()
    cache = ModelCache(settings.model_cache_dir)
    if args.kind == "llm" or args.hf:
        return _pull_from_hub(args, settings, cache)
    if args.kind == "attributes":
        if not (args.url and args.sidecar_url):
            raise ValueError(
                "pull attributes needs --hf REPO (a transformers classifier on the Hugging Face"
                " Hub), or --url (the .onnx) and --sidecar-url"
            )
        key = f"attributes/{args.name or settings.attribute.model}"
        where = cache.pull_attribute_model(
            key.split("/", 1)[1], args.url, args.sidecar_url, args.sha256
        )
    else:
        key = args.pack or settings.detect.model_pack
        where = cache.pull(key, url=args.url, sha256=args.sha256)
    entry = cache.manifest()[key]
    print(f"{key}: installed in {where}")
    print(
        f"sha256 {entry['archive_sha256']}"
        + (
            ""
            if entry["pinned"]
            else " (not pinned: recorded now, later pulls must match; pin it with --sha256)"
        )
    )
    for name, digest in entry["files"].items():
        print(f"  {name}  {digest}")
    return 0


def _pull_from_hub(args: argparse.Namespace, settings: Settings, cache) -> int:  # noqa: ANN001
    from facecaption.models.hub import pull_hub_model

    repo = args.repo if args.kind == "llm" else args.hf
    if not repo:
        raise ValueError(
            "pull llm needs the Hub repo, e.g. `facecaption models pull llm"
            " Qwen/Qwen2.5-1.5B-Instruct`"
        )
    pulled = pull_hub_model(
        cache, args.kind, repo, revision=args.revision, name=args.name, replace=args.replace
    )
    print(f"{pulled.key}: installed in {pulled.folder}")
    print(f"from {pulled.repo}@{pulled.commit}" + (f" ({args.revision})" if args.revision else ""))
    for name, digest in pulled.files.items():
        print(f"  {name}  {digest}")
    name = pulled.folder.name
    if args.kind == "llm" and (name != settings.caption.model or settings.caption.model_path):
        print(f"to use it: FACECAPTION_CAPTION__MODEL={name} (or caption.model in the TOML file)")
    if args.kind == "attributes" and (
        name != settings.attribute.model or settings.attribute.model_path
    ):
        print(
            f"to use it: FACECAPTION_ATTRIBUTE__MODEL={name} (or attribute.model in the TOML file)"
        )
    return 0


def _models_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from facecaption.attribute.conversion import convert_attribute_model
    from facecaption.models.cache import ModelCache

    settings = Settings()
    name = args.name or settings.attribute.model
    out = ModelCache(settings.model_cache_dir).attribute_model(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = convert_attribute_model(
        Path(args.checkpoint),
        out,
        input_size=args.input_size,
        interpolation=args.interpolation,
        mean=tuple(args.mean),
        std=tuple(args.std),
        name=name,
    )
    print(f"exported {path} and {path.with_suffix('.json').name}; onnxruntime matches torch")
    return 0


def _models_train(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from facecaption.attribute.training import TrainingConfig, train_and_install

    settings = Settings()
    name = args.name or settings.attribute.model
    config = TrainingConfig(
        dataset=args.dataset,
        backbone=args.backbone,
        name=name,
        work_dir=Path(args.work_dir) if args.work_dir else settings.home_dir / "training" / name,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        input_size=args.input_size,
        precision=args.precision,
        balanced=args.balanced,
        calibration=args.calibration,
        checkpoint_every=args.checkpoint_every,
        workers=args.workers,
        align=args.align,
        seed=args.seed,
        limit=args.limit,
        device=args.device,
        replace=args.replace,
        restart=args.restart,
        backbone_revision=args.revision,
        dataset_revision=args.dataset_revision,
    )
    trained = train_and_install(config, settings, command=shlex.join(["facecaption", *args.argv]))
    mean = trained.report["mean"]
    installed = trained.installed
    print(f"{installed.key}: installed {installed.onnx} (+ .json) and {installed.folder}")
    print(f"model card: {installed.card}")
    print(
        f"test: mean accuracy {mean['accuracy']:.4f}, balanced accuracy"
        f" {mean['balanced_accuracy']:.4f}, F1 {mean['f1']:.4f}; calibration error (ECE)"
        f" {mean['ece_test_before']:.4f} -> {mean['ece_test_after']:.4f}"
    )
    if name != settings.attribute.model or settings.attribute.model_path:
        print(
            f"to use it: FACECAPTION_ATTRIBUTE__MODEL={name} (or attribute.model in the TOML file)"
        )
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from facecaption.models.cache import ModelCache

    cache = ModelCache(Settings().model_cache_dir)
    entries = cache.manifest()
    if not entries:
        print(f"the model cache {cache.root} is empty: see `facecaption models pull --help`")
    for key, entry in sorted(entries.items()):
        if entry.get("source") == "huggingface":
            print(f"{key}: {entry['repo']}@{entry['commit']} (revision {entry['revision']})")
        elif entry.get("source") == "trained":
            accuracy = entry["metrics"]["mean"]["accuracy"]
            print(
                f"{key}: trained from {entry['backbone']['backbone']} on"
                f" {entry['dataset']['dataset']} (test mean accuracy {accuracy:.4f})"
            )
        else:
            print(f"{key}: {entry['url']} sha256 {entry['archive_sha256']}")
        for name, digest in entry["files"].items():
            print(f"  {name}  {digest}")
    return 0


def _text_stats(args: argparse.Namespace) -> int:

    from facecaption.caption.stage import PARQUET_NAME, text_stats
    from facecaption.core.pipeline import Pipeline

    raw: list[str] = []
    llm: list[str] = []
    with Pipeline.open() as pipeline:
        for row in pipeline.status(args.shard):
            state = row.stages.get("caption")
            if state is None or state.status != "done":
                continue
            path = pipeline.store.shard_path(row.shard_id, PARQUET_NAME)
            for caption in pipeline.store.read_table(path).to_pylist():
                raw.append(caption["raw_text"])
                if caption["caption_source"] == "llm":
                    llm.append(caption["caption"])
    for label, texts in (("raw text (grammar)", raw), ("LLM captions", llm)):
        stats = text_stats(texts)
        mean = stats["words"] / stats["captions"] if stats["captions"] else 0.0
        print(
            f"{label}: {stats['captions']} captions, {mean:.1f} words on average,"
            f" {stats['unique_4grams']} distinct 4-grams"
        )
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from facecaption.models.preflight import check_stage_models

    settings = Settings()
    checks = check_stage_models(settings)
    if args.json:
        print(json.dumps([check.as_json() for check in checks], indent=2))
        return 0 if all(check.ready for check in checks) else 1
    print(f"model cache: {settings.model_cache_dir}")
    for check in checks:
        print(f"{check.stage}: {check.backend}" + ("" if check.ready else "  NOT READY"))
        for label, value in (
            ("model", check.model),
            ("identity", check.identity),
            ("from", check.origin),
            ("missing", check.problem),
        ):
            if value:
                print(f"  {label + ':':<9} {value}")
        if check.demo:
            print("  note:     a demo stand-in: it runs the code, its outputs mean nothing")
    return 0 if all(check.ready for check in checks) else 1


def _config(args: argparse.Namespace) -> int:
    print(json.dumps(effective_config(Settings()), indent=2))
    return 0


def effective_config(settings: Settings) -> dict[str, Any]:
    """The settings as `config` prints them: the places actually used in place of unset
    defaults (nothing is started to find them), every credential masked."""
    values = settings.model_dump(mode="json")
    values["db_url"] = settings.db_url or (
        f"embedded Postgres in {settings.home_dir / 'pgdata'} (started on first use)"
    )
    values["store_root"] = settings.artifact_root
    values["models_dir"] = str(settings.model_cache_dir)
    return redacted_settings(values)


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    import facecaption

    # The demo's sample site, data and tiny models are test scaffolding: they live in the
    # source checkout's tests/support (not in the installed package), beside dags/.
    support = Path(facecaption.__file__).resolve().parents[1] / "tests"
    if not (support / "support" / "demo.py").is_file():
        raise FileNotFoundError(
            "the demo runs from a source checkout (it needs dags/ and tests/support): clone"
            " the repository and run `make demo`"
        )
    sys.path.insert(0, str(support))
    from support.demo import run_demo

    return run_demo(Settings(), shard_size=args.shard_size)


if __name__ == "__main__":
    sys.exit(main())
