"""The caption grammar: a small probabilistic grammar that turns a face's labels into raw text
(several short sentences), loaded from a TOML file users may edit
(`facecaption/caption/grammar.toml` is the packaged one; `caption.grammar_path` names another).

The file holds:

- `version` (a string) and `max_items`: at most this many phrases in one list;
- `empty`: the sentence for a face with no labels to state;
- `[subjects.NAME]`: who the sentences are about: `subject` ("the man"), `pronoun`, `possessive`,
  and the verbs `subject_verbs` / `pronoun_verbs` (`{ is = "is", has = "has" }`). The first form
  whose `when` label is among the caption's labels is used, else the one form without `when`;
- `[productions.CATEGORY]`: sentences of each of the five categories, each with its weight.
  Placeholders: `{Subject}`, `{Pronoun}`, `{Possessive}` (capitalised; lower case too), a verb
  (`{is}`: it agrees with the `{Subject}` or `{Pronoun}` before it, the subject's when none), and
  list slots (`{features}`) that take the phrases of that kind joined as "a, b and c";
- `[phrases.ATTRIBUTE]`: per attribute, its wording by list slot: `features = { "a big nose" = 3 }`.

A weighted choice is a table of text = weight, a list (equal weights) or one string. For each
category with labels, every label gets one of its phrases, and productions are drawn until every
phrase is placed; categories come in a random order. The random choices come from the seed string
(e.g. "0:face_id") through sha256: the same seed gives the same text in any process.
"""

from __future__ import annotations

import hashlib
import random
import string
import tomllib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from facecaption.attribute.labels import (
    CATEGORIES,
    CATEGORY_OF,
    CELEBA_ATTRIBUTES,
    NOT_FOR_CAPTIONS,
)

Choices = tuple[tuple[str, float], ...]  # (text, weight)
VOICE = ("subject", "pronoun", "possessive")  # a subject form's words
# placeholder -> the word it stands for; a capitalised placeholder capitalises it
ROLES = {word: word for word in VOICE} | {word.capitalize(): word for word in VOICE}


@dataclass(frozen=True)
class SubjectForm:
    when: str | None
    subject: Choices
    pronoun: Choices
    possessive: Choices
    verbs: dict[str, dict[str, str]]  # "subject"/"pronoun" -> verb -> its form


@dataclass(frozen=True)
class Production:
    parts: tuple[tuple[str, str | None], ...]  # (literal text, placeholder after it)
    slots: frozenset[str]


