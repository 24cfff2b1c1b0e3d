"""Caption: each kept face's valid attributes become raw text through the grammar, then one
natural caption through an LLM rewrite that must pass the fidelity check (`captions.parquet`).

For every face: raw text = the grammar's sentences for its labels (seeded by the settings'
seed and the face id, so the same face always gets the same text). The LLM gets the prompt
template filled with the raw text. A reply longer than `max_caption_words` words or
`max_caption_chars` characters is cut there (at a word boundary) before anything else looks at
it, and flagged `reply_truncated`. A reply that drops a valid attribute or states a
contradiction (see `facecaption.caption.fidelity`) is asked for once more, and the retry is
a different request: the conversation carries the first reply and `retry_prompt` saying what
it left out or contradicted, and the seed is the settings' plus one (an identical request to
a greedy model would only get the identical answer). If the retry fails too, the caption is
the raw text. A face whose request got no usable reply (see the reasons in
`facecaption.caption.rewriters`: timeout, http_error, not_json, bad_shape, empty_reply, ...)
falls back to the raw text at once, with its reason; it is not asked again in this run (the
server backend already retried what a retry can fix), and the transient reasons (timeout,
connection_error, bad_http, server_error) are counted as `retryable`: a later run asks for
that face again, within a budget across runs (`facecaption.core.retry_budget`): a refresh
(`run --retry-transient`) asks once its pause has passed (`caption.face_retry_pause_s`,
doubling with each run; a forced run does not wait), and the run that asks for the
`caption.face_max_runs`-th time and fails again makes it final, `gave_up_<last reason>`
(e.g. `gave_up_server_error`), with the raw text as its caption. A run over earlier outputs
made from the same inputs keeps every face that is final (and the pausing ones) as it is and
asks only for the rest (`run --force` too); a fresh run (`run_stage(fresh=True)`) asks for
every face. Each row records what happened:

  fidelity = "pass" (first reply), "retry_pass" (second reply), "fallback" (raw text used
  after two failures or no usable reply), "template" (the template backend: no LLM asked)
  rewrite_error = why the last reply was not usable (then fidelity is "fallback"; a
  transient reason whose budget is spent is "gave_up_" + that reason), or "reply_truncated"
  (the reply was cut to the caption cap); null otherwise

A bad reply changes its face's row only: the stage finishes. Text statistics (words and
distinct 4-grams, for raw text and for accepted LLM captions) go into the stage's counts,
with one `rewrite_<reason>` count per reason; `facecaption text-stats` computes them over all
shards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from facecaption.attribute.labels import CELEBA_ATTRIBUTES
from facecaption.caption.fidelity import check_caption
from facecaption.caption.grammar import Grammar
from facecaption.caption.rewriters import (
    TRANSIENT_ERRORS,
    Conversation,
    Rewriter,
    ask,
    load_rewriter,
)
from facecaption.core.artifacts import ATTRIBUTES_PARQUET, CAPTIONS_PARQUET, CAPTIONS_SCHEMA
from facecaption.core.retry_budget import RetryBudget, next_due
from facecaption.core.stage import StageContext, StageInputs, StageResult, upstream_checksums
from facecaption.core.writers import write_parquet
from facecaption.models.identity import caption_identity
from facecaption.models.loaded import LOADED_MODELS, model_key
from facecaption.settings import CaptionSettings, Settings
from facecaption.state import Shard
from facecaption.state.retries import RowRetry

PROMPTS_PER_CALL = 256  # faces handed to the rewriter at once (it batches further inside)
NGRAM = 4
REPLY_TRUNCATED = "reply_truncated"  # rewrite_error of a reply cut to the caption cap
GAVE_UP = "gave_up_"  # rewrite_error prefix of a face whose budget of runs is spent


def gave_up(reason: str) -> str:
    """The rewrite_error of a face whose last run of its budget failed with `reason`."""
    return GAVE_UP + reason


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


def shard_rewriter(settings: Settings) -> Rewriter:
    """The rewriter for a shard. An in-process LLM is loaded once per Airflow task; in a
    process that runs many shards (`facecaption run`), the one loaded for an earlier shard is
    used while it is the same model with the same settings (see `facecaption.models.loaded`).
    A server's client is cheap and made for each shard."""
    if settings.caption.backend != "transformers":
        return load_rewriter(settings)
    return LOADED_MODELS.get(
        "llm",
        model_key(caption_identity(settings), settings.caption),
        lambda: load_rewriter(settings),
    )


