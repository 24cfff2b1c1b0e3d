"""The dataset report: one self-contained HTML file (inline SVG plots, no scripts to run, no
network) that people read before they use or cite a build.

It shows the funnel source -> fetched -> with faces -> kept faces -> attributed -> captioned
-> released next to FaceCaption-15M's ratios (the paper's figures cited), a gallery of a
sample of faces (crop, labels, raw text, caption, fidelity verdict), the models each stage
used (a banner when demo stand-ins made labels or captions), detect drop reasons (these
face-level sections are `facecaption.release.report_faces`), the fetch status breakdown (in
colours that mean kept, policy or failure), image and face resolution distributions,
attribute and category frequencies, caption lengths, distinct 4-grams of the grammar's text
vs the LLM's captions, fidelity-check outcomes, BRISQUE image quality of a sample of released
crops, and per-stage throughput from the attempt history.

Counts come from the state DB (the same numbers `facecaption status --json` sums); the
distributions, the models used and the gallery's faces are merged from the statistics each
shard's export stored once (`facecaption.release.stats`; the gallery's thumbnails are read
for the faces shown only), so writing the report reads no shard artifact and costs the same
few queries at 5,000 shards as at 5. The numbers are also embedded as JSON
(`<script type="application/json" id="report-data">`).
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facecaption.attribute.labels import CATEGORIES
from facecaption.core.artifacts import (
    FETCH_KEPT,
    FETCH_POLICY,
    RELEASE_DIR,
    RELEASE_PARQUET,
    REPORT_NAME,
)
from facecaption.core.bulk import collector_paused
from facecaption.core.store import ArtifactStore
from facecaption.fetch.web.throttle import HOST_COUNTS
from facecaption.release import report_faces
from facecaption.release.publish import release_ownership
from facecaption.release.stats import (
    BRISQUE_BINS,
    SIDE_BINS,
    STATS_FORMAT,
    THUMBNAILS,
    WORD_BINS,
    histogram,
    merge_stats,
    shard_stats,
)
from facecaption.state.history import stage_throughput

if TYPE_CHECKING:
    from facecaption.core.pipeline import Pipeline

# FaceCaption-15M's funnel (paper): share of the previous step kept at each step.
PAPER_FUNNEL = {
    "source": 50_000_000,
    "fetched": 37_500_000,
    "with_faces": 37_000_000,
    "kept_faces": 23_000_000,
    "attributed": 15_000_000,
    "captioned": 15_000_000,
}
FUNNEL_LABELS = {
    "source": "source rows (URLs)",
    "fetched": "images fetched",
    "with_faces": "images with a face",
    "kept_faces": "faces kept (score, size)",
    "attributed": "faces with enough labels",
    "captioned": "faces captioned",
    "released": "rows released",
}


def _bin_labels(edges: list[float]) -> list[str]:
    def fmt(x: float) -> str:
        return "∞" if x == math.inf else ("-∞" if x == -math.inf else f"{x:g}")

    return [f"{fmt(a)}–{fmt(b)}" for a, b in zip(edges, edges[1:], strict=False)]


def collect(pipeline: Pipeline, max_crops: int | None = None) -> dict[str, Any]:
    """Every number the report shows, as plain data: counts summed in SQL, distributions
    merged from the statistics each shard's export stored (no shard artifact is read, except
    once for a shard exported before statistics were kept). A fixed number of queries."""
    state = pipeline.state
    max_crops = pipeline.settings.export.report_max_crops if max_crops is None else max_crops
    shards, source_rows = state.shard_totals()
    done = state.stage_totals(shards, pipeline.stage_names, status="done")
    fetch, detect, attribute, caption, export = (
        Counter(done.get(stage, {}).get("counts", {}))
        for stage in ("fetch", "detect", "attribute", "caption", "export")
    )
    funnel = {
        "source": source_rows,
        "fetched": sum(fetch.get(status, 0) for status in FETCH_KEPT),
        "with_faces": detect.get("images_with_faces", 0),
        "kept_faces": detect.get("faces_kept", 0),
        "attributed": attribute.get("kept", 0),
        "captioned": caption.get("faces", 0),
        "released": export.get("released", 0),
    }
    statuses = {
        name: fetch.get(name, 0)
        for name in sorted(fetch)
        if name not in {"rows", "bytes", "fetched", "reused", "retryable", *HOST_COUNTS}
    }
    gallery_faces = pipeline.settings.export.report_gallery_faces
    stats = export_stats(pipeline)  # may rebuild a shard's from its artifacts: not paused
    with collector_paused():  # merging makes no cycles; the statistics go before it runs
        merged = merge_stats(stats.values(), max_crops, gallery_faces)
    quality = merged["quality_scores"]
    categories = {
        category: sum(merged["attributes"][name] for name in names)
        for category, names in CATEGORIES.items()
    }
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "shards": shards,
        "exported_shards": merged["shards"],
        "funnel": funnel,
        "paper_funnel": PAPER_FUNNEL,
        "fetch_statuses": statuses,
        "policy_statuses": sorted(FETCH_POLICY),
        "image_min_side": {"bins": _bin_labels(SIDE_BINS), "counts": merged["image_min_side"]},
        "face_min_side": {"bins": _bin_labels(SIDE_BINS), "counts": merged["face_min_side"]},
        "attributes": merged["attributes"],
        "categories": categories,
        "caption_words": {"bins": _bin_labels(WORD_BINS), "counts": merged["caption_words"]},
        "caption_sources": merged["caption_sources"],
        "fidelity": merged["fidelity"],
        "unique_4grams": merged["unique_4grams"],
        "brisque": {
            "crops": len(quality),
            "sampled_from": merged["released"],
            "mean": sum(quality) / len(quality) if quality else None,
            "median": sorted(quality)[len(quality) // 2] if quality else None,
            "bins": _bin_labels(BRISQUE_BINS),
            "counts": histogram(quality, BRISQUE_BINS),
            "note": merged["quality_note"],
        },
        "throughput": _throughput(pipeline),
        "hosts": fetch_hosts(pipeline, fetch),
        "detect": report_faces.detect_outcomes(detect),
        "models": report_faces.models_used(merged["models"]),
        "gallery": {
            "faces": report_faces.gallery(pipeline, merged["gallery_faces"]),
            "sampled_from": merged["released"],
            "candidates": merged["gallery_candidates"],
        },
    }


def fetch_hosts(pipeline: Pipeline, fetch: Counter) -> dict[str, Any]:
    """The fetch's manners: totals over every host, and the most asked hosts' figures merged
    over the shards that kept them (requests, 429s and pauses summed; the learned rate is
    the lowest a shard ended at). One query."""
    stats, _ = pipeline.state.finished_stats("fetch")
    merged: dict[str, dict[str, float]] = {}
    for shard in stats.values():
        for host, figures in (shard.get("hosts") or {}).items():
            entry = merged.setdefault(host, {"requests": 0, "throttled": 0, "paused_s": 0.0})
            for name in ("requests", "throttled", "paused_s"):
                entry[name] += figures.get(name, 0)
            if figures.get("rate"):
                entry["rate"] = min(entry.get("rate", figures["rate"]), figures["rate"])
    top = sorted(merged.items(), key=lambda item: (-item[1]["requests"], item[0]))
    return {
        "totals": {name: fetch.get(name, 0) for name in HOST_COUNTS},
        "busiest": top[: pipeline.settings.fetch.report_hosts],
    }


def render_hosts(hosts: dict[str, Any]) -> str:
    totals = hosts["totals"]
    rows = [
        [
            host,
            int(f["requests"]),
            int(f["throttled"]),
            f"{f['paused_s']:.1f}",
            f"{f['rate']:.1f}" if "rate" in f else "",
        ]
        for host, f in hosts["busiest"]
    ]
    return "".join(
        [
            "<h2>Hosts (fetch manners)</h2>",
            f'<p class="note">{totals["host_requests"]} requests to {totals["hosts"]} hosts'
            f" (summed over shards); {totals['host_throttled']} answered 429/503; hosts asked us"
            f" to pause for {totals['host_paused_ms'] / 1000:.1f} s in all. The most asked"
            " hosts (learned rate: the lowest a shard ended at, requests/s; blank: the host"
            " never pushed back):</p>",
            _table(["host", "requests", "429/503", "paused s", "learned rate"], rows, "hosts"),
        ]
    )


def export_stats(pipeline: Pipeline) -> dict[str, dict[str, Any]]:
    """Each exported shard's report statistics as its export stored them, without the
    gallery's thumbnails. A shard exported before statistics were kept (or in an older
    format) has them worked out from its artifacts now, once, and stored."""
    state, store = pipeline.state, pipeline.store
    stats, missing = state.finished_stats("export", leave_out=[THUMBNAILS])
    for shard_id, stored in list(stats.items()):
        if stored.get("format") != STATS_FORMAT:
            del stats[shard_id]
            missing[shard_id] = state.get_stage(shard_id, "export").attempt
    for shard_id, attempt in sorted(missing.items()):
        released = store.read_table(store.shard_path(shard_id, RELEASE_PARQUET), ["face_id"])
        stats[shard_id] = shard_stats(
            store,
            shard_id,
            released.column("face_id").to_pylist(),
            pipeline.settings.export.quality_crops_per_shard,
            pipeline.settings.export.gallery_faces_per_shard,
        )
        state.record_stats(shard_id, "export", attempt, stats[shard_id])
        del stats[shard_id][THUMBNAILS]
    return stats


THROUGHPUT_UNITS = {
    "fetch": "rows",
    "detect": "images",
    "attribute": "faces",
    "caption": "faces",
    "export": "captioned",
}


def _throughput(pipeline: Pipeline) -> dict[str, dict[str, float]]:
    """Per stage, from the `done` events of the attempt history: items per second of task
    time (the unit each stage counts), attempts, and total seconds."""
    totals = stage_throughput(pipeline.state.engine, THROUGHPUT_UNITS)
    result: dict[str, dict[str, float]] = {}
    for stage, unit in THROUGHPUT_UNITS.items():
        row = totals.get(stage)
        seconds, items = (float(row.seconds), int(row.items)) if row else (0.0, 0)
        result[stage] = {
            "unit": unit,
            "attempts": row.attempts if row else 0,
            "seconds": round(seconds, 3),
            "items": items,
            "per_second": round(items / seconds, 2) if seconds > 0 else 0.0,
        }
    return result


# --- rendering -------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2430}
h1{font-size:1.6rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde}
table{border-collapse:collapse;margin:.5rem 0}
td,th{padding:.25rem .6rem;border-bottom:1px solid #eef;text-align:right}
th:first-child,td:first-child{text-align:left}.note{color:#667}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1.5rem}svg text{font-size:11px;fill:#334}
"""


