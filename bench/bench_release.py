"""Release assembly: our streaming writer (one shard and one row group in memory) against what
a user would write by hand (pandas: read every shard export, concat, to_parquet), side by side
in one run, each in its own process so peak memory is its own.

    python bench/bench_release.py --shards 200 --rows 3000 --write docs/benchmarks.md

Shard exports are synthetic release rows (the real schema, realistic text lengths).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
from benchreport import write_section

from facecaption.core.artifacts import RELEASE_PARQUET, RELEASE_SCHEMA
from facecaption.core.store import ArtifactStore

WORDS = "he she has wears smiling young brown hair bangs big nose earrings hat a the and"


def make_shards(root: Path, shards: int, rows: int) -> list[str]:
    store = ArtifactStore(str(root))
    rng = random.Random(0)
    ids = []
    for index in range(shards):
        shard_id = f"bench{index:06d}_000000000_000010000"
        text = [" ".join(rng.choices(WORDS.split(), k=45)) for _ in range(rows)]
        table = pa.table(
            {
                "url": [f"https://example.org/{index}/{i}.jpg" for i in range(rows)],
                "box": [[1, 2, 200, 220]] * rows,
                "laion_caption": [["a photo of someone at an event"]] * rows,
                "caption": [[t] for t in text],
                "face_id": [f"{shard_id}/{i:09d}_00" for i in range(rows)],
                "sample_id": [str(i) for i in range(rows)],
                "shard_id": [shard_id] * rows,
                "image_sha256": ["ab" * 32] * rows,
                "image_width": [1024] * rows,
                "image_height": [768] * rows,
                "score": [0.99] * rows,
                "landmarks": [[float(v) for v in range(10)]] * rows,
                "crop_width": [220] * rows,
                "crop_height": [220] * rows,
                "attributes": [["Male", "Young", "Smiling", "Brown_Hair", "Bangs"]] * rows,
                "raw_text": text,
                "caption_source": ["llm"] * rows,
                "fidelity": ["pass"] * rows,
                "detector_id": ["det_10g@sha256:00"] * rows,
                "attribute_model_id": ["resnet50@sha256:00"] * rows,
                "caption_model_id": ["qwen@00"] * rows,
                "fingerprint": ["f" * 64] * rows,
                "license": ["CC-BY-4.0 captions"] * rows,
            },
            schema=RELEASE_SCHEMA,
        )
        path = Path(store.shard_path(shard_id, RELEASE_PARQUET))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
        ids.append(shard_id)
    return ids


def run_one(method: str, root: str, shard_ids: list[str], out: str, row_group: int) -> dict:
    start = time.perf_counter()
    if method == "ours":
        from facecaption.release.publish import _write_file

        pipeline = SimpleNamespace(store=ArtifactStore(root))
        entry = _write_file(pipeline, out, shard_ids, row_group)  # type: ignore[arg-type]
        rows = entry["rows"]
    else:
        import pandas as pd

        store = ArtifactStore(root)
        frame = pd.concat(
            [pd.read_parquet(store.shard_path(s, RELEASE_PARQUET)) for s in shard_ids],
            ignore_index=True,
        )
        frame.to_parquet(out, compression="zstd", row_group_size=row_group, index=False)
        rows = len(frame)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "rows": rows, "seconds": seconds, "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--rows", type=int, default=3000, help="faces per shard export")
    parser.add_argument("--row-group", type=int, default=50_000)
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "ROOT", "OUT"), default=None)
    args = parser.parse_args()
    if args.child:
        method, root, out = args.child
        ids = json.loads(Path(root, "ids.json").read_text())
        print(json.dumps(run_one(method, root, ids, out, args.row_group)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        ids = make_shards(Path(tmp), args.shards, args.rows)
        Path(tmp, "ids.json").write_text(json.dumps(ids))
        results = {}
        for method in ("pandas", "ours"):
            done = subprocess.run(
                [sys.executable, __file__, "--row-group", str(args.row_group),
                 "--child", method, tmp, str(Path(tmp) / f"{method}.parquet")],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            results[method] = json.loads(done.stdout)
    ours, theirs = results["ours"], results["pandas"]
    assert ours["rows"] == theirs["rows"] == args.shards * args.rows
    lines = [
        f"{args.shards} shard exports x {args.rows} faces = {ours['rows']:,} release rows, one"
        f" file, row groups of {args.row_group:,}; each method in its own process.",
        "",
        "| method | seconds | peak RSS MiB |",
        "|---|---|---|",
        f"| pandas: read all, concat, to_parquet | {theirs['seconds']:.2f} |"
        f" {theirs['peak_mib']:.0f} |",
        f"| ours: streamed row groups | {ours['seconds']:.2f} | {ours['peak_mib']:.0f} |",
        "",
        f"Ours: {theirs['seconds'] / ours['seconds']:.2f}x the speed, "
        f"{ours['peak_mib'] / theirs['peak_mib']:.2f}x the peak memory of the pandas way.",
    ]
    print("\n".join(lines))
    if args.write:
        command = (
            f"python bench/bench_release.py --shards {args.shards} --rows {args.rows}"
            f" --write {args.write}"
        )
        write_section(args.write, "Release assembly", command, lines)


if __name__ == "__main__":
    main()
