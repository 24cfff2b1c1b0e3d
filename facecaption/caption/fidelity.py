"""The fidelity check: does a caption state every label it should, and nothing the attributes
rule out?

Each of the 40 attributes has a `Concept`: the words that state it, the words whose negation
states it ("no beard" states No_Beard) and the words that contradict it when it is a valid
label ("woman" for Male). A mention counts only when it is not negated: a negation word (no,
not, without, never, n't, ...) among the few words before it in the same clause ("he is not
smiling", "doesn't wear glasses", "no beard or mustache") takes it back.

`check_caption` reports, in CelebA order:
- missing: valid labels, not excluded, that the caption does not state;
- contradicted: valid labels the caption contradicts (their contradicting words, or an
  attribute the label set rules out: another hair colour, hair for Bald, facial hair for
  No_Beard), and attributes the caption states although their probability is below
  `absent_below`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from facecaption.attribute.labels import (
    CELEBA_ATTRIBUTES,
    FACIAL_HAIR,
    HAIR_COLOURS,
    HAIR_PRESENT,
    HAIR_TEXTURES,
    NOT_FOR_CAPTIONS,
)

NEGATION = re.compile(r"^(?:no|not|never|without|neither|nor|none|lacks?|lacking)$|n['’]t$")
# a negation reaches the words after it up to one of these, and at most NEGATION_REACH words
CLAUSE_BREAK = re.compile(
    r"[.;:!?,()\n]|\b(?:and|but|while|whereas|although|though|who|which|that|with)\b"
)
NEGATION_REACH = 6

BODY = r"hair|haired|locks|nose|lips|mouth|eyes|eyebrows|brows|cheeks|cheekbones|face|skin"


def described(adjectives: str, nouns: str) -> tuple[str, ...]:
    """Patterns for "<adjective> [up to two more words] <noun>" and "<noun> is [..] <adjective>",
    the extra words never being another body part ("big lips, pointy nose" is no big nose)."""
    word = rf"(?!(?:{BODY})\b)[a-z]+"
    gap = rf"(?:(?:\s*,\s*|\s+|-){word}){{0,2}}?"
    verb = r"(?:is|are|looks?|appears?|seems?)"
    return (
        rf"(?:{adjectives}){gap}[\s-]+(?:{nouns})",
        rf"(?:{nouns})\s+{verb}(?:\s+{word}){{0,3}}?\s+(?:{adjectives})",
    )


@dataclass(frozen=True)
class Concept:
    stated: tuple[str, ...]  # regexes (lower case) that state the attribute
    stated_by_negating: tuple[str, ...] = ()  # regexes whose negation states it
    contradicted_by: tuple[str, ...] = ()  # regexes that contradict it as a valid label


HAIR = r"hair|haired|locks"
SKIN = r"skin|complexion"
CONCEPTS: dict[str, Concept] = {
    "5_o_Clock_Shadow": Concept(
        (r"(?:five|5)[\s-]o['’]clock[\s-]shadow", r"stubble", r"stubbly", r"unshaven", r"scruff")
    ),
    "Arched_Eyebrows": Concept(described(r"arched|arching|curved", r"eyebrows|brows")),
    "Attractive": Concept(
        (r"attractive", r"good[\s-]looking", r"handsome", r"beautiful", r"pretty", r"gorgeous")
    ),
    "Bags_Under_Eyes": Concept(
        (r"bags\s+under\s+(?:\w+\s+)?eyes", r"under[\s-]eye\s+bags", r"eye\s+bags", r"puffy eyes")
    ),
    "Bald": Concept((r"bald", r"hairless", r"(?:shaved|shaven)\s+head")),
    "Bangs": Concept((r"bangs", r"fringe")),
    "Big_Lips": Concept(described(r"big|large|full|plump|thick", r"lips")),
    "Big_Nose": Concept(described(r"big|large|prominent", r"nose")),
    "Black_Hair": Concept(described(r"black|jet[\s-]black|raven", HAIR)),
    "Blond_Hair": Concept((*described(r"blond|blonde|fair|golden|platinum", HAIR), r"blond[e]?")),
    "Blurry": Concept((r"blurr(?:y|ed)", r"out\s+of\s+focus", r"unfocused")),
    "Brown_Hair": Concept((*described(r"brown|chestnut|brunette", HAIR), r"brunette")),
    "Bushy_Eyebrows": Concept(described(r"bushy|thick|heavy|full", r"eyebrows|brows")),
    "Chubby": Concept((r"chubby", r"plump", r"round[\s-]faced", r"overweight", r"heavy[\s-]set")),
    "Double_Chin": Concept((r"double\s+chin",)),
    "Eyeglasses": Concept((r"(?:eye|sun)?glasses", r"spectacles", r"specs", r"bespectacled")),
    "Goatee": Concept((r"goatee",), contradicted_by=(r"clean[\s-]shaven",)),
    "Gray_Hair": Concept(described(r"gr[ae]y|silver|white|graying|greying", HAIR)),
    "Heavy_Makeup": Concept((r"make[\s-]?up", r"cosmetics", r"made\s+up")),
    "High_Cheekbones": Concept(described(r"high|prominent|pronounced|defined", r"cheekbones")),
    "Male": Concept(
        (r"man|men|male|he|him|his|himself|gentleman|guy|boy",),
        contradicted_by=(r"woman|women|female|she|her|hers|herself|lady|girl",),
    ),
    "Mouth_Slightly_Open": Concept(
        (*described(r"open|parted|half[\s-]open|ajar", r"mouth|lips"), r"mouth\s+open")
    ),
    "Mustache": Concept(
        (r"mo?ustach(?:e|es|ed|ioed)",),
        contradicted_by=(r"clean[\s-]shaven",),
    ),
    "Narrow_Eyes": Concept((*described(r"narrow|narrowed|small|squinting", r"eyes"), r"squint")),
    "No_Beard": Concept(
        (r"clean[\s-]shaven", r"beardless"),
        stated_by_negating=(r"beards?", r"facial\s+hair"),
        contradicted_by=(r"beards?", r"bearded", r"facial\s+hair"),
    ),
    "Oval_Face": Concept(described(r"oval|oval[\s-]shaped", r"face|head")),
    "Pale_Skin": Concept(
        (r"pale|porcelain", r"(?:pale|fair|light)[\s-]skinned", *described(r"pale|fair", SKIN)),
        contradicted_by=(r"tanned", r"dark[\s-]skinned", *described(r"dark|tanned", SKIN)),
    ),
    "Pointy_Nose": Concept(described(r"pointy|pointed|sharp", r"nose")),
    "Receding_Hairline": Concept(
        (*described(r"receding", r"hairline"), r"hairline\s+(?:is\s+)?receding")
    ),
    "Rosy_Cheeks": Concept(described(r"rosy|pink|ruddy|flushed|red", r"cheeks")),
    "Sideburns": Concept((r"sideburns?", r"side[\s-]burns", r"mutton\s*chops")),
    "Smiling": Concept(
        (r"smil(?:e|es|ed|ing)", r"grin(?:s|ning)?", r"beaming"),
        contradicted_by=(r"frown(?:s|ing)?", r"scowl(?:s|ing)?"),
    ),
    "Straight_Hair": Concept(described(r"straight|sleek", HAIR)),
    "Wavy_Hair": Concept(described(r"wavy|curly|curled|wavy-ish", HAIR)),
    "Wearing_Earrings": Concept((r"ear[\s-]?rings?", r"ear\s+studs?", r"hoops")),
    "Wearing_Hat": Concept((r"hats?", r"caps?", r"beanie", r"fedora", r"headwear")),
    "Wearing_Lipstick": Concept((r"lipstick", r"lip\s+(?:colou?r|gloss)")),
    "Wearing_Necklace": Concept((r"necklaces?", r"pendant", r"choker")),
    "Wearing_Necktie": Concept((r"neck[\s-]?ties?", r"ties?", r"bow[\s-]?tie", r"cravat")),
    "Young": Concept(
        (r"young", r"youthful", r"young[\s-]looking", r"teen(?:age|ager)?s?", r"youth"),
        contradicted_by=(r"old", r"older", r"elderly", r"middle[\s-]aged", r"senior"),
    ),
}


def _ruled_out() -> dict[str, frozenset[str]]:
    """Valid label -> the attributes the label set rules out beside it
    (facecaption.attribute.labels).
    Not Goatee/Mustache -> No_Beard: "a mustache but no beard" is no contradiction."""
    pairs = {(a, b) for group in (HAIR_COLOURS, HAIR_TEXTURES) for a in group for b in group}
    pairs |= {p for hair in HAIR_PRESENT for p in (("Bald", hair), (hair, "Bald"))}
    pairs |= {("No_Beard", facial_hair) for facial_hair in FACIAL_HAIR}
    return {
        name: frozenset(b for a, b in pairs if a == name and b != name)
        for name in CELEBA_ATTRIBUTES
    }


RULED_OUT = _ruled_out()


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    # words are whole: not inside another word nor a hyphenated one ("20-year-old" is not "old")
    alternatives = "|".join(f"(?:{p})" for p in patterns)
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])") if patterns else None


_COMPILED = {
    name: tuple(_compile(p) for p in (c.stated, c.stated_by_negating, c.contradicted_by))
    for name, c in CONCEPTS.items()
}


@dataclass(frozen=True)
class FidelityResult:
    passed: bool
    missing: tuple[str, ...]
    contradicted: tuple[str, ...]


def negated(text: str, start: int) -> bool:
    """Whether the mention at `start` of lower-case `text` is under a negation."""
    before = text[:start]
    cut = max((m.end() for m in CLAUSE_BREAK.finditer(before)), default=0)
    return any(NEGATION.search(word) for word in before[cut:].split()[-NEGATION_REACH:])


def _mentions(pattern: re.Pattern[str] | None, text: str, *, negative: bool) -> bool:
    if pattern is None:
        return False
    return any(negated(text, m.start()) == negative for m in pattern.finditer(text))


def states(caption: str, attribute: str) -> bool:
    """Whether the caption states the attribute (not negated, or the negation it is made of)."""
    text = caption.lower()
    stated, by_negating, _ = _COMPILED[attribute]
    return _mentions(stated, text, negative=False) or _mentions(by_negating, text, negative=True)


def check_caption(
    caption: str,
    labels: Sequence[str],
    probabilities: Mapping[str, float],
    absent_below: float = 0.15,
    exclude: Collection[str] = NOT_FOR_CAPTIONS,
) -> FidelityResult:
    """Missing labels and contradictions of one caption (see the module docstring)."""
    text = caption.lower()
    valid = set(labels)
    if unknown := valid - set(CONCEPTS):
        raise ValueError(f"not CelebA attributes: {sorted(unknown)}")
    said = {name for name in CELEBA_ATTRIBUTES if states(text, name)}
    wanted = valid - set(exclude)
    missing = tuple(name for name in CELEBA_ATTRIBUTES if name in wanted and name not in said)
    contradicted = []
    for name in CELEBA_ATTRIBUTES:
        p = probabilities.get(name)
        if name in valid:
            against = _mentions(_COMPILED[name][2], text, negative=False)
            bad = against or any(other in said for other in RULED_OUT[name])
        else:
            bad = p is not None and p < absent_below and name in said
        if bad:
            contradicted.append(name)
    return FidelityResult(not missing and not contradicted, missing, tuple(contradicted))
