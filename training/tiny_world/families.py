"""The tiny world's vocabulary: shape families, their attribute values and the ranges those values stand for."""

from collections.abc import Mapping
from dataclasses import dataclass, field


ATTRIBUTE_NAMES = ("proportion", "thickness", "orientation")
"""Attributes of single shapes, in the order adjectives appear in captions (orientation comes after the noun)."""

PROPORTION_RATIOS = {"regular": (0.8, 1.25), "tall": (2.0, 3.0), "flat": (0.25, 0.45)}
"""Height / width along the shape's axis for every proportion (uniformly jittered within the range)."""

TORUS_THICKNESS = {"thin": (0.15, 0.22), "thick": (0.4, 0.55)}
"""Tube radius / ring radius of a torus."""

TUBE_WALL = {"thin": (0.75, 0.85), "thick": (0.35, 0.5)}
"""Inner radius / outer radius of a tube (a thin wall leaves a large hole)."""

CAPSULE_RATIO = (2.0, 2.8)
"""Total length / diameter of a capsule (a capsule is always elongated, so it has no proportion attribute)."""

TILT_DEGREES = (30.0, 50.0)
"""How far a `tilted` shape leans away from vertical."""

HEADING_JITTER_DEGREES = 15.0
"""A lying or tilted shape's axis is turned by up to this many degrees around the vertical (variation)."""

MESH_EXTENT = 1.8
"""Longest bounding-box side of every generated mesh; the mesh is centred on its bounding box."""

_AXIAL = ("upright", "lying", "tilted")
_AXIAL_POINTED = ("upright", "upside_down", "lying", "tilted")


@dataclass(frozen=True)
class ShapeFamily:
    """What a family of single shapes looks like in words and which attribute values it takes.

    Attributes:
        name: family name, used in `ShapeSpec.family` and the `family` column.
        nouns: for every proportion (or `"*"` for all), nouns that name the shape; the first is canonical.
        proportions: proportion values, empty when the family has none.
        thicknesses: thickness values, empty when the family has none.
        orientations: orientation values allowed for every proportion (`"*"` for all); empty when none.
    """

    name: str
    nouns: Mapping[str, tuple[str, ...]]
    proportions: tuple[str, ...] = ()
    thicknesses: tuple[str, ...] = ()
    orientations: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def nouns_for(self, proportion: str | None) -> tuple[str, ...]:
        return self.nouns.get(proportion or "*", self.nouns.get("*", ()))

    def all_nouns(self) -> set[str]:
        """Every noun the captions of this family may use."""
        return {noun for nouns in self.nouns.values() for noun in nouns}

    def combinations(self) -> list[dict[str, str]]:
        """All valid attribute dictionaries of this family, in a fixed order."""
        result = []
        for proportion in self.proportions or (None,):
            orientations = self.orientations.get(proportion or "*", self.orientations.get("*", ()))
            for thickness in self.thicknesses or (None,):
                for orientation in orientations or (None,):
                    values = {"proportion": proportion, "thickness": thickness, "orientation": orientation}
                    result.append({name: value for name, value in values.items() if value is not None})
        return result


FAMILIES: dict[str, ShapeFamily] = {
    family.name: family
    for family in (
        ShapeFamily("sphere", {"*": ("sphere", "ball", "orb")}),
        ShapeFamily(
            "box",
            {
                "regular": ("cube", "box", "block"),
                "tall": ("box", "block", "square pillar"),
                "flat": ("box", "slab", "plate"),
            },
            proportions=("regular", "tall", "flat"),
            orientations={"regular": ("upright",), "tall": _AXIAL, "flat": _AXIAL},
        ),
        ShapeFamily(
            "cylinder",
            {
                "regular": ("cylinder", "can", "drum"),
                "tall": ("cylinder", "column", "rod"),
                "flat": ("cylinder", "disc", "puck"),
            },
            proportions=("regular", "tall", "flat"),
            orientations={"regular": ("upright",), "tall": _AXIAL, "flat": _AXIAL},
        ),
        ShapeFamily(
            "cone",
            {"*": ("cone",), "tall": ("cone", "spike")},
            proportions=("regular", "tall", "flat"),
            orientations={"regular": ("upright", "upside_down"), "tall": _AXIAL_POINTED, "flat": _AXIAL_POINTED},
        ),
        ShapeFamily(
            "pyramid",
            {"*": ("pyramid", "square pyramid")},
            proportions=("regular", "tall", "flat"),
            orientations={"regular": ("upright", "upside_down"), "tall": _AXIAL_POINTED, "flat": _AXIAL_POINTED},
        ),
        ShapeFamily(
            "tube",
            {
                "regular": ("tube", "hollow cylinder"),
                "tall": ("tube", "pipe", "hollow column"),
                "flat": ("tube", "ring", "washer"),
            },
            proportions=("regular", "tall", "flat"),
            thicknesses=("thin", "thick"),
            orientations={"regular": ("upright",), "tall": _AXIAL, "flat": _AXIAL},
        ),
        ShapeFamily(
            "torus",
            {"*": ("torus", "donut", "doughnut")},
            thicknesses=("thin", "thick"),
            orientations={"*": _AXIAL},
        ),
        ShapeFamily("capsule", {"*": ("capsule", "pill")}, orientations={"*": _AXIAL}),
        ShapeFamily(
            "ellipsoid",
            {"*": ("ellipsoid", "spheroid")},
            proportions=("tall", "flat"),
            orientations={"*": _AXIAL},
        ),
    )
}
"""The single-shape families, by name."""

COMPOSITION = "composition"
"""Family name of two-part shapes."""

COMPOSITION_PARTS = {
    "on_top_of": (("sphere", "cone", "pyramid", "box"), ("box", "cylinder")),
    "left_of": (("sphere", "box", "cone", "cylinder"), ("sphere", "box", "cone", "cylinder")),
}
"""For every relation, the families allowed as first and as second part (parts are regular and upright)."""

FAMILY_NAMES = (*FAMILIES, COMPOSITION)
"""Every value of `ShapeSpec.family`."""


def regular_attributes(family: str) -> dict[str, str]:
    """Attributes of a family's plain form (regular proportion, upright), used for composition parts."""
    return next(
        attributes
        for attributes in FAMILIES[family].combinations()
        if attributes.get("proportion", "regular") == "regular"
        and attributes.get("orientation", "upright") == "upright"
    )
