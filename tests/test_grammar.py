"""The caption grammar: deterministic per seed, varied across seeds, subject-verb agreement,
every attribute worded, excluded labels left out, and broken grammar files refused."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from facecaption.attribute.labels import CELEBA_ATTRIBUTES, NOT_FOR_CAPTIONS
from facecaption.caption.grammar import Grammar

MALE_FACE = ["Male", "Young", "Smiling", "Big_Nose", "No_Beard", "Black_Hair", "Eyeglasses"]
NEUTRAL_FACE = ["Young", "Smiling", "Big_Nose", "Bangs", "Wavy_Hair", "Wearing_Hat"]
PACKAGED = resources.files("facecaption.caption") / "grammar.toml"


@pytest.fixture(scope="module")
def grammar() -> Grammar:
    return Grammar.load()


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text) if s]


def test_same_seed_gives_the_same_text_in_another_process(grammar):
    text = grammar.raw_text(MALE_FACE, "0:face-1")
    assert text == grammar.raw_text(MALE_FACE, "0:face-1")
    code = (
        "from facecaption.caption.grammar import Grammar;"
        f"print(Grammar.load().raw_text({MALE_FACE!r}, '0:face-1'))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == text


def test_seeds_vary_sentence_shapes_synonyms_and_order(grammar):
    texts = {grammar.raw_text(MALE_FACE, f"0:{i}") for i in range(50)}
    assert len(texts) >= 30
    # a sentence's shape: its words with every phrase of the face's labels blanked out
    phrases = sorted((t for n in MALE_FACE for _, t, _ in grammar.phrases[n]), key=len)[::-1]
    shapes, openings = set(), set()
    for text in texts:
        for sentence in sentences(text):
            for phrase in phrases:
                sentence = sentence.replace(phrase, "_")
            shapes.add(sentence)
        openings.add(" ".join(text.split()[:2]))
    assert len(shapes) >= 10 and len(openings) >= 4
    assert {"glasses", "eyeglasses", "spectacles"} <= {
        w.strip(".") for t in texts for w in t.split()
    }


def test_male_subject_agrees_and_neutral_never_says_he(grammar):
    for i in range(50):
        male = grammar.raw_text(MALE_FACE, f"0:{i}").lower()
        neutral = grammar.raw_text(NEUTRAL_FACE, f"0:{i}").lower()
        assert not re.search(r"\b(?:they|their|person|individual)\b", male)
        assert not re.search(r"\bhe (?:are|have|wear)\b", male)
        assert not re.search(r"\b(?:he|his|him|man|gentleman)\b", neutral)
        assert not re.search(r"\bthey (?:is|has|wears)\b", neutral)
        assert not re.search(r"\b(?:person|individual) (?:are|have|wear)\b", neutral)
    neutral_texts = " ".join(grammar.raw_text(NEUTRAL_FACE, f"0:{i}") for i in range(50))
    assert re.search(r"\bthey are\b", neutral_texts.lower())
    assert re.search(r"\bthey have\b", neutral_texts.lower())
    assert re.search(r"\bthey (?:wear|are wearing)\b", neutral_texts.lower())


def test_every_attribute_alone_is_stated_by_one_of_its_phrases(grammar):
    for name in CELEBA_ATTRIBUTES:
        wording = {text for _, text, _ in grammar.phrases[name]}
        for i in range(10):
            text = grammar.raw_text([name], f"0:{i}", exclude=())
            assert any(phrase in text.lower() for phrase in wording), (name, text)
            assert text.endswith(".") and text[0].isupper()


def test_excluded_labels_never_appear_unless_asked_for(grammar):
    wording = [text for name in NOT_FOR_CAPTIONS for _, text, _ in grammar.phrases[name]]
    labels = ["Attractive", "Blurry", "Smiling", "Male"]
    for i in range(30):
        text = grammar.raw_text(labels, f"0:{i}")
        assert not any(phrase in text for phrase in wording), text
    included = " ".join(grammar.raw_text(labels, f"0:{i}", exclude=()) for i in range(30))
    for name in NOT_FOR_CAPTIONS:
        assert any(text in included for _, text, _ in grammar.phrases[name]), name


def test_no_labels_gives_one_neutral_sentence(grammar):
    text = grammar.raw_text([], "0:x")
    assert len(sentences(text)) == 1 and not re.search(r"\b(?:he|his|man)\b", text.lower())
    assert grammar.raw_text(["Attractive", "Blurry"], "0:x") == text


def test_long_lists_are_split_into_short_sentences(grammar):
    features = ["Arched_Eyebrows", "Big_Lips", "Big_Nose", "Bushy_Eyebrows", "Double_Chin",
                "High_Cheekbones", "Narrow_Eyes", "Pointy_Nose"]  # fmt: skip
    for i in range(20):
        for sentence in sentences(grammar.raw_text(features, f"0:{i}")):
            assert sentence.count(",") + sentence.count(" and ") <= grammar.max_items - 1


def test_unknown_labels_are_refused(grammar):
    with pytest.raises(ValueError, match="Smilling"):
        grammar.raw_text(["Smilling"], "0:x")


def test_version_and_fingerprint_describe_the_file(grammar, tmp_path):
    assert grammar.version == "1" and len(grammar.fingerprint) == 64
    copy = tmp_path / "grammar.toml"
    copy.write_bytes(PACKAGED.read_bytes())
    assert Grammar.load(copy).fingerprint == grammar.fingerprint
    copy.write_bytes(PACKAGED.read_bytes() + b"\n# edited\n")
    assert Grammar.load(copy).fingerprint != grammar.fingerprint


def broken(tmp_path: Path, old: str, new: str) -> Path:
    text = PACKAGED.read_text()
    assert old in text
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(old, new, 1))
    tomllib.loads(path.read_text())  # still TOML: the grammar check must catch it
    return path


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('[phrases.Goatee]\nfeatures = { "a goatee" = 1 }\n', "", "Goatee has no phrases"),
        ('"{Subject} {has} {features}." = 4', '"{Subject} {has} {featurs}." = 4', "featurs"),
        ('"{Pronoun} {wears} {accessories}." = 2', '"{Pronoun} {wear} {accessories}." = 2', "wear"),
        ('"a goatee" = 1', '"a goatee" = 0', "positive"),
        ('"a goatee" = 1', '"a goatee" = -2', "positive"),
        ('version = "1"', "version = 1", "version"),
        ("[phrases.Goatee]", "[phrases.Goatie]", "Goatie"),
        ('face = { "oval" = 3', 'shape = { "oval" = 3', "unknown slots ['face']"),
        ("Goatee]\nfeatures", "Goatee]\naccessories", "Goatee has 'accessories' phrases"),
        ('"{Possessive} face is {face}." = 2', '"{Possessive} face is round." = 2', "no list slot"),
        ('when = "Male"\n', "", "exactly one"),
    ],
)
def test_a_broken_grammar_file_is_refused_naming_file_and_problem(tmp_path, old, new, problem):
    path = broken(tmp_path, old, new)
    with pytest.raises(ValueError, match=re.escape(problem)) as caught:
        Grammar.load(path)
    assert str(path) in str(caught.value)


def test_a_file_that_is_not_toml_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("version = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        Grammar.load(path)