class CaptionStage:
    name = "caption"
    version = "2"  # 2: rewrite_error, caption caps, the retry asks differently
    artifact_names = (CAPTIONS_PARQUET,)
    cross_shard_inputs = ()

    def settings_inputs(self, settings: Settings) -> dict[str, Any]:
        return {
            "settings": settings.caption.output_settings(),
            "grammar": grammar_for(settings.caption).fingerprint,
            "model": caption_identity(settings),
        }

    def shard_inputs(self, shard: Shard, settings: Settings, inputs: StageInputs) -> dict[str, Any]:
        return {"attribute": upstream_checksums(inputs, shard.shard_id, "attribute")}

    def run(self, context: StageContext) -> StageResult:
        shard, store, limits = context.shard, context.store, context.settings.caption
        grammar = grammar_for(limits)
        attributes = store.read_table(store.shard_path(shard.shard_id, ATTRIBUTES_PARQUET))
        faces = [face for face in attributes.to_pylist() if face["kept"]]
        path = store.shard_path(shard.shard_id, CAPTIONS_PARQUET)
        budget = face_budget(limits)
        now = datetime.now(UTC)
        # faces that met a transient fault before: runs used, and when each is due again
        ledger = context.earlier_retries()
        pausing = budget.pausing(ledger, now, context.forced)
        done = (
            {
                row["face_id"]: row
                for row in store.read_table(path).to_pylist()
                if row["rewrite_error"] not in TRANSIENT_ERRORS or row["face_id"] in pausing
            }
            if context.previous
            else {}
        )
        to_ask = [face for face in faces if face["face_id"] not in done]
        rewriter = None
        if limits.backend != "template" and to_ask:
            rewriter = shard_rewriter(context.settings)
        asked: dict[str, dict[str, Any]] = {}
        for start in range(0, len(to_ask), PROMPTS_PER_CALL):
            batch = caption_faces(
                to_ask[start : start + PROMPTS_PER_CALL], grammar, limits, rewriter
            )
            asked.update((row["face_id"], row) for row in batch)
            context.progress({"faces": len(done) + len(asked), "to_caption": len(faces)})
        rows = [asked.get(face["face_id"]) or done[face["face_id"]] for face in faces]
        waiting = settle_faces(rows, set(asked), ledger, budget, now)
        with store.publish(path) as tmp:
            write_parquet(rows, CAPTIONS_SCHEMA, tmp)
            ref = store.describe(path, tmp)
        context.keep_retries(waiting)
        fidelity = Counter(row["fidelity"] for row in rows)
        rewrite_errors = Counter(row["rewrite_error"] for row in rows if row["rewrite_error"])
        raw = text_stats(row["raw_text"] for row in rows)
        llm = text_stats(row["caption"] for row in rows if row["caption_source"] == "llm")
        return StageResult(
            counts={
                "faces": len(rows),
                "asked": len(asked),  # faces this run asked the LLM for (the rest were kept)
                **{f"fidelity_{outcome}": n for outcome, n in sorted(fidelity.items())},
                **{f"rewrite_{reason}": n for reason, n in sorted(rewrite_errors.items())},
                "raw_words": raw["words"],
                "raw_unique_4grams": raw["unique_4grams"],
                "llm_captions": llm["captions"],
                "llm_words": llm["words"],
                "llm_unique_4grams": llm["unique_4grams"],
                # faces a later run may caption (the runner re-runs a stage that has some)
                "retryable": sum(rewrite_errors[reason] for reason in TRANSIENT_ERRORS),
                # faces whose budget of runs is spent: final with the grammar's text
                "gave_up": sum(
                    n for reason, n in rewrite_errors.items() if reason.startswith(GAVE_UP)
                ),
            },
            artifacts={CAPTIONS_PARQUET: ref},
            retry_at=next_due(waiting),
        )


