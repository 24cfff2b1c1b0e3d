"""The dataset report's sections about the faces themselves (`facecaption.release.report` puts
them on the page): a gallery of a sample of aligned crops with what the pipeline said about
each, what detection dropped and why, which models made each stage's outputs (with a banner
when a demo stand-in made labels or captions), and colours for statuses that mean good or bad.

Like the rest of the report, these come from what each shard's export stored
(`facecaption.release.stats`), never from the shard artifacts: the models and the faces they
made are counted there, and the gallery's candidates are each exported shard's first
`export.gallery_faces_per_shard` released faces (never one under a takedown) with a small
JPEG of their crop. The gallery
shows `export.report_gallery_faces` of them chosen by the hash of their face id (the same
faces from one report to the next while their shards are unchanged), and reads the thumbnails
of those only.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from facecaption.core.artifacts import FETCH_KEPT, FETCH_POLICY
from facecaption.models.identity import is_demo_model
from facecaption.release.stats import THUMBNAILS

if TYPE_CHECKING:
    from facecaption.core.pipeline import Pipeline

PAPER = "FaceCaption-15M (Dai et al., “15M Multimodal Facial Image-Text Dataset”, arXiv:2407.08515)"
PAPER_URL = "https://arxiv.org/abs/2407.08515"
# What the paper did at each step, for the report's notes.
PAPER_FIGURES = [
    ("source", "LAION-Face: ~50M image-text pairs"),
    ("fetch", "~75% of the URLs still downloadable: ~37.5M images"),
    ("detect", "RetinaFace; faces over 128x128 px at confidence > 0.98: ~23M faces"),
    ("attributes", "40 CelebA attributes, a label at p > 0.85, faces with >= 5 labels: ~15M"),
    ("captions", "a grammar's text rewritten by Qwen-7B-Chat: 15M face-text pairs"),
]
GOOD, NEUTRAL, WARN, BAD = "#54a24b", "#9d9d9d", "#f2a541", "#e45756"


def status_colour(status: str) -> str:
    """Green for what was kept, grey for a duplicate, amber for a policy refusal (someone
    asked), red for a failure."""
    if status == "ok":
        return GOOD
    if status in FETCH_KEPT:
        return NEUTRAL
    return WARN if status in FETCH_POLICY else BAD


def outcome_colour(outcome: str) -> str:
    """Fidelity outcomes and detect counts: kept or passed is good, dropped or failed bad."""
    if outcome in ("pass", "retry_pass", "llm") or outcome.startswith("aligned_five_point"):
        return GOOD
    if outcome in ("template",) or outcome.startswith("aligned_"):
        return NEUTRAL
    if outcome in ("fallback",):
        return BAD
    return WARN


def detect_outcomes(detect_counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """Why detected faces were dropped, and how the kept ones were aligned."""
    return {
        "dropped": {
            name.removeprefix("dropped_"): n
            for name, n in sorted(detect_counts.items())
            if name.startswith("dropped_")
        },
        "aligned": {
            name.removeprefix("aligned_"): n
            for name, n in sorted(detect_counts.items())
            if name.startswith("aligned_")
        },
        "detected": detect_counts.get("faces_detected", 0),
        "kept": detect_counts.get("faces_kept", 0),
    }


def models_used(models: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """Per model stage: each model id with the faces it made (in the exported shards, as their
    statistics say), and whether a demo stand-in made any of them."""
    return {
        stage: {"models": ids, "demo": any(is_demo_model(model_id) for model_id in ids)}
        for stage, ids in models.items()
    }


def gallery(pipeline: Pipeline, faces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chosen gallery faces with their thumbnails (data: URIs), read from the statistics
    their exports stored, these only."""
    keys = [(face["face_id"].split("/", 1)[0], face["face_id"]) for face in faces]
    thumbnails = pipeline.state.stats_items("export", THUMBNAILS, keys)
    return [
        {**face, "thumbnail": thumbnails[key]}
        for face, key in zip(faces, keys, strict=True)
        if key in thumbnails
    ]


# --- rendering -------------------------------------------------------------------------------

