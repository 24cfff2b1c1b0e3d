"""The fetch stage against img2dataset, side by side in one run, on loopback hosts with faults.

Eight loopback hosts (127.0.0.2-9, one `SampleSite` each) serve N distinct real images (JPEG
and PNG crops of the photos that ship with scikit-image, 20-300 KB) with 20-300 ms latency per
request and a mix of faults: 404, 500, 429 once with `Retry-After: 1`, answers slower than the
timeout, 302 redirects, `X-Robots-Tag: noai` on ~1 MB images, images under a `/private/` path
that each host's robots.txt disallows, and PNG pixel bombs (30000x30000, ~110 KB). The same
parquet URL list is fetched by `facecaption run` (the CLI, its own Postgres database) and by
img2dataset (from PyPI, in `bench/.venv-img2dataset`, made on first use), one after the other,
with the same concurrency and timeout; each tool's process tree is measured from outside.

    .venv/bin/python bench/bench_img2dataset.py [--urls 5000] [--timeout 10] \
        [--write docs/benchmarks.md]

CPU seconds are exact: this process becomes a child subreaper, so every process of a tool's
tree is reaped by its parent or by us, and `getrusage(RUSAGE_CHILDREN)` before/after counts
them all (psutil sampling every 50 ms is printed next to it as a cross-check). Peak RSS is the
largest sum of RSS over the live tree, sampled every 50 ms (shared pages count once per
process, so it overstates forked workers slightly).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import psycopg2
import pyarrow as pa
import pyarrow.parquet as pq
from benchreport import write_section
from PIL import Image
from support.sampledata import encode, packaged_photos
from support.samplesite import Route, SampleSite

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "bench" / ".venv-img2dataset"
HOSTS = [f"127.0.0.{i}" for i in range(2, 10)]
ADMIN_DB_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MIX = {  # share of the URL list per kind; "good" is the rest
    "missing": 0.05,  # no route: 404
    "error": 0.03,  # 500 every time
    "throttled": 0.04,  # 429 with Retry-After: 1 once, then the image
    "slow": 0.03,  # answers after the timeout
    "redirect": 0.03,  # 302 to an image that is not itself in the list
    "noai": 0.03,  # X-Robots-Tag: noai on a large image
    "private": 0.02,  # under /private/, which robots.txt disallows
    "bomb": 0.002,  # 30000x30000 PNG
}
ROBOTS_TXT = b"User-agent: *\nDisallow: /private/\n"
SAMPLE_EVERY_S = 0.05
# noai bodies go out in 1 KiB pieces 0.5 ms apart (~1.6 MB/s, 1 MB in ~0.7 s): the server is
# still writing when a client hangs up after the headers, so `hung_up` sees every hang-up.
# Sent in one write, a body the size of the socket buffers (MBs on loopback, more on a
# warm keep-alive connection) would be "sent in full" whether or not the client read it.
NOAI_TRICKLE_S = 0.0005
PR_SET_CHILD_SUBREAPER = 36


# --- img2dataset's virtualenv -------------------------------------------------------------


def ensure_img2dataset() -> str:
    """Create bench/.venv-img2dataset with img2dataset from PyPI if missing; its version."""
    python = VENV / "bin" / "python"
    if not (VENV / "bin" / "img2dataset").exists():
        print(f"creating {VENV.relative_to(REPO)} and installing img2dataset from PyPI ...")
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(VENV)],
            [str(python), "-m", "pip", "install", "--quiet", "img2dataset"],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                sys.exit(
                    f"could not install img2dataset ({' '.join(step)} exited"
                    f" {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}"
                )
    return subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('img2dataset'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


# --- the loopback hosts -------------------------------------------------------------------


class ImageMaker:
    """Distinct JPEG/PNG crops of the packaged photos, 20-300 KB each."""

    def __init__(self, rng: np.random.Generator) -> None:
        photos = [Image.open(path).convert("RGB") for path in packaged_photos().values()]
        self.photos = [np.asarray(photo) for photo in photos if min(photo.size) >= 256]
        self.rng = rng
        self.seen: set[bytes] = set()

    def make(self) -> tuple[bytes, str]:
        rng = self.rng
        while True:
            photo = self.photos[rng.integers(len(self.photos))]
            height, width = photo.shape[:2]
            crop_h = int(rng.integers(height // 3, height + 1))
            crop_w = int(rng.integers(width // 3, width + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            crop = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
            png = rng.random() < 0.15
            side = int(rng.integers(120, 380) if png else rng.integers(260, 1000))
            scale = side / max(crop_w, crop_h)
            image = crop.resize(
                (max(16, round(crop_w * scale)), max(16, round(crop_h * scale))),
                Image.Resampling.BILINEAR,
            )
            if png:
                body, content_type = encode(image, "PNG"), "image/png"
            else:
                quality = int(rng.integers(70, 96))
                body, content_type = encode(image, "JPEG", quality=quality), "image/jpeg"
            digest = hashlib.sha256(body).digest()
            if 20_000 <= len(body) <= 300_000 and digest not in self.seen:
                self.seen.add(digest)
                return body, content_type


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment right after SOI: distinct bytes, same pixels."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def pixel_bomb() -> bytes:
    """A 30000x30000 1-bit black PNG: ~110 KB on the wire, 900 MB decoded to 8 bits."""
    return encode(Image.new("1", (30000, 30000)), "PNG")


@dataclass
class Url:
    kind: str
    site: int
    path: str
    url: str = ""


@dataclass
class Sites:
    sites: list[SampleSite]
    urls: list[Url]
    mean_good_kb: float
    noai_mb: float
    kinds: Counter = field(default_factory=Counter)

    def reset_counters(self) -> None:
        for site in self.sites:
            site.hits.clear()
            site.hung_up.clear()
            site.max_in_flight = 0


def build_sites(count: int, timeout_s: float, noai_mb: float, seed: int) -> Sites:
    rng = np.random.default_rng(seed)
    kinds = [kind for kind, share in MIX.items() for _ in range(round(share * count))]
    if count >= 100 and "bomb" not in kinds:
        kinds.append("bomb")  # at least one
    kinds += ["good"] * (count - len(kinds))
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    sites = [SampleSite({}, port=0, host=host) for host in HOSTS]
    for site in sites:
        site.routes["robots.txt"] = Route(ROBOTS_TXT, "text/plain")
    maker = ImageMaker(rng)
    rows = max(16, int(noai_mb * 1e6 / 1.2 / 1000))  # noise at quality 95: ~1.2 bytes/pixel
    noise = rng.integers(0, 255, (rows, 1000, 3), dtype=np.uint8)
    noai_base = encode(Image.fromarray(noise), "JPEG", quality=95)
    bomb = pixel_bomb() if "bomb" in kinds else b""
    urls, good_sizes = [], []
    for index, kind in enumerate(kinds):
        site_no = int(rng.integers(len(sites)))
        site = sites[site_no]
        delay = float(rng.uniform(0.02, 0.3))
        path = f"{'private' if kind == 'private' else kind}/{index:06d}"
        route: Route | None = None
        if kind in ("good", "throttled", "private"):
            body, content_type = maker.make()
            path += ".png" if content_type == "image/png" else ".jpg"
            route = Route(body, content_type, delay_s=delay)
            if kind == "throttled":
                route.fail_first, route.fail_status = 1, 429
                route.fail_headers = {"Retry-After": "1"}
            if kind == "good":
                good_sizes.append(len(body))
        elif kind == "missing":
            path += ".jpg"
        elif kind == "error":
            route = Route(b"oops", "text/plain", status=500, delay_s=delay)
            path += ".jpg"
        elif kind == "slow":
            route = Route(maker.make()[0], "image/jpeg", delay_s=timeout_s + 2)
            path += ".jpg"
        elif kind == "redirect":
            target_site = sites[int(rng.integers(len(sites)))]
            body, content_type = maker.make()
            target = f"moved/{index:06d}" + (".png" if content_type == "image/png" else ".jpg")
            target_site.routes[target] = Route(body, content_type, delay_s=delay)
            moved = {"Location": target_site.url(target)}
            route = Route(b"", "text/plain", status=302, delay_s=delay, headers=moved)
            path += ".jpg"
        elif kind == "noai":
            body = with_comment(noai_base, f"noai {index}")
            noai = {"X-Robots-Tag": "noai"}
            route = Route(body, "image/jpeg", delay_s=delay, trickle_s=NOAI_TRICKLE_S, headers=noai)
            path += ".jpg"
        elif kind == "bomb":
            route = Route(bomb, "image/png", delay_s=delay)
            path += ".png"
        if route is not None:
            site.routes[path] = route
        urls.append(Url(kind, site_no, path, site.url(path)))
    return Sites(
        sites,
        urls,
        mean_good_kb=float(np.mean(good_sizes)) / 1024 if good_sizes else 0.0,
        noai_mb=len(noai_base) / 1e6,
        kinds=Counter(kinds),
    )


def write_source(urls: list[Url], path: Path) -> None:
    table = pa.table(
        {
            "SAMPLE_ID": pa.array(range(len(urls)), pa.int64()),
            "URL": [url.url for url in urls],
            "TEXT": [f"image {i} ({url.kind})" for i, url in enumerate(urls)],
        }
    )
    pq.write_table(table, path)


# --- measuring a process tree -------------------------------------------------------------


@dataclass
class Measured:
    returncode: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0  # getrusage(RUSAGE_CHILDREN) delta: every reaped descendant
    cpu_sampled_s: float = 0.0  # psutil: last seen user+sys of every descendant
    peak_rss: int = 0  # largest sum of RSS over the live tree
    peak_processes: int = 0
    timed_out: bool = False
    log: str = ""


def become_subreaper() -> bool:
    """Orphaned grandchildren get re-parented to us, so we reap them and getrusage sees them."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap_leftovers(grace_s: float = 30.0) -> None:
    """Wait for (then kill, by pid) descendants still alive after the tool's main process."""
    deadline = time.monotonic() + grace_s
    while True:
        left = _descendants()
        for proc in left:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(proc.pid, os.WNOHANG)
        left = [proc for proc in _descendants() if _alive(proc)]
        if not left:
            break
        if time.monotonic() > deadline:
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            deadline = time.monotonic() + 5
        time.sleep(0.1)
    for proc in _descendants():  # zombies of ours
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(proc.pid, 0)