def face_budget(limits: CaptionSettings) -> RetryBudget:
    return RetryBudget(limits.face_max_runs, limits.face_retry_pause_s)


def settle_faces(
    rows: list[dict[str, Any]],
    asked: set[str],
    ledger: dict[str, RowRetry],
    budget: RetryBudget,
    now: datetime,
) -> list[RowRetry]:
    """After a run: every face it asked for (`asked`) that met a transient fault has used one
    more run of its budget; one that used the last gives up (its row is changed in place).
    Returns the faces still waiting for a later run."""
    failing = {row["face_id"]: row for row in rows if row["rewrite_error"] in TRANSIENT_ERRORS}
    waiting, spent = budget.settle(failing, asked, ledger, now)
    for retry in spent:
        row = failing[retry.key]
        row["rewrite_error"] = gave_up(row["rewrite_error"])
    return waiting


def cap_caption(text: str, max_words: int, max_chars: int) -> tuple[str, bool]:
    """`text` cut to at most `max_words` words and `max_chars` characters (at a word boundary
    when there is one), and whether it was cut."""
    tokens = text.split(maxsplit=max_words)
    if len(tokens) <= max_words and len(text) <= max_chars:
        return text, False
    capped = " ".join(tokens[:max_words])
    if len(capped) > max_chars:
        cut = capped[: max_chars + 1]
        capped = cut.rsplit(" ", 1)[0] if " " in cut else cut[:max_chars]
    return capped, True


def retry_request(
    conversation: Conversation, reply: str, missing: list[str], contradicted: list[str],
    limits: CaptionSettings,
) -> Conversation:  # fmt: skip
    """The conversation asked again: the reply that failed, then what was wrong with it."""
    problems = []
    if missing:
        problems.append("it leaves out " + ", ".join(_phrase(label) for label in missing))
    if contradicted:
        problems.append("it contradicts them on " + ", ".join(_phrase(x) for x in contradicted))
    feedback = limits.retry_prompt.format(problems="; ".join(problems) or "it does not fit")
    return [*conversation, {"role": "assistant", "content": reply}, *ask(feedback)]


def _phrase(label: str) -> str:
    """A CelebA label in words ("Wearing_Hat" -> "wearing hat"; "Loser<Winner" -> "loser")."""
    return label.split("<", 1)[0].replace("_", " ").lower()


def caption_faces(
    faces: list[dict[str, Any]], grammar: Grammar, limits: CaptionSettings,
    rewriter: Rewriter | None,
) -> list[dict[str, Any]]:  # fmt: skip
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
            "rewrite_error": None,
        }
        for face, text in zip(faces, raw, strict=True)
    ]
    conversations = [ask(limits.prompt_template.format(raw_text=text)) for text in raw]
    pending = list(range(len(faces))) if rewriter is not None else []
    for attempt, outcome in enumerate(("pass", "retry_pass")):
        if not pending:
            break
        replies = rewriter.rewrite([conversations[i] for i in pending], attempt=attempt)
        failed = []
        for index, reply in zip(pending, replies, strict=True):
            row, face = rows[index], faces[index]
            if reply.text is None:
                row["rewrite_error"] = reply.error
                continue
            text, truncated = cap_caption(
                reply.text, limits.max_caption_words, limits.max_caption_chars
            )
            probabilities = {name: face[f"p_{name}"] for name in CELEBA_ATTRIBUTES}
            result = check_caption(
                text,
                face["valid_labels"],
                probabilities,
                absent_below=limits.absent_below,
                exclude=limits.exclude_labels,
            )
            row.update(
                missing=list(result.missing),
                contradicted=list(result.contradicted),
                rewrite_error=REPLY_TRUNCATED if truncated else None,
            )
            if result.passed:
                row.update(caption=text, caption_source="llm", fidelity=outcome)
            else:
                conversations[index] = retry_request(
                    conversations[index], text, row["missing"], row["contradicted"], limits
                )
                failed.append(index)
        pending = failed
    for row in rows:
        row["word_count"] = len(words(row["caption"]))
    return rows
