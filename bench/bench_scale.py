"""Scale to LAION-Face size, side by side in one run:

1. plan 50M synthetic rows in 32 LAION-Face-like parquet parts (SAMPLE_ID, URL, TEXT, HEIGHT,
   WIDTH, similarity): `facecaption plan FOLDER` in its own process, first (every file hashed
   once) and again (nothing changed: no byte read): wall time and peak RSS;
2. the per-request costs that must not grow with the shards: work selection (the refresh's
   `work` and a `stale` check of every stage), status (all rows, and one page of the shard
   view with totals), the report's collection and matching pending takedowns, on synthetic
   state of 500 and of 5,000 shards (25,000 stage rows) written straight into throwaway
   databases: seconds, queries, and the 5,000 / 500 ratio;
3. Airflow's own cost per shard: the build DAG on a live LocalExecutor Airflow against
   `facecaption run` over the same near-empty shards (`bench_airflow_overhead`), and that
   cost as a share of a realistic shard's CPU work.

    python bench/bench_scale.py --write docs/benchmarks.md

`--requests-only` measures part 2 alone (a few minutes instead of the 50M-row plan's run and
a live Airflow); with `--write` it rewrites the requests' table and keeps the other parts'
from the page as they were.

Needs the local Postgres (`--admin-url`, default postgres@127.0.0.1:5432); creates and drops
its own databases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa
from benchreport import write_section
from sqlalchemy.engine import make_url
from support.scale import count_queries, populate
from support.statistics_model import build_statistics_model

from facecaption.settings import Settings
from facecaption.state.db import upgrade

ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
SECTION = "Scale: LAION-Face size"
COMMAND = "python bench/bench_scale.py --write docs/benchmarks.md"
ROW_GROUP = 100_000


def write_parts(folder: Path, rows: int, parts: int) -> int:
    """`parts` parquet files of LAION-Face's columns, `rows` rows in all; returns bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(16)
    per_part = -(-rows // parts)
    total = 0
    for part in range(parts):
        start, stop = part * per_part, min((part + 1) * per_part, rows)
        ids = pa.array(np.arange(start, stop, dtype=np.int64))
        # random tokens, so the files compress about as little as real URLs and captions do
        tokens = pc.cast(pa.array(rng.integers(0, 2**62, stop - start)), pa.string())
        words = pc.cast(pa.array(rng.integers(0, 2**40, stop - start)), pa.string())
        table = pa.table(
            {
                "SAMPLE_ID": ids,
                "URL": pc.binary_join_element_wise(
                    "https://cdn.example-images.org/photos/", tokens, "/portrait.jpg", ""
                ),
                "TEXT": pc.binary_join_element_wise(
                    "a portrait photo of a person smiling at an event ", words, ""
                ),
                "HEIGHT": pc.add(pc.bit_wise_and(ids, 1023), 256),
                "WIDTH": pc.add(pc.bit_wise_and(pc.shift_right(ids, 3), 1023), 256),
                "similarity": pc.divide(pc.cast(pc.bit_wise_and(ids, 255), pa.float64()), 800.0),
            }
        )
        path = folder / f"part-{part:05d}.parquet"
        pq.write_table(table, path, row_group_size=ROW_GROUP, compression="zstd")
        total += path.stat().st_size
    return total


# The child reports its own peak: VmHWM is per address space (reset by exec), whereas wait4's
# ru_maxrss keeps the high-water mark of the forked copy of this (larger) process.
PLAN_CHILD = """
import re, sys, time
from facecaption.cli import main
start = time.perf_counter()
code = main(["plan", sys.argv[1]])
seconds = time.perf_counter() - start
status = open("/proc/self/status").read()
peak = re.search(r"VmHWM:\\s+(\\d+)", status).group(1)
print("measured", seconds, peak, file=sys.stderr)
sys.exit(code)
"""


def run_plan_measured(folder: Path, env: dict[str, str]) -> dict[str, Any]:
    """`facecaption plan FOLDER` in a child process: wall seconds, its peak RSS, its output."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PLAN_CHILD, str(folder)], env=env, capture_output=True, text=True
    )
    process_s = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"plan failed ({done.returncode}): {done.stderr}")
    seconds, peak_kib = done.stderr.rsplit("measured", 1)[1].split()[:2]
    return {"seconds": float(seconds), "process_s": process_s,
            "peak_mib": int(peak_kib) / 1024, "out": done.stdout}  # fmt: skip


@contextmanager
def throwaway_db(admin_url: str) -> Iterator[str]:
    name = f"fc_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    engine = sa.create_engine(url)
    upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def timed(request: Callable[[], Any], repeats: int) -> tuple[float, float, int, Any]:
    """Median wall seconds and this process's CPU seconds over `repeats` calls, the queries
    of one call, its result."""
    seconds, cpu, queries, result = [], [], 0, None
    for _ in range(repeats):
        with count_queries() as statements:
            start, start_cpu = time.perf_counter(), time.process_time()
            result = request()
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        queries = len(statements)
    return statistics.median(seconds), statistics.median(cpu), queries, result


def measure_requests(settings: Settings, shards: int, index_rows: int, repeats: int) -> dict:
    from facecaption.core.pipeline import Pipeline
    from facecaption.core.status import format_status, stale_stages
    from facecaption.release.publish import export_shards
    from facecaption.release.report import collect
    from facecaption.release.takedowns import match_pending_takedowns

    with Pipeline.open(settings) as pipeline:
        start = time.perf_counter()
        ids = populate(pipeline.state.engine, settings, shards, index_rows=index_rows)
        for shard_id in ids:  # each export's file, at the size its state records
            with pipeline.store.publish(
                pipeline.store.shard_path(shard_id, "release.parquet")
            ) as tmp:
                tmp.write_bytes(b"x" * 1000)
        generated = time.perf_counter() - start
        requests: dict[str, Callable[[], Any]] = {
            "selection: `work` (the refresh's plan task)": lambda: pipeline.select_work(
                status="work"
            ),
            "selection: `stale` in every stage": lambda: pipeline.select_work(status="stale"),
            "`facecaption status` (all rows, formatted)": lambda: format_status(
                pipeline.status(artifacts=False)
            ),
            "shard view page (`status_page`, 100 rows + totals)": lambda: pipeline.status_page(
                status="done", limit=100
            ),
            "shard view stale markers (`stale_stages`, 100 rows)": lambda: stale_stages(
                pipeline, [row.shard_id for row in pipeline.status_page(limit=100).rows]
            ),
            "report collection (`report.collect`)": lambda: collect(pipeline),
            # before matching: the shards it matches are then exported again
            "release step: which exports are current (`export_shards`)": lambda: export_shards(
                pipeline
            ),
            "takedown matching (5 pending requests)": lambda: match_pending_takedowns(pipeline),
        }
        results = {}
        for name, request in requests.items():
            seconds, cpu, queries, result = timed(request, repeats)
            if name.startswith("selection"):
                assert result.shard_ids == [], f"{name}: synthetic state should be current"
            if name.startswith("release step"):
                assert len(result[0]) == shards, f"{name}: every export should be current"
            results[name] = {"seconds": seconds, "cpu": cpu, "queries": queries}
    return {"generated_s": generated, "requests": results}


def measure_plan(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: write the synthetic source, plan it twice into a throwaway database."""
    start = time.perf_counter()
    source_bytes = write_parts(tmp / "laion-face", args.rows, args.parts)
    generated_s = time.perf_counter() - start
    with throwaway_db(args.admin_url) as db_url:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FACECAPTION_")},
            "FACECAPTION_HOME": str(tmp / "home"),
            "FACECAPTION_DB_URL": db_url,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
        first = run_plan_measured(tmp / "laion-face", env)
        again = run_plan_measured(tmp / "laion-face", env)
        engine = sa.create_engine(db_url)
        with engine.connect() as conn:
            planned_shards = conn.execute(sa.text("SELECT count(*) FROM shards")).scalar()
            planned_rows = conn.execute(
                sa.text("SELECT sum(row_end - row_start) FROM shards")
            ).scalar()
        engine.dispose()
    shutil.rmtree(tmp / "laion-face")
    assert planned_rows == args.rows, (planned_rows, args.rows)
    assert "0 new" in again["out"] and "new)" in first["out"]
    return {"first": first, "again": again, "shards": planned_shards,
            "source_bytes": source_bytes, "generated_s": generated_s}  # fmt: skip


def plan_lines(plan: dict[str, Any], args: argparse.Namespace) -> list[str]:
    first, again = plan["first"], plan["again"]
    return [
        f"**Plan.** {args.rows:,} synthetic rows in {args.parts} parquet parts"
        f" ({plan['source_bytes'] / 2**30:.2f} GiB, LAION-Face's columns, row groups of"
        f" {ROW_GROUP:,}; written in {plan['generated_s']:.0f} s), planned into"
        f" {plan['shards']:,} shards of 10,000 rows by `facecaption plan FOLDER` in its own"
        " process (peak RSS: its VmHWM).",
        "",
        "| plan | planning s | whole process s | peak RSS MiB |",
        "|---|---:|---:|---:|",
        f"| first: every file hashed once, footers read, shards registered |"
        f" {first['seconds']:.2f} | {first['process_s']:.1f} | {first['peak_mib']:.0f} |",
        f"| again, nothing changed: stat only, no byte read |"
        f" {again['seconds']:.2f} | {again['process_s']:.1f} | {again['peak_mib']:.0f} |",
        "",
        f"Re-planning takes {again['seconds'] / first['seconds']:.2f}x the first plan's time"
        " (before, every plan hashed every file in full). Planning s: `main(['plan', ...])`"
        " in the child, interpreter start and imports excluded.",
    ]


def kept_part(page: Path | None, marker: str, end: str | None) -> list[str]:
    """A part of the section as the page has it, from `marker` up to `end` (None: the
    section's end), for a `--requests-only` run that does not measure it again."""
    text = page.read_text() if page is not None and page.exists() else ""
    section = text.split(f"## {SECTION}\n", 1)[-1].split("\n## ", 1)[0] if text else ""
    if marker not in section or (end is not None and end not in section):
        return [f"{marker} Not measured (`--requests-only`)."]
    kept = section[section.index(marker) : section.index(end) if end else None]
    kept = kept.split("\n\n_Not re-measured")[0].rstrip("\n")
    return [
        *kept.split("\n"),
        "",
        "_Not re-measured in this run (`--requests-only`): these figures are from the last"
        f" full run, `{COMMAND}`._",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000_000, help="rows to plan")
    parser.add_argument("--parts", type=int, default=32, help="parquet files they are in")
    parser.add_argument("--shards", type=int, nargs=2, default=[500, 5000])
    parser.add_argument("--index-rows", type=int, default=400, help="indexed images per shard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument(
        "--requests-only", action="store_true",
        help="measure the requests only; --write keeps the other parts' figures as they were",
    )  # fmt: skip
    parser.add_argument("--airflow-shards", type=int, default=5, help="part 3's shards")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()

    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fc-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        model = build_statistics_model(tmp / "models" / "statistics.onnx")
        plan = None if args.requests_only else measure_plan(tmp, args)  # 1. planning

        # 2. requests at two sizes
        measured = {}
        for shards in args.shards:
            with throwaway_db(args.admin_url) as db_url:
                settings = Settings(
                    home=tmp / "home",
                    db_url=db_url,
                    store_root=str(tmp / "artifacts"),
                    detect={"backend": "cascade"},
                    attribute={"model_path": str(model)},
                    caption={"backend": "template"},
                )
                measured[shards] = measure_requests(settings, shards, args.index_rows, args.repeats)

        # 3. Airflow's cost per shard (its bench imports this one's helpers: imported here)
        airflow = None
        if not args.requests_only:
            from bench_airflow_overhead import measure_overhead

            (tmp / "airflow").mkdir()
            airflow = measure_overhead(tmp / "airflow", args.airflow_shards, args.admin_url)
    total_s = time.perf_counter() - wall

    small, large = args.shards
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work (load"
        f" average {os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()},"
        f" PostgreSQL on loopback. Whole run {total_s / 60:.1f} min. Absolute seconds move with"
        " the load; the ratios and query counts are what to read.",
        "",
        *(
            kept_part(args.write, "**Plan.**", "**Requests.**")
            if plan is None
            else plan_lines(plan, args)
        ),
        "",
        f"**Requests.** Synthetic state written straight into a throwaway database: every"
        f" stage done and current, export statistics, attempt history, {args.index_rows:,}"
        f" indexed images per shard, 5 pending takedown requests ({small:,} shards: generated"
        f" in {measured[small]['generated_s']:.0f} s; {large:,} shards / {large * 5:,} stage"
        f" rows / {large * args.index_rows:,} indexed images: {measured[large]['generated_s']:.0f}"
        f" s). Median of {args.repeats} calls; queries of one call. Wall seconds include"
        " waiting for a share of the CPU (and the database server's); client CPU is this"
        " process's own CPU time for the call.",
        "",
        f"| request | {small:,} shards s | {large:,} shards s | ratio | {large:,} shards client"
        f" CPU s | queries ({small:,} / {large:,}) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in measured[small]["requests"]:
        a, b = measured[small]["requests"][name], measured[large]["requests"][name]
        lines.append(
            f"| {name} | {a['seconds']:.3f} | {b['seconds']:.3f} |"
            f" {b['seconds'] / a['seconds']:.1f}x | {b['cpu']:.2f} |"
            f" {a['queries']} / {b['queries']} |"
        )
    lines += [
        "",
        f"{large // small}x the shards: the query counts stay the same; what grows is the"
        " rows those few queries return (selection and `status` read every shard's stage"
        " rows once) and the Python work on them. The shard view's page and takedown"
        " matching read only what they show or match; the release step runs the export"
        " stage on no shard whose export is current (before, a lock and ten queries per"
        " shard). That work is kept small per row:"
        " rows unpacked rather than read by name, json decoded by msgspec, of a stage's"
        " recorded inputs only the checksums selection checks, each stage's settings part of"
        " the fingerprint worked out once per request, and the cyclic garbage collector held"
        " off while the rows become objects (`facecaption/core/bulk.py`: it ran two or three"
        " full collections per request at 5,000 shards, each scanning every live object).",
        "",
    ]
    if airflow is None:
        lines += kept_part(args.write, "**Airflow per shard.**", None)
    else:
        from bench_airflow_overhead import overhead_lines

        first, *rest = overhead_lines(airflow)
        lines += [f"**Airflow per shard.** {first}", *rest]
    print("\n".join(lines))
    print(json.dumps({"plan": plan, "requests": measured, "airflow": airflow}, default=str)[:2000])
    if args.write:
        command = (
            "python bench/bench_scale.py --requests-only --write docs/benchmarks.md"
            if args.requests_only
            else COMMAND
        )
        write_section(args.write, SECTION, command, lines)


if __name__ == "__main__":
    main()