STYLE = """
.banner{background:#fdecea;border:1px solid #e45756;padding:.6rem .9rem;border-radius:4px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:.8rem}
.face{border:1px solid #dde;border-radius:4px;padding:.5rem;margin:0;font-size:12px}
.face small{word-break:break-all;color:#667}#models td:nth-child(2){word-break:break-all}
.face img{display:block;margin:0 auto .4rem;border-radius:3px}
.face .labels{color:#345}.face .raw{color:#667}.verdict{font-weight:600}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.3em}
"""


def render_banner(models: dict[str, dict[str, Any]]) -> str:
    """A warning when demo stand-ins made the labels or the captions."""
    made = {"attribute": "attribute labels", "caption": "captions"}
    demo = [made[stage] for stage in made if models.get(stage, {}).get("demo")]
    if not demo:
        return ""
    return (
        '<p class="banner" id="demo-banner"><strong>Demo models made the '
        f"{' and '.join(demo)} of this build.</strong> They are stand-ins that run the pipeline"
        " offline: their outputs mean nothing. Pull real models (`facecaption models pull`)"
        " and run again for real data.</p>"
    )


def render_models(models: dict[str, dict[str, Any]], table: Any) -> str:
    rows = [
        [stage, model_id + (" (demo stand-in)" if is_demo_model(model_id) else ""), faces]
        for stage, entry in models.items()
        for model_id, faces in entry["models"].items()
    ]
    return "<h2>Models used</h2>" + table(["stage", "model", "faces"], rows, "models")


def render_detect(outcomes: dict[str, Any], bars: Any) -> str:
    dropped = list(outcomes["dropped"].items())
    aligned = [(f"aligned_{k}", v) for k, v in outcomes["aligned"].items()]
    return (
        "<h2>Detection: dropped and kept faces</h2>"
        f'<p class="note">{outcomes["detected"]} faces detected, {outcomes["kept"]} kept.'
        " Dropped: low_score (under detect.min_score), too_small (a side under"
        " detect.min_face_px), out_of_image, over_cap. Kept faces by alignment.</p>"
        + bars(
            dropped + aligned,
            "Detect outcomes",
            colors=[WARN] * len(dropped) + [outcome_colour(k) for k, _ in aligned],
        )
    )


def render_gallery(faces: list[dict[str, Any]], sampled_from: int, candidates: int) -> str:
    if not faces:
        return '<h2>Faces</h2><p class="note">No released faces yet.</p>'
    cards = []
    for face in faces:
        verdict = face["fidelity"]
        cards.append(
            '<figure class="face">'
            f'<img src="{face["thumbnail"]}" alt="aligned crop {html.escape(face["face_id"])}">'
            f'<div class="labels">{html.escape(", ".join(face["labels"]))}</div>'
            f'<p class="raw">{html.escape(face["raw_text"])}</p>'
            f"<p>{html.escape(face['caption'])}</p>"
            f'<div><span class="swatch" style="background:{outcome_colour(verdict)}"></span>'
            f'<span class="verdict">{html.escape(verdict)}</span> ({face["caption_source"]})'
            f"</div><small>{html.escape(face['face_id'])}</small></figure>"
        )
    return (
        "<h2>Faces</h2>"
        f'<p class="note">{len(faces)} of {sampled_from} released faces, chosen by face id'
        f" from {candidates} kept by the exports (the first ones of each shard): the aligned"
        " crop, its valid attribute labels, the grammar's text (grey), the caption and the"
        " fidelity check's verdict.</p>"
        f'<div class="gallery" id="gallery">{"".join(cards)}</div>'
    )


def render_paper_figures() -> str:
    items = "".join(
        f"<li><strong>{html.escape(step)}</strong>: {html.escape(text)}</li>"
        for step, text in PAPER_FIGURES
    )
    return (
        "<h2>The paper's figures</h2>"
        f'<p class="note">Compared with <a href="{PAPER_URL}">{html.escape(PAPER)}</a>:</p>'
        f'<ul id="paper-figures">{items}</ul>'
    )