class Grammar:
    def __init__(self, source: str, data: bytes) -> None:
        def fail(problem: str) -> ValueError:
            return ValueError(f"grammar {source}: {problem}")

        try:
            doc = tomllib.loads(data.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise fail(f"not valid TOML: {exc}") from exc
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self.version = doc.get("version")
        self.max_items = doc.get("max_items", 3)
        if not isinstance(self.version, str):
            raise fail("`version` must be a string")
        if not isinstance(self.max_items, int) or self.max_items < 1:
            raise fail("`max_items` must be a positive integer")
        self.empty = _choices(doc.get("empty"), "empty", fail)

        self.forms: list[SubjectForm] = []
        for name, form in doc.get("subjects", {}).items():
            verbs = {r: form.get(f"{r}_verbs", {}) for r in ("subject", "pronoun")}
            if not all(
                isinstance(v, dict) and all(isinstance(w, str) for w in v.values())
                for v in verbs.values()
            ):
                raise fail(f"subjects.{name}: verbs must be tables of verb = text")
            when = form.get("when")
            if when is not None and when not in CELEBA_ATTRIBUTES:
                raise fail(f"subjects.{name}: `when` {when!r} is not a CelebA attribute")
            choices = [_choices(form.get(k), f"subjects.{name}.{k}", fail) for k in VOICE]
            self.forms.append(SubjectForm(when, *choices, verbs=verbs))
        if [form.when for form in self.forms].count(None) != 1:
            raise fail("exactly one of [subjects.*] must have no `when` (the default)")
        verb_sets = {frozenset(v) for form in self.forms for v in form.verbs.values()}
        if len(verb_sets) != 1:
            raise fail("every subject form must define the same subject_verbs and pronoun_verbs")
        verb_names = set(next(iter(verb_sets)))

        phrases = doc.get("phrases", {})
        if unknown := set(phrases) - set(CELEBA_ATTRIBUTES):
            raise fail(f"phrases for unknown attributes: {sorted(unknown)}")
        self.phrases: dict[str, tuple[tuple[str, str, float], ...]] = {}  # (slot, text, weight)
        for name in CELEBA_ATTRIBUTES:
            by_slot = phrases.get(name, {})
            if not isinstance(by_slot, dict):
                raise fail(f"phrases.{name}: expected a table of slot = choices")
            self.phrases[name] = tuple(
                (slot, text, weight)
                for slot, value in by_slot.items()
                for text, weight in _choices(value, f"phrases.{name}.{slot}", fail)
            )
            if not self.phrases[name]:
                raise fail(f"attribute {name} has no phrases ([phrases.{name}])")
        slot_names = {slot for options in self.phrases.values() for slot, _, _ in options}
        if clash := slot_names & (verb_names | set(ROLES)):
            raise fail(f"list slots named like a verb or subject placeholder: {sorted(clash)}")

        productions = doc.get("productions", {})
        if unknown := set(productions) - set(CATEGORIES):
            raise fail(f"productions for unknown categories: {sorted(unknown)}")
        self.productions: dict[str, list[tuple[Production, float]]] = {}
        for category in CATEGORIES:
            where = f"productions.{category}"
            self.productions[category] = []
            for text, weight in _choices(productions.get(category, {}), where, fail):
                try:
                    parsed = list(string.Formatter().parse(text))
                except ValueError as exc:
                    raise fail(f"{where}: {text!r}: {exc}") from exc
                parts = tuple((literal, field) for literal, field, _, _ in parsed)
                fields = {field for _, field in parts if field is not None}
                if unknown := fields - slot_names - verb_names - set(ROLES):
                    raise fail(f"{where}: {text!r} uses unknown slots {sorted(unknown)}")
                if not fields & slot_names:
                    raise fail(f"{where}: {text!r} has no list slot")
                if any(spec or conv for _, _, spec, conv in parsed):
                    raise fail(f"{where}: {text!r}: no format specs or conversions")
                production = Production(parts, frozenset(fields & slot_names))
                self.productions[category].append((production, weight))
        for name, options in self.phrases.items():
            category = CATEGORY_OF[name]
            for slot in {slot for slot, _, _ in options}:
                if not any(p.slots == {slot} for p, _ in self.productions[category]):
                    raise fail(
                        f"attribute {name} has {slot!r} phrases but [productions.{category}]"
                        f" has no sentence with {{{slot}}} as its only list slot"
                    )

    @classmethod
    def load(cls, path: Path | None = None) -> Grammar:
        """The grammar in `path`, or the packaged one."""
        if path is None:
            packaged = resources.files("facecaption.caption") / "grammar.toml"
            return cls(str(packaged), packaged.read_bytes())
        return cls(str(path), Path(path).read_bytes())

    def raw_text(
        self, labels: Sequence[str], seed: str, exclude: Collection[str] = NOT_FOR_CAPTIONS
    ) -> str:
        """Short sentences stating every label not in `exclude`; the same for the same seed."""
        if unknown := [name for name in labels if name not in CATEGORY_OF]:
            raise ValueError(f"not CelebA attributes: {unknown}")
        wanted = set(labels) - set(exclude)
        kept = [name for name in CELEBA_ATTRIBUTES if name in wanted]
        digest = hashlib.sha256(seed.encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        if not kept:
            return _pick(rng, self.empty)
        form = next(f for f in self.forms if f.when is None or f.when in kept)
        voice = {word: _pick(rng, getattr(form, word)) for word in VOICE}
        categories = [c for c in CATEGORIES if any(CATEGORY_OF[name] == c for name in kept)]
        rng.shuffle(categories)
        sentences: list[str] = []
        for category in categories:
            lists: dict[str, list[str]] = {}
            for name in kept:
                if CATEGORY_OF[name] == category:
                    options = self.phrases[name]
                    slot, text, _ = rng.choices(options, [w for _, _, w in options])[0]
                    lists.setdefault(slot, []).append(text)
            chunks: dict[str, list[list[str]]] = {}
            for slot, texts in sorted(lists.items()):
                rng.shuffle(texts)
                step = self.max_items
                chunks[slot] = [texts[i : i + step] for i in range(0, len(texts), step)]
            while any(chunks.values()):
                ready = {slot for slot, left in chunks.items() if left}
                options = [(p, w) for p, w in self.productions[category] if p.slots <= ready]
                production = _pick(rng, tuple(options))
                filled = {slot: _join(chunks[slot].pop(0)) for slot in production.slots}
                sentences.append(_render(production, filled, voice, form))
        return " ".join(sentences)


def _render(
    production: Production, filled: dict[str, str], voice: dict[str, str], form: SubjectForm
) -> str:
    out, agree = [], "subject"
    for literal, field in production.parts:
        out.append(literal)
        if field in filled:
            out.append(filled[field])
        elif field in ROLES:
            value = voice[ROLES[field]]
            out.append(value[:1].upper() + value[1:] if field[0].isupper() else value)
            agree = ROLES[field] if ROLES[field] != "possessive" else agree
        elif field is not None:
            out.append(form.verbs[agree][field])
    sentence = "".join(out)
    return sentence[:1].upper() + sentence[1:]


def _join(texts: list[str]) -> str:
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]


def _pick(rng: random.Random, choices: tuple[tuple[Any, float], ...]) -> Any:
    return rng.choices([value for value, _ in choices], [w for _, w in choices])[0]


def _choices(value: Any, where: str, fail: Any) -> Choices:
    if isinstance(value, str):
        value = {value: 1}
    elif isinstance(value, list):
        value = dict.fromkeys(value, 1)
    if not isinstance(value, dict) or not value:
        raise fail(f"{where}: expected a non-empty table of text = weight")
    for text, weight in value.items():
        if not isinstance(text, str) or not text.strip():
            raise fail(f"{where}: empty text")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise fail(f"{where}: weight of {text!r} must be a positive number, not {weight!r}")
    return tuple(value.items())
