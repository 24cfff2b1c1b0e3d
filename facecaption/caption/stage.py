"""Caption: each kept face's valid attributes become raw text through the grammar, then one
natural caption through an LLM rewrite that must pass the fidelity check (`captions.parquet`).

For every face: raw text = the grammar's sentences for its labels (seeded by the settings'
seed and the face id, so the same face always gets the same text). The LLM gets the prompt
template filled with the raw text. A reply that drops a valid attribute or states a
contradiction (see `facecaption.caption.fidelity`) is asked for once more; if it fails again, or the
backend gave no reply, the caption is the raw text. Each row records what happened:

  fidelity = "pass" (first reply), "retry_pass" (second reply), "fallback" (raw text used
  after two failures or no reply), "template" (the template backend: no LLM asked)

Text statistics (words and distinct 4-grams, for raw text and for accepted LLM captions) go
into the stage's counts; `facecaption text-stats` computes them over all shards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.caption.fidelity import check_caption
from facecaption.caption.grammar import Grammar
from facecaption.core.artifacts import ATTRIBUTES_PARQUET, CAPTIONS_PARQUET, CAPTIONS_SCHEMA
from facecaption.core.stage import StageContext, StageResult, upstream_checksums
from facecaption.core.writers import write_parquet
from facecaption.models.identity import caption_identity
from facecaption.settings import CaptionSettings, Settings
from facecaption.state import Shard, ShardState

PROMPTS_PER_CALL = 256  # faces handed to the rewriter at once (it batches further inside)
NGRAM = 4


def words(text: str) -> list[str]:
    return [word.strip(".,;:!?\"'()").lower() for word in text.split() if word.strip(".,;:!?")]


def ngrams(tokens: list[str]) -> Iterator[tuple[str, ...]]:
    """The word 4-grams of a caption."""
    return zip(*(tokens[i:] for i in range(NGRAM)), strict=False)


def text_stats(texts: Iterable[str]) -> dict[str, int]:
    """Caption count, total words and distinct word 4-grams (the paper's comparison)."""
    count = total = 0
    grams: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = words(text)
        count += 1
        total += len(tokens)
        grams.update(ngrams(tokens))
    return {"captions": count, "words": total, "unique_4grams": len(grams)}


def grammar_for(settings: CaptionSettings) -> Grammar:
    return Grammar.load(Path(settings.grammar_path) if settings.grammar_path else None)


class CaptionStage:
    name = "caption"
    version = "1"
    artifact_names = (CAPTIONS_PARQUET,)

    def fingerprint_inputs(
        self, shard: Shard, settings: Settings, state: ShardState
    ) -> dict[str, Any]:
        return {
            "attribute": upstream_checksums(state, shard.shard_id, "attribute"),
            "settings": settings.caption.output_settings(),
            "grammar": grammar_for(settings.caption).fingerprint,
            "model": caption_identity(settings),
        }

    def run(self, context: StageContext) -> StageResult:
        shard, store, limits = context.shard, context.store, context.settings.caption
        grammar = grammar_for(limits)
        attributes = store.read_table(store.shard_path(shard.shard_id, ATTRIBUTES_PARQUET))
        faces = [face for face in attributes.to_pylist() if face["kept"]]
        rewriter = None
        if limits.backend != "template" and faces:
            from facecaption.caption.rewriters import load_rewriter

            rewriter = load_rewriter(context.settings)
        rows: list[dict[str, Any]] = []
        for start in range(0, len(faces), PROMPTS_PER_CALL):
            rows += caption_faces(
                faces[start : start + PROMPTS_PER_CALL], grammar, limits, rewriter
            )
        path = store.shard_path(shard.shard_id, CAPTIONS_PARQUET)
        with store.publish(path) as tmp:
            write_parquet(rows, CAPTIONS_SCHEMA, tmp)
            ref = store.describe(path, tmp)
        fidelity = Counter(row["fidelity"] for row in rows)
        raw = text_stats(row["raw_text"] for row in rows)
        llm = text_stats(row["caption"] for row in rows if row["caption_source"] == "llm")
        return StageResult(
            counts={
                "faces": len(rows),
                **{f"fidelity_{outcome}": n for outcome, n in sorted(fidelity.items())},
                "raw_words": raw["words"],
                "raw_unique_4grams": raw["unique_4grams"],
                "llm_captions": llm["captions"],
                "llm_words": llm["words"],
                "llm_unique_4grams": llm["unique_4grams"],
            },
            artifacts={CAPTIONS_PARQUET: ref},
        )


def caption_faces(
    faces: list[dict[str, Any]], grammar: Grammar, limits: CaptionSettings, rewriter: Any
) -> list[dict[str, Any]]:
    """Caption rows for attribute rows, asking the rewriter at most twice per face."""
    raw = [
        grammar.raw_text(
            face["valid_labels"], f"{limits.seed}:{face['face_id']}", exclude=limits.exclude_labels
        )
        for face in faces
    ]
    rows = [
        {
            "face_id": face["face_id"],
            "raw_text": text,
            "caption": text,
            "caption_source": "template",
            "fidelity": "template" if rewriter is None else "fallback",
            "missing": [],
            "contradicted": [],
            "model_id": "template" if rewriter is None else rewriter.model_id,
            "prompt_version": limits.prompt_version,
        }
        for face, text in zip(faces, raw, strict=True)
    ]
    pending = list(range(len(faces))) if rewriter is not None else []
    for outcome in ("pass", "retry_pass"):
        if not pending:
            break
        replies = rewriter.rewrite(
            [limits.prompt_template.format(raw_text=raw[i]) for i in pending]
        )
        failed = []
        for index, reply in zip(pending, replies, strict=True):
            face = faces[index]
            probabilities = {name: face[f"p_{name}"] for name in CELEBA_ATTRIBUTES}
            result = check_caption(
                reply or "",
                face["valid_labels"],
                probabilities,
                absent_below=limits.absent_below,
                exclude=limits.exclude_labels,
            )
            rows[index].update(missing=list(result.missing), contradicted=list(result.contradicted))
            if reply and result.passed:
                rows[index].update(caption=reply.strip(), caption_source="llm", fidelity=outcome)
            else:
                failed.append(index)
        pending = failed
    for row in rows:
        row["word_count"] = len(words(row["caption"]))
    return rows
