"""Captions of tiny-world shapes: every paraphrase the grammar produces for a combination, canonical first."""

import itertools
from typing import TYPE_CHECKING

from .families import COMPOSITION, FAMILIES


if TYPE_CHECKING:
    from .shapes import ShapeSpec


_PROPORTION_WORDS = {
    # (proportion, lying?) -> (adjectives, clauses); the first adjective is canonical.
    ("tall", False): (("tall", "elongated"), ("that is taller than it is wide",)),
    ("tall", True): (("long", "elongated"), ("that is longer than it is wide",)),
    ("flat", False): (("flat", "squat", "low"), ("that is wider than it is tall",)),
    ("flat", True): (("flat", "flattened"), ("that is much wider than it is thick",)),
    ("regular", False): ((), ("about as tall as it is wide",)),
    ("regular", True): ((), ()),
}
_THICKNESS_WORDS = {
    ("torus", "thin"): ("thin", "slender", "skinny"),
    ("torus", "thick"): ("thick", "fat", "chunky"),
    ("tube", "thin"): ("thin-walled",),
    ("tube", "thick"): ("thick-walled",),
}
_ORIENTATION_WORDS = {
    # The first phrase is canonical; "" means the phrase is left out (upright is the default pose).
    "upright": ("", "standing upright", "standing up"),
    "upside_down": ("upside down", "turned upside down", "standing on its tip", "pointing downwards"),
    "lying": ("lying on its side", "on its side", "lying down", "resting horizontally"),
    "tilted": ("tilted at an angle", "tilted", "leaning to one side", "slanted"),
}
_TORUS_ORIENTATION_WORDS = {
    # A torus's axis is its hole: "upright" (axis vertical) is a doughnut lying on a table.
    "upright": ("", "lying flat", "flat on the ground"),
    "lying": ("standing on its edge", "on its rim like a wheel", "standing vertically like a wheel"),
    "tilted": ("tilted at an angle", "tilted", "leaning to one side"),
}
_RELATION_TEMPLATES = {
    # {a} / {b}: first / second part with article; the first template is canonical.
    "on_top_of": (
        "{a} on top of {b}",
        "{a} resting on {b}",
        "{a} sitting on top of {b}",
        "{a} stacked on {b}",
        "{b} with {a} on top",
        "{b} topped with {a}",
    ),
    "left_of": (
        "{a} to the left of {b}",
        "{a} on the left and {b} on the right",
        "{b} to the right of {a}",
        "{b} with {a} to its left",
        "{a} next to {b}, on its left",
    ),
}
_NOUN_PHRASE_FORMS = ("{np}", "a 3D model of {np}", "an object shaped like {np}", "a simple {bare}")
"""Ways to present a noun phrase: `{np}` is it with its article ("a tall cylinder"), `{bare}` without."""


def _with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


# --------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------


def _single_captions(spec: "ShapeSpec") -> list[str]:
    family = FAMILIES[spec.family]
    attributes = spec.attributes
    orientation = attributes.get("orientation", "upright")
    lying = orientation == "lying"
    nouns = family.nouns_for(attributes.get("proportion"))

    # Adjective slots (proportion, thickness); each slot lists its alternatives, canonical first.
    slots: list[tuple[str, ...]] = []
    clauses: tuple[str, ...] = ()
    thickness: tuple[str, ...] = ()  # canonical thickness adjective, kept in the clause form
    if "proportion" in attributes:
        adjectives, clauses = _PROPORTION_WORDS[(attributes["proportion"], lying)]
        if adjectives:
            slots.append(adjectives)
    if "thickness" in attributes:
        slots.append(_THICKNESS_WORDS[(spec.family, attributes["thickness"])])
        thickness = slots[-1][:1]
    orientation_words = _TORUS_ORIENTATION_WORDS if spec.family == "torus" else _ORIENTATION_WORDS
    orientations = orientation_words[orientation] if "orientation" in attributes else ("",)

    captions = []
    for adjectives in itertools.product(*slots):
        for noun, pose in itertools.product(nouns, orientations):
            suffix = f" {pose}" if pose else ""
            bare = " ".join((*adjectives, noun))
            captions.extend(form.format(np=_with_article(bare), bare=bare) + suffix for form in _NOUN_PHRASE_FORMS)
            if adjectives:
                described = f"{_with_article(noun)} that is {' and '.join(adjectives)}"
                captions.append(described + (f", {pose}" if pose else ""))
    for clause, noun, pose in itertools.product(clauses, nouns, orientations):
        described = _with_article(" ".join((*thickness, noun)))
        captions.append(f"{described} {clause}" + (f", {pose}" if pose else ""))
    return captions


def _composition_captions(spec: "ShapeSpec") -> list[str]:
    first, second = spec.parts
    first_nouns = FAMILIES[first.family].nouns_for("regular")
    second_nouns = FAMILIES[second.family].nouns_for("regular")
    captions = []
    for template in _RELATION_TEMPLATES[spec.attributes["relation"]]:
        for a, b in itertools.product(first_nouns, second_nouns):
            captions.append(template.format(a=_with_article(a), b=_with_article(b)))
    return captions


def all_captions(spec: "ShapeSpec") -> tuple[str, ...]:
    """Every caption of the spec's combination, canonical first, without duplicates, in a fixed order."""
    captions = _composition_captions(spec) if spec.family == COMPOSITION else _single_captions(spec)
    return tuple(dict.fromkeys(captions))