def run_measured(
    command: list[str], env: dict[str, str], log_path: Path, limit_s: float
) -> Measured:
    result = Measured()
    cpu_seen: dict[tuple[int, float], float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, alive = 0, 0
            for proc in _descendants():
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        key = (proc.pid, proc.create_time())
                        cpu_seen[key] = times.user + times.system
                        if proc.status() != psutil.STATUS_ZOMBIE:
                            rss += proc.memory_info().rss
                            alive += 1
                except psutil.Error:
                    continue
            result.peak_rss = max(result.peak_rss, rss)
            result.peak_processes = max(result.peak_processes, alive)
            stop.wait(SAMPLE_EVERY_S)

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler.start()
        try:
            result.returncode = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            result.timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            result.returncode = proc.wait()
        except BaseException:  # Ctrl-C: the tool runs in its own session, so end it here
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stop.set()
            raise
        result.wall_s = time.perf_counter() - started
        _reap_leftovers()
    stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result.cpu_sampled_s = sum(cpu_seen.values())
    result.log = log_path.read_text(errors="replace")
    return result


# --- the two contenders -------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    measured: Measured
    statuses: Counter  # status (and, for failures, a short reason) -> rows
    ok_urls: set[str]
    note: str = ""


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACECAPTION_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@contextlib.contextmanager
def fresh_database(admin_url: str):
    name = f"fc_bench_i2d_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def run_ours(source: Path, work: Path, args: argparse.Namespace, shard_size: int) -> Outcome:
    cli = str(REPO / ".venv" / "bin" / "facecaption")
    notes = []
    with fresh_database(args.admin_db_url) as db_url:
        env = {
            "FACECAPTION_HOME": str(work / "home"),
            "FACECAPTION_DB_URL": db_url,
            "FACECAPTION_STORE_ROOT": str(work / "store"),
            "FACECAPTION_SHARD_SIZE": str(shard_size),
            "FACECAPTION_FETCH__CONCURRENCY": str(args.threads),
            "FACECAPTION_FETCH__TOTAL_TIMEOUT_S": str(args.timeout),
            "FACECAPTION_FETCH__READ_TIMEOUT_S": str(args.timeout),
        }
        config = json.loads(
            subprocess.run(
                [cli, "config"], env=clean_env(env), capture_output=True, text=True, check=True
            ).stdout
        )
        fetch = config.get("fetch", {})
        if "allow_networks" in fetch:
            env["FACECAPTION_FETCH__ALLOW_NETWORKS"] = '["127.0.0.0/8"]'
        else:
            notes.append("no fetch.allow_networks setting yet (loopback not blocked)")
        if args.polite:
            polite = {k: fetch[k] for k in ("per_host_concurrency", "per_host_rate") if k in fetch}
            notes.append(f"our per-host limits kept ({polite or 'none yet'})")
        elif "per_host_concurrency" in fetch:
            # img2dataset has no per-host limits: lift ours, so both run the same concurrency
            env["FACECAPTION_FETCH__PER_HOST_CONCURRENCY"] = str(args.threads)
            env["FACECAPTION_FETCH__PER_HOST_RATE"] = "0"
            notes.append(f"per-host limits lifted (per_host_concurrency {args.threads}, rate 0)")
        env = clean_env(env)
        subprocess.run([cli, "db", "upgrade"], env=env, capture_output=True, check=True)
        run_help = subprocess.run([cli, "run", "--help"], env=env, capture_output=True, text=True)
        # the fetch stage alone: the later stages are not compared (and need their models)
        command = [cli, "run", "--source", str(source), "--stage", "fetch"]
        if "--jobs" in run_help.stdout:
            command += ["--jobs", str(args.processes)]
        else:
            notes.append("`facecaption run` has no --jobs yet: one process, shards in turn")
        print("ours:", " ".join(command[1:]), "|", "; ".join(notes))
        measured = run_measured(command, env, work / "ours.log", args.max_seconds)
    statuses, ok_urls = Counter(), set()
    for path in sorted((work / "store" / "shards").glob("*/fetch.parquet")):
        table = pq.read_table(path, columns=["url", "status", "http_status"]).to_pylist()
        for row in table:
            status = row["status"]
            if status == "http_error":
                status += f" {row['http_status']}"
            statuses[status] += 1
            if row["status"] == "ok":
                ok_urls.add(row["url"])
    return Outcome("facecaption", measured, statuses, ok_urls, "; ".join(notes))


def img2dataset_command(
    source: Path, output: Path, processes: int, threads: int, timeout: float, per_shard: int
) -> list[str]:
    """img2dataset over a LAION-style parquet (URL, TEXT), bytes kept as sent (no resize, no
    re-encode), no retries, webdataset shards of `per_shard` rows, no telemetry."""
    return [
        str(VENV / "bin" / "img2dataset"),
        *("--url_list", str(source), "--input_format", "parquet"),
        *("--url_col", "URL", "--caption_col", "TEXT"),
        *("--output_format", "webdataset", "--output_folder", str(output)),
        *("--resize_mode", "no", "--skip_reencode", "True"),
        *("--processes_count", str(processes), "--thread_count", str(threads)),
        *("--timeout", f"{timeout:g}", "--retries", "0"),
        *("--number_sample_per_shard", str(per_shard), "--distributor", "multiprocessing"),
        *("--user_agent_token", "img2dataset", "--enable_wandb", "False"),
    ]


def run_img2dataset_command(command: list[str], work: Path, max_seconds: float) -> Measured:
    """Run an `img2dataset_command` measured, its log in `work`."""
    print("img2dataset:", " ".join(command[1:]))
    env = clean_env({"WANDB_MODE": "disabled", "WANDB_SILENT": "true"})
    return run_measured(command, env, work / "img2dataset.log", max_seconds)


def run_img2dataset(source: Path, work: Path, args: argparse.Namespace, shard_size: int) -> Outcome:
    output = work / "img2dataset"
    measured = run_img2dataset_command(
        img2dataset_command(source, output, args.processes, args.threads, args.timeout, shard_size),
        work,
        args.max_seconds,
    )
    statuses, ok_urls = Counter(), set()
    for path in sorted(output.glob("*.parquet")):
        for row in pq.read_table(path, columns=["url", "status", "error_message"]).to_pylist():
            status = row["status"]
            if status != "success":
                reason = (row["error_message"] or "").split(":")[0][:40]
                status = f"{status}: {reason}"
            statuses[status] += 1
            if row["status"] == "success":
                ok_urls.add(row["url"])
    return Outcome("img2dataset", measured, statuses, ok_urls)


# --- the report ---------------------------------------------------------------------------


@dataclass
class Checks:
    throttled_ok: int
    noai_kept: int
    noai_read_in_full: int
    noai_requested: int
    private_kept: int
    bombs_kept: int
    robots_fetches: int
    max_in_flight: int


def checks_for(outcome: Outcome, sites: Sites) -> Checks:
    def kept(kind: str) -> int:
        return sum(url.url in outcome.ok_urls for url in sites.urls if url.kind == kind)

    noai = [url for url in sites.urls if url.kind == "noai"]
    requested = [url for url in noai if sites.sites[url.site].hits.get(url.path)]
    in_full = [url for url in requested if url.path not in sites.sites[url.site].hung_up]
    return Checks(
        throttled_ok=kept("throttled"),
        noai_kept=kept("noai"),
        noai_read_in_full=len(in_full),
        noai_requested=len(requested),
        private_kept=kept("private"),
        bombs_kept=kept("bomb"),
        robots_fetches=sum(site.hits.get("robots.txt", 0) for site in sites.sites),
        max_in_flight=sum(site.max_in_flight for site in sites.sites),
    )


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"


def report_lines(
    ours: Outcome, theirs: Outcome, checks: dict[str, Checks], sites: Sites, args, version: str
) -> list[str]:
    a, b = ours.measured, theirs.measured
    ok_a, ok_b = len(ours.ok_urls), len(theirs.ok_urls)
    rate_a, rate_b = ok_a / a.wall_s, ok_b / b.wall_s
    cpu_k_a = a.cpu_s / ok_a * 1000 if ok_a else float("inf")
    cpu_k_b = b.cpu_s / ok_b * 1000 if ok_b else float("inf")
    ca, cb = checks["ours"], checks["theirs"]
    k = sites.kinds
    mib = 1024 * 1024

    def measure(name: str, x: float, y: float, fmt: str, target: str = "") -> tuple:
        return (name, format(x, fmt), format(y, fmt), ratio(x, y), target)

    def check(name: str, x: object, y: object, target: str = "") -> tuple:
        return (name, x, y, "", target)

    rows = [
        measure("wall seconds", a.wall_s, b.wall_s, ".1f"),
        measure("images kept (successes)", ok_a, ok_b, "d", "more"),
        measure("successes/s", rate_a, rate_b, ".1f", ">= 2x"),
        measure("CPU s, whole tree", a.cpu_s, b.cpu_s, ".1f"),
        measure("CPU s per 1,000 successes", cpu_k_a, cpu_k_b, ".2f", "<= 0.5x"),
        measure("peak RSS, whole tree (MiB)", a.peak_rss / mib, b.peak_rss / mib, ".0f", "< 1024"),
        check(
            f"429-then-OK recovered (of {k['throttled']})", ca.throttled_ok, cb.throttled_ok, "more"
        ),
        check(f"noai images kept (of {k['noai']})", ca.noai_kept, cb.noai_kept, "0"),
        check(
            "noai bodies read to the end (server)",
            f"{ca.noai_read_in_full}/{ca.noai_requested}",
            f"{cb.noai_read_in_full}/{cb.noai_requested}",
            "0",
        ),
        check(f"/private/ images kept (of {k['private']})", ca.private_kept, cb.private_kept, "0"),
        check(f"pixel bombs kept (of {k['bomb']})", ca.bombs_kept, cb.bombs_kept, "0"),
        check("robots.txt requests", ca.robots_fetches, cb.robots_fetches),
        check("most requests in flight (server)", ca.max_in_flight, cb.max_in_flight),
    ]
    mix = ", ".join(f"{kind} {count}" for kind, count in sorted(k.items(), key=lambda x: -x[1]))
    lines = [
        f"{len(sites.urls)} URLs over {len(HOSTS)} loopback hosts, 20-300 ms latency per request;"
        f" mix: {mix}. Good images are distinct JPEG/PNG crops of scikit-image's photos,"
        f" {sites.mean_good_kb:.0f} KiB on average; noai images {sites.noai_mb:.1f} MB, sent"
        " in 1 KiB pieces so that the server sees a client hang up after the headers; slow ones"
        f" answer after {args.timeout + 2:g} s; bombs are 30000x30000 PNGs. {platform.machine()},"
        f" {os.cpu_count()} cores, Python {platform.python_version()}.",
        "",
        "facecaption: `facecaption run --source --stage fetch` with"
        f" {args.threads} downloads per process,"
        f" {args.timeout:g} s read/total timeout, other settings default (retries 2 with"
        f" backoff){'; ' + ours.note if ours.note else ''}. img2dataset {version}:"
        f" processes_count {args.processes}, thread_count {args.threads}, timeout"
        f" {args.timeout:g}, retries 0 (its default), webdataset, resize_mode no +"
        " skip_reencode (JPEG bytes kept as is), default disallowed_header_directives.",
        "",
        "| | facecaption | img2dataset | ours / img2dataset | target |",
        "|---|---:|---:|---:|---|",
        *(f"| {' | '.join(str(cell) for cell in row)} |" for row in rows),
        "",
        "CPU: user+sys of every process in the tree (getrusage of reaped children, this"
        " process being their subreaper); psutil sampling every 50 ms gave"
        f" {a.cpu_sampled_s:.1f} s and {b.cpu_sampled_s:.1f} s. Peak RSS: the largest sum of"
        f" RSS over the live tree, sampled every 50 ms ({a.peak_processes} and"
        f" {b.peak_processes} processes at most).",
        "",
        "Row statuses, facecaption: "
        + ", ".join(f"{s} {n}" for s, n in sorted(ours.statuses.items(), key=lambda x: -x[1])),
        "",
        "Row statuses, img2dataset: "
        + ", ".join(f"{s} {n}" for s, n in sorted(theirs.statuses.items(), key=lambda x: -x[1])),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds, both tools")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32, help="downloads per process")
    parser.add_argument("--noai-mb", type=float, default=1.0, help="size of the noai images")
    parser.add_argument(
        "--polite",
        action="store_true",
        help="keep our per-host concurrency and rate limits (img2dataset has none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=1500, help="per tool, then killed")
    parser.add_argument("--admin-db-url", default=ADMIN_DB_URL, help="may CREATE DATABASE")
    parser.add_argument("--keep", action="store_true", help="keep the temporary dir")
    parser.add_argument("--write", type=Path, help="write the results as markdown here")
    args = parser.parse_args()

    version = ensure_img2dataset()
    print(f"img2dataset {version}; subreaper: {become_subreaper()}")
    shard_size = math.ceil(args.urls / args.processes)
    work = Path(tempfile.mkdtemp(prefix="bench_img2dataset_"))
    try:
        started = time.perf_counter()
        sites = build_sites(args.urls, args.timeout, args.noai_mb, args.seed)
        source = work / "source.parquet"
        write_source(sites.urls, source)
        took = time.perf_counter() - started
        print(f"built {len(sites.urls)} URLs in {took:.0f} s: {dict(sites.kinds)}")
        with contextlib.ExitStack() as stack:
            for site in sites.sites:
                stack.enter_context(site)
            outcomes, checks = {}, {}
            for label, contender in (("ours", run_ours), ("theirs", run_img2dataset)):
                sites.reset_counters()
                outcome = contender(source, work, args, shard_size)
                m = outcome.measured
                print(
                    f"{outcome.name}: rc {m.returncode}{' (killed: time limit)' * m.timed_out}, "
                    f"{m.wall_s:.1f} s, {len(outcome.ok_urls)} kept, CPU {m.cpu_s:.1f} s"
                )
                tail = m.log[-3000:] if m.returncode != 0 else "\n".join(m.log.splitlines()[-4:])
                print(f"--- {outcome.name} log (tail) ---\n{tail}\n---")
                outcomes[label], checks[label] = outcome, checks_for(outcome, sites)
        lines = report_lines(outcomes["ours"], outcomes["theirs"], checks, sites, args, version)
        print("\n".join(lines))
        if args.write:
            write_section(
                args.write,
                "Fetch vs img2dataset",
                f"python bench/bench_img2dataset.py --urls {args.urls} --timeout {args.timeout:g}"
                + " --polite" * args.polite,
                lines,
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
