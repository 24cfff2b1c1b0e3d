"""Fetch throughput, side by side in one run, on a loopback server with simulated latency.

Compares the fetch stage's downloader + checks + webdataset writer with what people glue by
hand: a sequential urllib loop, and a 64-thread pool of the same. All three download the same
URLs, verify each image with Pillow and keep the bytes; only the fetch stage also hashes,
deduplicates and writes the tar.

    python bench/bench_fetch.py [--images 300] [--latency-ms 50] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import platform
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from benchreport import write_section
from PIL import Image
from support.sampledata import encode
from support.samplesite import Route, SampleSite

from facecaption.fetch.stage import SourceRow, Spool, fetch_rows
from facecaption.settings import FetchSettings


def make_routes(count: int, latency_s: float) -> dict[str, Route]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    routes = {}
    for i in range(count):
        pixels = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))  # 384x512, compressible
        pixels[i % 384, :, :] = i % 255
        body = encode(Image.fromarray(pixels), "JPEG", quality=90)
        routes[f"img/{i}.jpg"] = Route(body, "image/jpeg", delay_s=latency_s)
    return routes


def urllib_one(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
    with Image.open(io.BytesIO(body)) as image:
        image.load()
    return len(body)


def run_sequential(urls: list[str]) -> int:
    return sum(1 for url in urls if urllib_one(url))


def run_threads(urls: list[str], threads: int = 64) -> int:
    with ThreadPoolExecutor(threads) as pool:
        return sum(1 for size in pool.map(urllib_one, urls) if size)


def run_fetch_stage(urls: list[str]) -> int:
    rows = [SourceRow(i, url, None, None) for i, url in enumerate(urls)]
    # one host here, so no per-host limit: the contenders have none either
    limits = FetchSettings(
        concurrency=64, per_host_concurrency=64, per_host_rate=0, allow_networks=["127.0.0.0/8"]
    )
    with tempfile.TemporaryDirectory() as scratch, Spool(Path(scratch) / "spool") as spool:
        records = asyncio.run(fetch_rows(rows, limits, spool))
    return sum(record["status"] == "ok" for record in records.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--write", type=Path, help="write the results as markdown here")
    args = parser.parse_args()

    routes = make_routes(args.images, args.latency_ms / 1000)
    contenders = [
        ("sequential urllib + Pillow (naive loop)", run_sequential),
        ("64-thread pool, urllib + Pillow", run_threads),
        ("facecaption fetch stage (asyncio, 64 concurrent)", run_fetch_stage),
    ]
    results = []
    with SampleSite(routes) as site:
        urls = [site.url(path) for path in routes]
        for name, contender in contenders:
            started = time.perf_counter()
            kept = contender(urls)
            elapsed = time.perf_counter() - started
            assert kept == len(urls), f"{name} kept {kept} of {len(urls)}"
            results.append((name, elapsed, len(urls) / elapsed))
    baseline = results[0][2]
    mean_kb = sum(len(route.body) for route in routes.values()) / len(routes) / 1024
    lines = [
        f"{args.images} JPEGs of {mean_kb:.0f} KiB on average, served over loopback with"
        f" {args.latency_ms:.0f} ms latency per request; {platform.machine()},"
        f" {__import__('os').cpu_count()} cores, Python {platform.python_version()}.",
        "",
        "| contender | seconds | images/s | vs naive loop |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {elapsed:.2f} | {rate:.0f} | {rate / baseline:.1f}x |"
            for name, elapsed, rate in results
        ),
    ]
    print("\n".join(lines))
    if args.write:
        write_section(
            args.write,
            "Fetch throughput",
            " ".join(
                [
                    "python bench/bench_fetch.py",
                    f"--images {args.images}",
                    f"--latency-ms {args.latency_ms:g}",
                ]
            ),
            lines,
        )


if __name__ == "__main__":
    main()