def _bars(
    items: list[tuple[str, float]],
    title: str,
    color: str = "#4c78a8",
    colors: list[str] | None = None,
) -> str:
    """A horizontal bar chart as inline SVG; `colors` gives each bar its own."""
    width, label_w, bar_h = 520, 190, 18
    height = bar_h * max(1, len(items)) + 24
    peak = max((value for _, value in items), default=0) or 1
    parts = [
        f'<svg role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{html.escape(title)}</title>"
    ]
    for i, (label, value) in enumerate(items):
        y = 4 + i * bar_h
        w = (width - label_w - 70) * value / peak
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{html.escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{bar_h - 5}"'
            f' fill="{colors[i] if colors else color}"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 13}">{value:g}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(header: list[str], rows: list[list[Any]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _ratio(numerator: float, denominator: float, step: str) -> str:
    if not denominator:
        return "–"
    if step == "kept_faces":  # faces from images: a rate per image, not a share
        return f"{numerator / denominator:.2f} per image"
    return f"{numerator / denominator:.1%}"


def render(data: dict[str, Any], title: str = "facecaption dataset report") -> str:
    funnel, paper = data["funnel"], data["paper_funnel"]
    steps = list(FUNNEL_LABELS)
    funnel_rows = []
    for i, step in enumerate(steps):
        previous = steps[i - 1] if i else None
        ours = _ratio(funnel[step], funnel[previous], step) if previous else ""
        theirs = _ratio(paper[step], paper[previous], step) if previous and step in paper else ""
        funnel_rows.append(
            [
                FUNNEL_LABELS[step],
                funnel[step],
                ours,
                f"{paper.get(step, 0):,}" if step in paper else "",
                theirs,
            ]
        )
    quality = data["brisque"]
    throughput_rows = [
        [stage, t["attempts"], t["items"], t["unit"], t["seconds"], t["per_second"]]
        for stage, t in data["throughput"].items()
    ]
    grams = data["unique_4grams"]
    statuses = list(data["fetch_statuses"].items())
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        report_faces.render_banner(data["models"]),
        f'<p class="note">Generated {html.escape(data["generated_at"])} from {data["shards"]}'
        " shards. Counts come from the state DB; distributions from the statistics stored by"
        f" the export of each of the {data['exported_shards']} exported shards.</p>",
        "<h2>Funnel</h2>",
        _table(
            ["step", "count", "kept of previous", "FaceCaption-15M", "paper: kept of previous"],
            funnel_rows,
            "funnel",
        ),
        _bars([(FUNNEL_LABELS[s], funnel[s]) for s in steps], "Funnel"),
        report_faces.render_paper_figures(),
        report_faces.render_gallery(**data["gallery"]),
        report_faces.render_models(data["models"], _table),
        report_faces.render_detect(data["detect"], _bars),
        '<div class="grid"><div><h2>Fetch statuses</h2>',
        _table(["status", "rows"], statuses, "fetch-statuses"),
        '<p class="note">Green: kept; grey: a duplicate; amber: refused by policy (opt-out,'
        " robots.txt, address, takedown); red: a failure.</p>",
        "</div><div><h2>&nbsp;</h2>",
        _bars(
            statuses,
            "Fetch statuses",
            colors=[report_faces.status_colour(status) for status, _ in statuses],
        ),
        "</div></div>",
        render_hosts(data["hosts"]),
        '<div class="grid"><div><h2>Image resolution (shorter side, px)</h2>',
        _bars(
            list(
                zip(data["image_min_side"]["bins"], data["image_min_side"]["counts"], strict=True)
            ),
            "Image shorter side",
        ),
        "</div><div><h2>Face crop resolution (shorter side, px)</h2>",
        _bars(
            list(zip(data["face_min_side"]["bins"], data["face_min_side"]["counts"], strict=True)),
            "Face crop shorter side",
        ),
        "</div></div>",
        "<h2>Attributes of kept faces</h2>",
        _bars(
            sorted(data["attributes"].items(), key=lambda kv: -kv[1]),
            "Attribute frequencies",
            "#54a24b",
        ),
        _table(["category", "labels"], list(data["categories"].items()), "categories"),
        '<div class="grid"><div><h2>Caption length (words)</h2>',
        _bars(
            list(zip(data["caption_words"]["bins"], data["caption_words"]["counts"], strict=True)),
            "Caption words",
            "#f58518",
        ),
        "</div><div><h2>Captions: grammar text vs LLM</h2>",
        _table(
            ["text", "captions", "distinct 4-grams"],
            [[kind, g["captions"], g["unique_4grams"]] for kind, g in grams.items()],
            "ngrams",
        ),
        _table(
            ["caption source", "faces"], list(data["caption_sources"].items()), "caption-sources"
        ),
        "<h2>Fidelity check</h2>",
        _table(["outcome", "faces"], list(data["fidelity"].items()), "fidelity"),
        _bars(
            list(data["fidelity"].items()),
            "Fidelity outcomes",
            colors=[report_faces.outcome_colour(outcome) for outcome in data["fidelity"]],
        ),
        "</div></div>",
        "<h2>Image quality (BRISQUE, lower is better)</h2>",
        f'<p class="note">{quality["crops"]} released crops scored (sampled from'
        f" {quality['sampled_from']}: the first ones of each shard, chosen by face id);"
        f" mean {_fmt(quality['mean'])}, median {_fmt(quality['median'])}."
        f" {html.escape(quality['note'])}</p>",
        _bars(list(zip(quality["bins"], quality["counts"], strict=True)), "BRISQUE", "#72b7b2"),
        "<h2>Throughput (task time, from the attempt history)</h2>",
        _table(
            ["stage", "attempts", "items", "unit", "seconds", "items/s"],
            throughput_rows,
            "throughput",
        ),
    ]
    # the numbers, without the gallery's embedded pictures (they are on the page already)
    numbers = {
        **data,
        "gallery": {
            **data["gallery"],
            "faces": [
                {k: v for k, v in face.items() if k != "thumbnail"}
                for face in data["gallery"]["faces"]
            ],
        },
    }
    blob = json.dumps(numbers, sort_keys=True).replace("</", "<\\/")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}{report_faces.STYLE}</style></head>"
        "<body>"
        + "".join(sections)
        + f'<script type="application/json" id="report-data">{blob}</script></body></html>'
    )


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def write_report(pipeline: Pipeline, out: Path | None = None) -> str:
    """Collect, render and publish the report: at `{root}/release/report.html` in the
    artifact store (holding the release, like a publish), or at a local `out` path. Either
    way it appears whole or not at all."""
    page = render(collect(pipeline))
    if out is not None:
        out = out.expanduser().resolve()
        store, target = ArtifactStore(str(out.parent)), str(out)
        with store.publish(target) as tmp:
            tmp.write_text(page, encoding="utf-8")
        return store.uri(target)
    target = f"{pipeline.store.root}/{RELEASE_DIR}/{REPORT_NAME}"
    with release_ownership(pipeline) as store, store.publish(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return store.uri(target)
