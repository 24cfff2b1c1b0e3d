"""The fidelity check on crafted captions (pass, dropped label, contradiction, negation) and
the property that the grammar's raw text always passes it."""

from __future__ import annotations

import random

import pytest

from facecaption.attribute.labels import CELEBA_ATTRIBUTES, label_set
from facecaption.caption.fidelity import CONCEPTS, check_caption, states
from facecaption.caption.grammar import Grammar

UNSURE = dict.fromkeys(CELEBA_ATTRIBUTES, 0.5)  # nothing ruled out


def probs(**overrides: float) -> dict[str, float]:
    return UNSURE | overrides


def test_every_attribute_has_concept_words():
    assert set(CONCEPTS) == set(CELEBA_ATTRIBUTES)
    assert all(concept.stated for concept in CONCEPTS.values())


def test_a_faithful_caption_passes():
    labels = ["Male", "Young", "Smiling", "Eyeglasses", "No_Beard", "Black_Hair", "Wavy_Hair"]
    caption = "A smiling young man with wavy black hair and a clean-shaven face, wearing glasses."
    result = check_caption(caption, labels, probs())
    assert (result.passed, result.missing, result.contradicted) == (True, (), ())


def test_a_dropped_label_is_missing():
    labels = ["Male", "Young", "Smiling", "Eyeglasses"]
    result = check_caption("A young man wearing glasses.", labels, probs())
    assert not result.passed and result.missing == ("Smiling",) and result.contradicted == ()


def test_excluded_labels_need_not_be_stated():
    result = check_caption("A smiling man.", ["Male", "Smiling", "Attractive", "Blurry"], probs())
    assert result.passed
    strict = check_caption("A smiling man.", ["Male", "Smiling", "Attractive"], probs(), exclude=())
    assert strict.missing == ("Attractive",)


@pytest.mark.parametrize(
    ("caption", "labels", "overrides", "contradicted"),
    [
        ("A smiling woman.", ["Male", "Smiling"], {}, ("Male",)),
        ("She is smiling.", ["Male", "Smiling"], {}, ("Male",)),
        ("A man wearing glasses.", ["Male"], {"Eyeglasses": 0.02}, ("Eyeglasses",)),
        ("A smiling man.", ["Smiling"], {"Male": 0.01}, ("Male",)),
        ("He has no beard but a thick mustache.", ["Male", "No_Beard"], {}, ("No_Beard",)),
        ("A bearded man.", ["Male", "No_Beard"], {}, ("No_Beard",)),
        ("He has black hair, blond bangs.", ["Black_Hair", "Bangs"], {}, ("Black_Hair",)),
        ("A bald man with wavy hair.", ["Male", "Bald"], {}, ("Bald",)),
        ("A young man, frowning.", ["Male", "Young", "Smiling"], {}, ("Smiling",)),
        ("An old man.", ["Male", "Young"], {}, ("Young",)),
    ],
)  # fmt: skip
def test_contradictions_are_caught(caption, labels, overrides, contradicted):
    assert check_caption(caption, labels, probs(**overrides)).contradicted == contradicted


def test_an_unsure_attribute_may_be_stated():
    assert check_caption("A man wearing glasses.", ["Male"], probs(Eyeglasses=0.5)).passed


@pytest.mark.parametrize(
    ("caption", "attribute", "stated"),
    [
        ("He has no beard.", "No_Beard", True),
        ("A man without a beard.", "No_Beard", True),
        ("He has a beard.", "No_Beard", False),
        ("He is not clean-shaven.", "No_Beard", False),
        ("A man without glasses.", "Eyeglasses", False),
        ("He doesn't wear glasses.", "Eyeglasses", False),
        ("He does not appear to be wearing any glasses.", "Eyeglasses", False),
        ("He isn't wearing a hat.", "Wearing_Hat", False),
        ("He is not smiling.", "Smiling", False),
        ("He has neither a beard nor a mustache.", "Mustache", False),
        ("He has no beard and wears glasses.", "Eyeglasses", True),
        ("He has no beard, but he is smiling.", "Smiling", True),
        ("A man who is not young but is smiling.", "Smiling", True),
        ("A 20-year-old man.", "Young", False),
        ("The woman's husband is absent.", "Male", False),
        ("The man's face.", "Male", True),
    ],
)
def test_negation_takes_a_mention_back(caption, attribute, stated):
    assert states(caption, attribute) is stated


def test_negated_mentions_are_neither_missing_labels_nor_contradictions():
    labels = ["Male", "No_Beard", "Smiling"]
    caption = "A smiling man without glasses, with no beard and no hat."
    result = check_caption(caption, labels, probs(Eyeglasses=0.01, Wearing_Hat=0.01))
    assert result.passed, result
    assert check_caption("He is not smiling.", ["Male", "Smiling"], probs()).missing == ("Smiling",)


def test_the_grammar_raw_text_passes_its_own_check():
    grammar = Grammar.load()
    rng = random.Random(20240715)
    for case in range(300):
        # skewed so a face has many labels and many ruled-out attributes
        probabilities = {
            name: rng.choice([rng.random(), rng.uniform(0.85, 1.0), rng.uniform(0.0, 0.15)])
            for name in CELEBA_ATTRIBUTES
        }
        labels = label_set(probabilities, threshold=0.85, min_labels=0).valid
        text = grammar.raw_text(labels, f"7:{case}")
        result = check_caption(text, labels, probabilities)
        assert result.passed, (labels, text, result)
        everything = grammar.raw_text(labels, f"7:{case}", exclude=())
        assert check_caption(everything, labels, probabilities, exclude=()).passed, everything
