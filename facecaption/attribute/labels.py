"""The 40 CelebA attributes: their order, the paper's five categories, and how a face's
probabilities become a consistent label set.

A label is valid when its probability is above the threshold (paper: 0.85). Valid labels that
contradict each other are then resolved, one rule at a time, in this order:

1. hair colours (Black, Blond, Brown, Gray): only the most probable stays;
2. hair texture (Straight vs Wavy): only the more probable stays;
3. Bald against hair (Bangs, Straight_Hair, Wavy_Hair and any hair colour): if Bald is more
   probable than every one of them, they go; otherwise Bald goes;
4. No_Beard against facial hair (Goatee, Mustache): if No_Beard is more probable than both,
   they go; otherwise No_Beard goes.

Each dropped label is recorded with the label that beat it. A face is kept when at least
`min_labels` (paper: 5) labels remain. "Attractive" (a judgement) and "Blurry" (about the
photo, not the face) stay in the data but are flagged so captions can leave them out.
"""

from __future__ import annotations

from dataclasses import dataclass

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip


def check_celeba_labels(labels: list[str] | tuple[str, ...], where: object) -> None:
    """A model's output labels must be the 40 CelebA names, once each (any order); ValueError
    naming what is missing and what is unknown otherwise."""
    if sorted(labels) != sorted(CELEBA_ATTRIBUTES):
        missing = set(CELEBA_ATTRIBUTES) - set(labels)
        extra = set(labels) - set(CELEBA_ATTRIBUTES)
        raise ValueError(
            f"{where}: labels must be the 40 CelebA names once each;"
            f" missing {sorted(missing)}, unknown {sorted(extra)}"
        )


CATEGORIES: dict[str, tuple[str, ...]] = {
    "elementary": ("Male", "Young", "Chubby", "Pale_Skin", "Smiling", "Attractive", "Blurry"),
    "facial_features": (
        "Arched_Eyebrows", "Bags_Under_Eyes", "Big_Lips", "Big_Nose", "Bushy_Eyebrows",
        "Double_Chin", "High_Cheekbones", "Mouth_Slightly_Open", "Narrow_Eyes", "Oval_Face",
        "Pointy_Nose", "Rosy_Cheeks",
    ),
    "beard_type": ("5_o_Clock_Shadow", "Goatee", "Mustache", "No_Beard", "Sideburns"),
    "hairstyle": (
        "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair",
        "Receding_Hairline", "Straight_Hair", "Wavy_Hair",
    ),
    "accessories": (
        "Eyeglasses", "Heavy_Makeup", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
        "Wearing_Necklace", "Wearing_Necktie",
    ),
}  # fmt: skip

CATEGORY_OF = {name: category for category, names in CATEGORIES.items() for name in names}
NOT_FOR_CAPTIONS = ("Attractive", "Blurry")

HAIR_COLOURS = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")
HAIR_TEXTURES = ("Straight_Hair", "Wavy_Hair")
HAIR_PRESENT = ("Bangs", *HAIR_TEXTURES, *HAIR_COLOURS)
FACIAL_HAIR = ("Goatee", "Mustache")


@dataclass(frozen=True)
class LabelSet:
    valid: tuple[str, ...]  # in CelebA order
    dropped: tuple[str, ...]  # "Label<Winner": the label and what beat it
    flagged: tuple[str, ...]  # valid labels captions should leave out
    kept: bool  # enough valid labels for the face to stay in the dataset


def label_set(probabilities: dict[str, float], threshold: float, min_labels: int) -> LabelSet:
    """Valid, consistent labels of one face (see the module docstring for the rules)."""
    valid = {name for name in CELEBA_ATTRIBUTES if probabilities[name] > threshold}
    dropped: list[str] = []

    def drop(losers: set[str], winner: str) -> None:
        for loser in sorted(losers & valid, key=CELEBA_ATTRIBUTES.index):
            valid.discard(loser)
            dropped.append(f"{loser}<{winner}")

    for group in (HAIR_COLOURS, HAIR_TEXTURES):
        present = [name for name in group if name in valid]
        if len(present) > 1:
            best = max(present, key=probabilities.__getitem__)
            drop(set(present) - {best}, best)
    for single, rivals in (("Bald", HAIR_PRESENT), ("No_Beard", FACIAL_HAIR)):
        present = [name for name in rivals if name in valid]
        if single in valid and present:
            strongest = max(present, key=probabilities.__getitem__)
            if probabilities[single] > probabilities[strongest]:
                drop(set(present), single)
            else:
                drop({single}, strongest)
    ordered = tuple(name for name in CELEBA_ATTRIBUTES if name in valid)
    return LabelSet(
        valid=ordered,
        dropped=tuple(dropped),
        flagged=tuple(name for name in ordered if name in NOT_FOR_CAPTIONS),
        kept=len(ordered) >= min_labels,
    )
