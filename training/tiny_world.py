"""The tiny world: procedural 3D shapes with captions, small enough to train a tiny CG-MLLM on a CPU.

No pretrained weights can be downloaded where this package is developed, so generation and captioning are shown
to work end to end on a world of simple shapes that a tiny model can learn in minutes. This module builds that
world as a real `datasets` dataset (a `meshfolder`: mesh files plus metadata), provides the train / held-out split,
and the ground-truth helpers that the evaluation uses.

What a shape is
---------------
A sample is a `ShapeSpec`: a *family* (sphere, box, cylinder, cone, pyramid, tube, torus, capsule, ellipsoid, or
a two-part *composition*), a few categorical *attributes*, and continuous *dims* jittered within the range of each
attribute, so that no two samples are identical. The categorical part alone (`ShapeSpec.combination`, e.g.
`"cone[orientation=lying,proportion=flat]"`) is what captions describe and what the split is made of.

Attributes, and why there is no "small" or "large"
---------------------------------------------------
The ShapeVAE pipeline centres every mesh on its bounding box and scales its longest side to the unit cube
(Hunyuan3D `normalize_mesh`), so absolute size is erased before the model ever sees a shape: "a small sphere" and
"a large sphere" would be the same latent with two captions, i.e. label noise. Every attribute here therefore
survives that normalisation:

* **proportion** (`regular` / `tall` / `flat`): height-to-width ratio along the shape's axis, in `[0.8, 1.25]`,
  `[2, 3]` and `[0.25, 0.45]` respectively, far enough apart for `classify_proportion` to tell them apart;
* **thickness** (`thin` / `thick`): tube radius of a torus, wall thickness of a tube;
* **orientation** (`upright` / `upside_down` / `lying` / `tilted`): direction of the shape's axis relative to the
  world up axis (`lying` puts it horizontal, `tilted` leans it 30-50 degrees sideways);
* **composition**: two parts, one `on_top_of` the other or one `left_of` the other.

Meshes are generated Y-up (glTF convention; the front faces +Z), centred on their bounding box, with the longest
side 1.8 (inside `[-0.9, 0.9]^3`). Every single shape is a watertight trimesh primitive; a composition is the
concatenation of two watertight parts (so it has two connected components, overlapping slightly when stacked).

Split
-----
The split is fixed by a seed. The held-out (`test`) split contains (1) *novel combinations*: a few
(family, attribute value) pairs such as "flat cone" and a few compositions such as "a cone on top of a box" whose
every combination is absent from `train`, while each attribute value and each part still occurs in `train` with
other families; and (2) fresh samples of combinations seen in training. The `novel_combination` column tells
them apart, so evaluation can report in-distribution and compositional generalisation separately.

On disk
-------
`build_tiny_world_dataset(output_dir)` writes::

    output_dir/
      README.md                 dataset card
      train/metadata.parquet    one row per sample (columns below), rendered PNG view embedded
      train/meshes/00000.ply    binary PLY, one per sample
      test/metadata.parquet
      test/meshes/00000.ply

which `datasets.load_dataset("meshfolder", data_dir=output_dir)` (or `load_tiny_world`) reads into the columns
`mesh` (decoded to `trimesh.Trimesh`), `image` (PIL, if rendered), `caption`, `captions`, `family`, `proportion`,
`thickness`, `orientation`, `relation`, `parts`, `combination`, `novel_combination`, `split` and `spec` (JSON for
`ShapeSpec.from_dict`, to rebuild the exact ground-truth mesh).
"""

import argparse
import functools
import itertools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

from ..rendering import render_mesh


# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------

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
# ShapeSpec
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """One procedural shape: a family, its categorical attributes, and the jittered dimensions.

    Attributes:
        family: one of `FAMILY_NAMES`.
        attributes: for single shapes, `{"proportion", "thickness", "orientation"}` as far as the family has them;
            for compositions `{"relation": "on_top_of" | "left_of"}`.
        parts: for compositions, the two part specs (first, second); empty for single shapes.
        dims: continuous parameters (`ratio`, `thickness`, `tilt`, `heading`, `yaw`, `scale`, `gap`, ...).
            Missing entries take their canonical value (see `_dim`), so `ShapeSpec(family, attributes)` is the
            canonical shape of its combination.
    """

    family: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    parts: tuple["ShapeSpec", ...] = ()
    dims: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "attributes", dict(self.attributes))
        object.__setattr__(self, "parts", tuple(self.parts))
        object.__setattr__(self, "dims", dict(self.dims))
        _validate(self)

    # -- identity ---------------------------------------------------------------------------------------------

    @property
    def combination(self) -> str:
        """The categorical identity, e.g. `"cone[orientation=lying,proportion=flat]"` or
        `"composition[relation=on_top_of](sphere,box)"`; samples of one combination share their captions."""
        key = self.family
        if self.attributes:
            key += "[" + ",".join(f"{name}={self.attributes[name]}" for name in sorted(self.attributes)) + "]"
        if self.parts:
            key += "(" + ",".join(part.family for part in self.parts) + ")"
        return key

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; `ShapeSpec.from_dict(spec.to_dict()) == spec`."""
        return {
            "family": self.family,
            "attributes": dict(self.attributes),
            "parts": [part.to_dict() for part in self.parts],
            "dims": {name: float(value) for name, value in self.dims.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShapeSpec":
        return cls(
            family=data["family"],
            attributes=data.get("attributes", {}),
            parts=tuple(cls.from_dict(part) for part in data.get("parts", ())),
            dims=data.get("dims", {}),
        )

    def sample(self, rng: np.random.Generator) -> "ShapeSpec":
        """A copy of this combination with every continuous dimension drawn at random within its range."""
        return ShapeSpec(
            family=self.family,
            attributes=self.attributes,
            parts=tuple(part.sample(rng) for part in self.parts),
            dims={name: float(rng.uniform(low, high)) for name, (low, high) in _dim_ranges(self).items()},
        )

    # -- geometry ---------------------------------------------------------------------------------------------

    def to_mesh(self) -> trimesh.Trimesh:
        """The watertight mesh (two watertight components for compositions), Y-up, centred on its bounding box,
        longest side `MESH_EXTENT`."""
        return _normalize(_build(self))

    # -- captions ---------------------------------------------------------------------------------------------

    def caption(self, rng: np.random.Generator | None = None) -> str:
        """The canonical caption, or a random paraphrase when `rng` is given."""
        captions = _all_captions(self)
        return captions[0] if rng is None else captions[int(rng.integers(len(captions)))]

    def captions(self, num: int | None = None, rng: np.random.Generator | None = None) -> list[str]:
        """Distinct captions, canonical first.

        Args:
            num: how many; `None` returns every paraphrase the grammar produces for this combination.
            rng: picks which paraphrases follow the canonical one (the first ones in grammar order when `None`).
        """
        captions = _all_captions(self)
        if num is None or num >= len(captions):
            return list(captions)
        if num < 1:
            raise ValueError(f"`num` must be at least 1, got {num}.")
        if rng is None:
            return list(captions[:num])
        rest = rng.choice(len(captions) - 1, size=num - 1, replace=False) + 1
        return [captions[0]] + [captions[i] for i in rest]


def _validate(spec: ShapeSpec) -> None:
    if spec.family == COMPOSITION:
        relation = spec.attributes.get("relation")
        if relation not in COMPOSITION_PARTS or set(spec.attributes) != {"relation"}:
            raise ValueError(
                f"A composition needs attributes {{'relation': one of {sorted(COMPOSITION_PARTS)}}}, "
                f"got {spec.attributes}."
            )
        firsts, seconds = COMPOSITION_PARTS[relation]
        families = tuple(part.family for part in spec.parts)
        if len(families) != 2 or families[0] not in firsts or families[1] not in seconds or families[0] == families[1]:
            raise ValueError(
                f"A '{relation}' composition needs two different parts, the first from {firsts} and the second "
                f"from {seconds}; got {families}."
            )
        for part in spec.parts:
            if part.attributes != _regular(part.family):
                raise ValueError(
                    f"Composition parts are plain shapes with attributes {_regular(part.family)}; the {part.family} "
                    f"part has {part.attributes}."
                )
    else:
        if spec.family not in FAMILIES:
            raise ValueError(f"Unknown shape family {spec.family!r}; expected one of {FAMILY_NAMES}.")
        if spec.parts:
            raise ValueError(f"Only compositions have parts; a {spec.family} got {len(spec.parts)}.")
        valid = FAMILIES[spec.family].combinations()
        if dict(spec.attributes) not in valid:
            raise ValueError(
                f"Invalid attributes {dict(spec.attributes)} for family {spec.family!r}; valid combinations: {valid}."
            )
    unknown = set(spec.dims) - set(_dim_ranges(spec))
    if unknown:
        raise ValueError(
            f"Unknown dims {sorted(unknown)} for {spec.combination}; it has {sorted(_dim_ranges(spec))}."
        )


def _dim_ranges(spec: ShapeSpec) -> dict[str, tuple[float, float]]:
    """The range of every continuous dimension of a spec (uniformly sampled by `ShapeSpec.sample`)."""
    attributes = spec.attributes
    ranges: dict[str, tuple[float, float]] = {}
    if spec.family == COMPOSITION:
        if attributes["relation"] == "on_top_of":
            ranges["scale"] = (0.55, 0.85)  # top width / bottom width
        else:
            ranges["scale"] = (0.7, 1.0)  # second width / first width
            ranges["gap"] = (0.15, 0.35)
        return ranges
    if "proportion" in attributes:
        ranges["ratio"] = PROPORTION_RATIOS[attributes["proportion"]]
    if spec.family == "capsule":
        ranges["ratio"] = CAPSULE_RATIO
    if spec.family == "torus":
        ranges["thickness"] = TORUS_THICKNESS[attributes["thickness"]]
    if spec.family == "tube":
        ranges["thickness"] = TUBE_WALL[attributes["thickness"]]
    if spec.family in ("box", "pyramid"):
        ranges["yaw"] = (0.0, 90.0)  # spin of the square cross-section around the axis
    orientation = attributes.get("orientation")
    if orientation == "tilted":
        ranges["tilt"] = TILT_DEGREES
        ranges["lean"] = (-1.0, 1.0)  # its sign picks the side the shape leans to (canonical: 0 → right)
    if orientation in ("lying", "tilted"):
        ranges["heading"] = (-HEADING_JITTER_DEGREES, HEADING_JITTER_DEGREES)
    return ranges


def _dim(spec: ShapeSpec, name: str) -> float:
    """A continuous dimension of the spec, or its canonical value: the geometric middle of the range for ratios
    (a regular shape is exactly as tall as it is wide), no yaw, else the middle of the range."""
    if name in spec.dims:
        return float(spec.dims[name])
    low, high = _dim_ranges(spec)[name]
    if name == "ratio":
        return math.sqrt(low * high)
    if name == "yaw":
        return 0.0
    return (low + high) / 2.0


# --------------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------------

_Z_TO_Y = trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0])
"""trimesh primitives are built along +Z; this turns +Z into +Y (up)."""


def _rotation(degrees: float, axis: Sequence[float]) -> np.ndarray:
    return trimesh.transformations.rotation_matrix(math.radians(degrees), axis)


def _upright_primitive(spec: ShapeSpec) -> trimesh.Trimesh:
    """The shape in its upright pose: axis along +Y, width (diameter or side) 1, centred on its bounding box."""
    family = spec.family
    ratio = _dim(spec, "ratio") if "ratio" in _dim_ranges(spec) else 1.0
    creation = trimesh.creation
    if family == "sphere":
        mesh = creation.icosphere(subdivisions=3, radius=0.5)
    elif family == "ellipsoid":
        mesh = creation.icosphere(subdivisions=3, radius=0.5)
        mesh.apply_scale([1.0, ratio, 1.0])
    elif family == "box":
        mesh = creation.box(extents=(1.0, ratio, 1.0))
    elif family == "cylinder":
        mesh = creation.cylinder(radius=0.5, height=ratio, sections=48, transform=_Z_TO_Y)
    elif family == "cone":
        mesh = creation.cone(radius=0.5, height=ratio, sections=48, transform=_Z_TO_Y)
    elif family == "pyramid":
        h = ratio
        vertices = np.array(
            [[-0.5, 0, -0.5], [0.5, 0, -0.5], [0.5, 0, 0.5], [-0.5, 0, 0.5], [0, h, 0]], dtype=np.float64
        )
        faces = np.array([[0, 1, 2], [0, 2, 3], [0, 4, 1], [1, 4, 2], [2, 4, 3], [3, 4, 0]])
        mesh = trimesh.Trimesh(vertices, faces, process=True)
        mesh.fix_normals()
    elif family == "tube":
        inner = 0.5 * _dim(spec, "thickness")
        mesh = creation.annulus(r_min=inner, r_max=0.5, height=ratio, sections=48, transform=_Z_TO_Y)
    elif family == "torus":
        k = _dim(spec, "thickness")  # minor / major radius, with major + minor = 0.5
        major = 0.5 / (1.0 + k)
        mesh = creation.torus(major * 1.0, major * k, major_sections=48, minor_sections=20, transform=_Z_TO_Y)
    elif family == "capsule":
        mesh = creation.capsule(height=ratio - 1.0, radius=0.5, count=[24, 24], transform=_Z_TO_Y)
    else:  # unreachable after validation
        raise ValueError(f"No geometry for family {family!r}.")
    if "yaw" in _dim_ranges(spec):
        mesh.apply_transform(_rotation(_dim(spec, "yaw"), [0, 1, 0]))
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    return mesh


def _orientation_matrix(spec: ShapeSpec) -> np.ndarray:
    """4×4 rotation that takes the upright pose to the spec's orientation."""
    orientation = spec.attributes.get("orientation", "upright")
    if orientation == "upright":
        return np.eye(4)
    if orientation == "upside_down":
        return _rotation(180.0, [0, 0, 1])
    heading = _rotation(_dim(spec, "heading"), [0, 1, 0])
    if orientation == "lying":
        return heading @ _rotation(90.0, [0, 0, 1])
    # tilted: lean sideways (around the front-facing axis Z), so the lean shows in a front view.
    side = -1.0 if _dim(spec, "lean") < 0 else 1.0
    return heading @ _rotation(side * _dim(spec, "tilt"), [0, 0, 1])


def _build(spec: ShapeSpec) -> trimesh.Trimesh:
    """The un-normalised mesh of a spec (single shapes have width 1 before orientation)."""
    if spec.family != COMPOSITION:
        mesh = _upright_primitive(spec)
        mesh.apply_transform(_orientation_matrix(spec))
        return mesh
    first, second = (_upright_primitive(part) for part in spec.parts)
    scale = _dim(spec, "scale")
    if spec.attributes["relation"] == "on_top_of":
        top, bottom = first, second
        top.apply_scale(scale)
        # Sink the top part slightly into the bottom one so the pair reads as one object (a sphere touches a flat
        # top in a single point otherwise).
        sink = (0.1 if spec.parts[0].family == "sphere" else 0.03) * top.extents[1]
        top.apply_translation([0.0, bottom.bounds[1, 1] - top.bounds[0, 1] - sink, 0.0])
        parts = [bottom, top]
    else:
        left, right = first, second
        right.apply_scale(scale)
        gap = _dim(spec, "gap")
        # Both parts stand on the same ground plane, `gap` apart along X.
        left.apply_translation([-gap / 2 - left.bounds[1, 0], -left.bounds[0, 1], 0.0])
        right.apply_translation([gap / 2 - right.bounds[0, 0], -right.bounds[0, 1], 0.0])
        parts = [left, right]
    return trimesh.util.concatenate(parts)


def _normalize(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    mesh.apply_scale(MESH_EXTENT / float(mesh.extents.max()))
    return mesh


# --------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------


def _single_captions(spec: ShapeSpec) -> list[str]:
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


def _composition_captions(spec: ShapeSpec) -> list[str]:
    first, second = spec.parts
    first_nouns = FAMILIES[first.family].nouns_for("regular")
    second_nouns = FAMILIES[second.family].nouns_for("regular")
    captions = []
    for template in _RELATION_TEMPLATES[spec.attributes["relation"]]:
        for a, b in itertools.product(first_nouns, second_nouns):
            captions.append(template.format(a=_with_article(a), b=_with_article(b)))
    return captions


def _all_captions(spec: ShapeSpec) -> tuple[str, ...]:
    """Every caption of the spec's combination, canonical first, without duplicates, in a fixed order."""
    captions = _composition_captions(spec) if spec.family == COMPOSITION else _single_captions(spec)
    return tuple(dict.fromkeys(captions))


# --------------------------------------------------------------------------------------------------------------
# Combinations and the split
# --------------------------------------------------------------------------------------------------------------


def list_combinations() -> list[ShapeSpec]:
    """Every combination of the tiny world, as canonical (un-jittered) specs, in a fixed order."""
    specs = [
        ShapeSpec(name, attributes) for name, family in FAMILIES.items() for attributes in family.combinations()
    ]
    for relation, (firsts, seconds) in COMPOSITION_PARTS.items():
        for first, second in itertools.product(firsts, seconds):
            if first != second:
                parts = (ShapeSpec(first, _regular(first)), ShapeSpec(second, _regular(second)))
                specs.append(ShapeSpec(COMPOSITION, {"relation": relation}, parts))
    return specs


def _regular(family: str) -> dict[str, str]:
    """Attributes of a family's plain form (regular proportion, upright), used for composition parts."""
    return next(
        attributes
        for attributes in FAMILIES[family].combinations()
        if attributes.get("proportion", "regular") == "regular"
        and attributes.get("orientation", "upright") == "upright"
    )


@dataclass(frozen=True)
class TinyWorldSplit:
    """The fixed split of combinations.

    Attributes:
        train: combinations that appear in training.
        novel: combinations held out entirely (only in the `test` split).
        novel_pairs: the held-out (family, attribute, value) triples that define the novel single shapes.
    """

    train: tuple[ShapeSpec, ...]
    novel: tuple[ShapeSpec, ...]
    novel_pairs: tuple[tuple[str, str, str], ...]


def split_combinations(seed: int = 0, num_novel_pairs: int = 4, num_novel_compositions: int = 3) -> TinyWorldSplit:
    """Choose the held-out combinations, deterministically from `seed`.

    Held out are all combinations with one of `num_novel_pairs` (family, attribute, non-default value) pairs, e.g.
    every flat cone, and `num_novel_compositions` compositions. The choice keeps the split compositional: a held-out
    value stays in training with at least two other families, a family loses at most one pair and keeps at least
    half of its combinations, and a held-out composition's parts still appear in the same slot of that relation.

    Returns:
        The `TinyWorldSplit`.
    """
    rng = np.random.default_rng(seed)
    combinations = list_combinations()
    singles = [spec for spec in combinations if spec.family != COMPOSITION]
    compositions = [spec for spec in combinations if spec.family == COMPOSITION]

    defaults = {"proportion": "regular", "orientation": "upright"}
    candidates = sorted(
        {
            (spec.family, name, value)
            for spec in singles
            for name, value in spec.attributes.items()
            if defaults.get(name) != value
        }
    )
    novel_pairs: list[tuple[str, str, str]] = []
    held: set[str] = set()
    for index in rng.permutation(len(candidates)):
        if len(novel_pairs) == num_novel_pairs:
            break
        family, name, value = candidates[index]
        if any(pair[0] == family for pair in novel_pairs):
            continue
        newly_held = {
            spec.combination for spec in singles if spec.family == family and spec.attributes.get(name) == value
        }
        family_total = sum(spec.family == family for spec in singles)
        family_held = sum(spec.family == family and spec.combination in held | newly_held for spec in singles)
        others_with_value = {
            spec.family
            for spec in singles
            if spec.family != family and spec.attributes.get(name) == value and spec.combination not in held
        }
        if family_held * 2 > family_total or len(others_with_value) < 2:
            continue
        novel_pairs.append((family, name, value))
        held |= newly_held

    chosen = 0
    for index in rng.permutation(len(compositions)):
        if chosen == num_novel_compositions:
            break
        spec = compositions[index]
        relation = spec.attributes["relation"]
        rest = [
            other
            for other in compositions
            if other.attributes["relation"] == relation and other.combination not in held | {spec.combination}
        ]
        if all(any(other.parts[slot].family == part.family for other in rest) for slot, part in enumerate(spec.parts)):
            held.add(spec.combination)
            chosen += 1

    return TinyWorldSplit(
        train=tuple(spec for spec in combinations if spec.combination not in held),
        novel=tuple(spec for spec in combinations if spec.combination in held),
        novel_pairs=tuple(novel_pairs),
    )


def _cycle(combinations: Sequence[ShapeSpec], num: int, rng: np.random.Generator) -> list[ShapeSpec]:
    """`num` combinations covering all of them as evenly as possible (each pass in a fresh random order)."""
    if num > 0 and not combinations:
        raise ValueError("Cannot sample from an empty list of combinations.")
    result: list[ShapeSpec] = []
    while len(result) < num:
        result.extend(combinations[i] for i in rng.permutation(len(combinations)))
    return result[:num]


def make_tiny_world_specs(
    num_train: int = 2000, num_heldout: int = 200, seed: int = 0, novel_fraction: float = 0.5
) -> dict[str, list[ShapeSpec]]:
    """Sample the specs of both splits.

    Args:
        num_train: number of training samples, spread evenly over the training combinations.
        num_heldout: number of held-out (`test`) samples.
        seed: fixes the split of combinations and every sample.
        novel_fraction: share of the held-out samples drawn from novel combinations; the rest are fresh samples
            of training combinations.

    Returns:
        `{"train": [...], "test": [...]}`, lists of jittered `ShapeSpec`s. Identical for identical arguments.
    """
    if num_train < 0 or num_heldout < 0:
        raise ValueError(f"Sample counts must be non-negative, got num_train={num_train}, num_heldout={num_heldout}.")
    if not 0.0 <= novel_fraction <= 1.0:
        raise ValueError(f"`novel_fraction` must be in [0, 1], got {novel_fraction}.")
    split = split_combinations(seed)
    rng = np.random.default_rng([seed, 1])
    num_novel = round(num_heldout * novel_fraction)
    train = [spec.sample(rng) for spec in _cycle(split.train, num_train, rng)]
    test = [spec.sample(rng) for spec in _cycle(split.novel, num_novel, rng)]
    test += [spec.sample(rng) for spec in _cycle(split.train, num_heldout - num_novel, rng)]
    return {"train": train, "test": test}


# --------------------------------------------------------------------------------------------------------------
# Ground truth for evaluation
# --------------------------------------------------------------------------------------------------------------


def reference_meshes_for(
    family: str,
    attributes: Mapping[str, str] | None = None,
    *,
    parts: Sequence[str] = (),
    num_variants: int = 4,
    seed: int = 0,
) -> list[trimesh.Trimesh]:
    """Ground-truth meshes of one combination: the canonical shape, then `num_variants - 1` jittered samples.

    Args:
        family: one of `FAMILY_NAMES`.
        attributes: as in the dataset columns (`proportion`, `thickness`, `orientation`; `relation` for
            compositions). `None` values are ignored; missing attributes take the family's defaults
            (`regular`, `upright`) where those exist.
        parts: for compositions, the two part families (the `parts` column).
        num_variants: number of meshes returned.
        seed: seed of the jittered variants.

    Returns:
        `num_variants` normalised meshes (see `ShapeSpec.to_mesh`).
    """
    if num_variants < 1:
        raise ValueError(f"`num_variants` must be at least 1, got {num_variants}.")
    attributes = {name: value for name, value in (attributes or {}).items() if value is not None}
    if family == COMPOSITION:
        spec = ShapeSpec(family, attributes, tuple(ShapeSpec(part, _regular(part)) for part in parts))
    else:
        if family not in FAMILIES:
            raise ValueError(f"Unknown shape family {family!r}; expected one of {FAMILY_NAMES}.")
        combinations = FAMILIES[family].combinations()
        defaults = {"proportion": "regular", "orientation": "upright"}
        completed = {
            name: attributes.get(name, defaults.get(name))
            for name in ATTRIBUTE_NAMES
            if any(name in combo for combo in combinations)
        }
        if completed not in combinations:  # e.g. a torus has no "regular" thickness to default to
            completed = attributes
        spec = ShapeSpec(family, completed)
    rng = np.random.default_rng(seed)
    return [spec.to_mesh()] + [spec.sample(rng).to_mesh() for _ in range(num_variants - 1)]


def _surface_points(mesh: trimesh.Trimesh, num_points: int, seed: int) -> np.ndarray:
    return np.asarray(trimesh.sample.sample_surface(mesh, num_points, seed=seed)[0])


def _chamfer_points(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    return float(cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


# Every signed permutation of the axes (48, reflections included: every primitive here is mirror-symmetric), the
# ambiguity left by a box frame: which side is the shape's axis, and which way it points.
_SIGNED_PERMUTATIONS = np.stack([
    np.diag(signs)[list(order)]
    for order in itertools.permutations(range(3))
    for signs in itertools.product((1.0, -1.0), repeat=3)
])  # (48, 3, 3)


def canonical_surface_points(mesh: trimesh.Trimesh, num_points: int = 1024, seed: int = 0) -> np.ndarray:
    """Surface samples `(num_points, 3)` in the mesh's own frame, stretched to the unit cube.

    The frame is the minimum-volume oriented bounding box; every side is then scaled to length 1. What is left
    is the *shape* of the object, with pose and proportions taken out (those are scored by
    `classify_orientation` and `classify_proportion`): a lying tall cylinder and an upright flat one become the
    same round-section prism, still unlike a square-section box or a tapered cone.
    """
    to_frame, extents = trimesh.bounds.oriented_bounds(mesh)
    points = trimesh.transform_points(_surface_points(mesh, num_points, seed), to_frame)
    return points / np.maximum(np.asarray(extents), 1e-6)


def canonical_chamfer(points: np.ndarray, reference: np.ndarray) -> float:
    """Smallest symmetric Chamfer distance between two `canonical_surface_points` clouds over the 48 signed axis
    permutations of `points` (the box frame fixes the axes only up to those)."""
    from scipy.spatial import cKDTree

    points_tree, reference_tree = cKDTree(points), cKDTree(reference)
    best = float("inf")
    for matrix in _SIGNED_PERMUTATIONS:
        # |r - M p| = |M^T r - p|, so both directions reuse the two trees.
        forward = reference_tree.query(points @ matrix.T)[0].mean()
        backward = points_tree.query(reference @ matrix)[0].mean()
        best = min(best, float(forward + backward))
    return best


@functools.lru_cache(maxsize=256)
def _canonical_references(family: str, attribute_items: tuple, num_variants: int, num_points: int):
    """`canonical_surface_points` of `reference_meshes_for(family, ...)`, or `None` where the attributes do not
    exist for the family; cached because an evaluation asks for the same few combinations again and again."""
    family_attributes = {name for combination in FAMILIES[family].combinations() for name in combination}
    if {name for name, _ in attribute_items} - family_attributes:
        return None
    try:
        references = reference_meshes_for(family, dict(attribute_items), num_variants=num_variants)
    except ValueError:
        return None
    return tuple(canonical_surface_points(reference, num_points, seed=i + 1) for i, reference in enumerate(references))


def classify_family(
    mesh: trimesh.Trimesh,
    attributes: Mapping[str, str] | None = None,
    families: Sequence[str] | None = None,
    num_variants: int = 2,
    num_points: int = 1024,
) -> str:
    """The single-shape family whose ground-truth meshes with the same `attributes` are nearest to `mesh`.

    For every family that has the attributes (a box has no thickness, so "a thin box" never competes), the
    distance is the smallest `canonical_chamfer` between `mesh` and `num_variants` reference meshes
    (`reference_meshes_for`), both with pose and proportions taken out (`canonical_surface_points`). Ground-truth
    meshes of the held-out split are classified correctly (a test checks this), so the accuracy of generated
    shapes measures the model, not this classifier.
    """
    points = canonical_surface_points(mesh, num_points, seed=0)
    attribute_items = tuple(sorted((k, v) for k, v in (attributes or {}).items() if v is not None))
    best, best_distance = None, float("inf")
    for family in families or FAMILIES:
        references = _canonical_references(family, attribute_items, num_variants, num_points)
        if references is None:  # the attributes do not exist for this family (e.g. thickness of a box)
            continue
        distance = min(canonical_chamfer(points, reference) for reference in references)
        if distance < best_distance:
            best, best_distance = family, distance
    if best is None:
        raise ValueError(f"No family has the attributes {dict(attributes or {})}.")
    return best


def _surface_moments(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    """Area centroid `(3,)` and covariance `(3, 3)` of the surface, integrated exactly over the triangles.

    Works for any triangle soup (open, non-manifold, several components), unlike volume moments.
    """
    if len(mesh.faces) == 0:
        raise ValueError("Cannot classify an empty mesh.")
    origin = mesh.vertices.mean(axis=0)
    triangles = mesh.triangles - origin  # (F, 3, 3)
    areas = mesh.area_faces  # (F,)
    total = areas.sum()
    if total <= 0:
        raise ValueError("Cannot classify a mesh with zero surface area.")
    corner_sum = triangles.sum(axis=1)  # (F, 3)
    first = (areas[:, None] * corner_sum).sum(axis=0) / (3.0 * total)
    # For one triangle: integral of x x^T dA = A / 12 * (s s^T + sum_k v_k v_k^T), s = v_0 + v_1 + v_2.
    second = np.einsum("f,fi,fj->ij", areas, corner_sum, corner_sum) + np.einsum(
        "f,fki,fkj->ij", areas, triangles, triangles
    )
    covariance = second / (12.0 * total) - np.outer(first, first)
    return first + origin, covariance


def _shape_axis_and_extents(mesh: trimesh.Trimesh, min_gap: float = 0.05) -> tuple[np.ndarray | None, np.ndarray]:
    """The shape's symmetry axis and its extents along the axis and across it.

    The axis is the eigenvector of the surface covariance whose eigenvalue stands apart from the other two (the
    largest for an elongated shape, the smallest for a flat one); for a body of revolution or a square prism it is
    exactly the symmetry axis. When no eigenvalue stands apart by `min_gap` of the largest (a sphere, a cube, a
    cone as tall as it is wide) there is no axis and the extents are those of the minimum-volume oriented box.

    Returns:
        `(axis, extents)`: unit `(3,)` vector or `None`; `(3,)` extents, `[along axis, across, across]` (the
        across pair from the minimum-area rectangle of the shape projected along the axis).
    """
    _, covariance = _surface_moments(mesh)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    low, mid, high = eigenvalues
    gap_high, gap_low = (high - mid) / max(high, 1e-12), (mid - low) / max(high, 1e-12)
    if max(gap_high, gap_low) < min_gap:
        _, extents = trimesh.bounds.oriented_bounds(mesh)
        return None, np.asarray(extents)
    index = 2 if gap_high > gap_low else 0
    axis = eigenvectors[:, index]
    across = eigenvectors[:, [i for i in range(3) if i != index]]  # (3, 2)
    along = mesh.vertices @ axis
    _, rectangle = trimesh.bounds.oriented_bounds_2D(mesh.vertices @ across)
    return axis, np.array([along.max() - along.min(), *rectangle])


def classify_proportion(mesh: trimesh.Trimesh, tall_ratio: float = 1.5, flat_ratio: float = 0.6) -> str:
    """Proportion of a shape, independent of its pose.

    With the extents along and across the shape's axis sorted `a <= b <= c` (see `_shape_axis_and_extents`), a
    shape is `"tall"` (elongated) when `c / b >= tall_ratio`, `"flat"` when `a / b <= flat_ratio`, else
    `"regular"`. The thresholds sit between the generated ranges (`PROPORTION_RATIOS`). A tall shape lying on its
    side is still `"tall"`: pose is `classify_orientation`'s job.
    """
    _, extents = _shape_axis_and_extents(mesh)
    a, b, c = np.sort(extents)
    if b <= 0:
        raise ValueError(f"Degenerate mesh with extents {extents.tolist()}.")
    if c / b >= tall_ratio:
        return "tall"
    if a / b <= flat_ratio:
        return "flat"
    return "regular"


def _center_of_mass(mesh: trimesh.Trimesh) -> np.ndarray:
    if mesh.is_watertight and mesh.volume > 0:
        return np.asarray(mesh.center_mass)
    weights = mesh.area_faces
    return (mesh.triangles_center * weights[:, None]).sum(axis=0) / max(weights.sum(), 1e-12)


def _apex_direction(mesh: trimesh.Trimesh, axis: np.ndarray, min_taper: float = 0.1) -> np.ndarray | None:
    """`axis` turned towards the narrow end of a tapered shape, or `None` if the shape is not tapered.

    A cone's centre of mass sits a quarter of its height above the base, so along the axis it is offset from the
    middle of the shape's extent towards the base; `min_taper` is the smallest offset (as a fraction of the
    extent) that counts as tapered. Cylinders, boxes and capsules have no offset.
    """
    projections = mesh.vertices @ axis
    low, high = projections.min(), projections.max()
    if high - low <= 0:
        return None
    taper = ((low + high) / 2.0 - float(_center_of_mass(mesh) @ axis)) / (high - low)
    if abs(taper) < min_taper:
        return None
    return axis * math.copysign(1.0, taper)


def classify_orientation(mesh: trimesh.Trimesh, tolerance_degrees: float = 20.0) -> str | None:
    """Pose of a shape relative to the world up axis (+Y).

    The shape's axis comes from its surface second moments (see `_shape_axis_and_extents`). Shapes whose moments
    are nearly isotropic have no such axis; of those, a tapered shape (a cone or pyramid about as tall as it is
    wide) is still recognised as upright or upside down from the offset of its centre of mass along +Y. For
    tapered shapes the axis points to the apex (see `_apex_direction`).

    Returns:
        `"upright"` (axis within `tolerance_degrees` of vertical; apex up for tapered shapes),
        `"upside_down"` (tapered shape, apex down), `"lying"` (axis within the tolerance of horizontal),
        `"tilted"` (in between), or `None` when the shape has no discernible axis (a sphere, a cube, a regular
        cylinder, or a near-cubic tapered shape lying on its side).
    """
    axis, _ = _shape_axis_and_extents(mesh)
    if axis is None:
        axis = _apex_direction(mesh, np.array([0.0, 1.0, 0.0]))
        if axis is None:
            return None
    apex = _apex_direction(mesh, axis)
    cosine = float(apex[1]) if apex is not None else abs(float(axis[1]))
    angle = math.degrees(math.acos(np.clip(cosine, -1.0, 1.0)))
    if angle <= tolerance_degrees:
        return "upright"
    if angle >= 180.0 - tolerance_degrees:
        return "upside_down"
    if abs(angle - 90.0) <= tolerance_degrees:
        return "lying"
    return "tilted"


# --------------------------------------------------------------------------------------------------------------
# The dataset on disk
# --------------------------------------------------------------------------------------------------------------

SPLITS = ("train", "test")
"""Split names on disk; `test` is the held-out split."""


def _features(render_images: bool):
    import datasets

    columns = {"file_name": datasets.Value("string")}
    if render_images:
        columns["image"] = datasets.Image()
    string, strings = datasets.Value("string"), datasets.List(datasets.Value("string"))
    columns.update(
        caption=string,
        captions=strings,
        family=string,
        proportion=string,
        thickness=string,
        orientation=string,
        relation=string,
        parts=strings,
        combination=string,
        novel_combination=datasets.Value("bool"),
        split=string,
        spec=string,
    )
    return datasets.Features(columns)


_NUM_CAPTIONS = 8
"""Captions stored per sample (canonical + 7 random paraphrases)."""

DATASET_VIEW = {"elevation": 20.0, "azimuth": 30.0, "projection": "perspective", "fov": 25.0, "supersample": 2}
"""`render_mesh` arguments of the `image` column: one view from the front right, slightly above, with a narrow
field of view so that perspective does not make cylinders look like cones."""


def _write_sample(
    job: tuple[dict[str, Any], str, int | None, tuple[int, ...]],
) -> tuple[bytes | None, str, list[str]]:
    """Worker: build one mesh, write it, render it. Returns `(png_bytes or None, caption, captions)`."""
    spec_dict, mesh_path, image_size, seed = job
    spec = ShapeSpec.from_dict(spec_dict)
    mesh = spec.to_mesh()
    mesh.export(mesh_path, file_type="ply")
    png = None
    if image_size is not None:
        image = render_mesh(mesh, image_size, **DATASET_VIEW)
        buffer = BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        png = buffer.getvalue()
    return png, spec.caption(), spec.captions(num=_NUM_CAPTIONS, rng=np.random.default_rng(seed))


_DATASET_CARD = """---
pretty_name: CG-MLLM tiny world
license: apache-2.0
task_categories:
- text-to-3d
- image-to-3d
tags:
- 3d
- mesh
- procedural
- cgmllm
---

# CG-MLLM tiny world

Procedural 3D shapes with captions, generated by `cgmllm.training.tiny_world` (seed {seed}): {num_train} training
and {num_test} held-out samples over {num_combinations} combinations of {num_families} shape families and
attributes (proportion, thickness, orientation, two-part compositions). Meshes are binary PLY, Y-up, centred, longest
side {extent}.

Held-out (`test`) samples are half novel combinations, never seen in training ({novel}), half fresh samples of
training combinations (column `novel_combination`).

```python
from datasets import load_dataset
ds = load_dataset("meshfolder", data_dir="<this folder>")  # splits: train, test
ds["train"][0]["mesh"]  # trimesh.Trimesh
```
"""


def build_tiny_world_dataset(
    output_dir: str | os.PathLike,
    num_train: int = 2000,
    num_heldout: int = 200,
    image_size: int = 128,
    seed: int = 0,
    render_images: bool = True,
    num_workers: int | None = None,
) -> Path:
    """Generate the tiny world and write it as a `meshfolder` dataset.

    Args:
        output_dir: folder to write to (created; existing split folders are replaced).
        num_train: number of training samples.
        num_heldout: number of held-out samples (the `test` split).
        image_size: side of the rendered view in pixels (camera: `DATASET_VIEW`).
        seed: fixes the split and every sample.
        render_images: include the rendered view as an `image` column.
        num_workers: processes used to build and render; `None` uses all CPU cores, 0 or 1 builds in-process.

    Returns:
        `output_dir` as a `Path`; load it with `load_tiny_world` or
        `datasets.load_dataset("meshfolder", data_dir=output_dir)`.
    """
    import shutil

    import datasets

    if render_images and image_size < 8:
        raise ValueError(f"`image_size` must be at least 8 pixels, got {image_size}.")
    output_dir = Path(output_dir)
    specs = make_tiny_world_specs(num_train, num_heldout, seed)
    split = split_combinations(seed)
    novel = {spec.combination for spec in split.novel}
    features = _features(render_images)
    num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers

    output_dir.mkdir(parents=True, exist_ok=True)
    for split_index, (split_name, split_specs) in enumerate(specs.items()):
        split_dir = output_dir / split_name
        if split_dir.exists():
            shutil.rmtree(split_dir)
        if not split_specs:
            continue
        (split_dir / "meshes").mkdir(parents=True)
        jobs = [
            (
                spec.to_dict(),
                str(split_dir / "meshes" / f"{index:05d}.ply"),
                image_size if render_images else None,
                (seed, split_index, index),  # seeds the choice of stored paraphrases
            )
            for index, spec in enumerate(split_specs)
        ]
        if num_workers > 1:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                results = list(pool.map(_write_sample, jobs, chunksize=16))
        else:
            results = [_write_sample(job) for job in jobs]

        rows: dict[str, list[Any]] = {name: [] for name in features}
        for index, (spec, (png, caption, captions)) in enumerate(zip(split_specs, results)):
            rows["file_name"].append(f"meshes/{index:05d}.ply")
            if render_images:
                rows["image"].append({"bytes": png, "path": None})
            rows["caption"].append(caption)
            rows["captions"].append(captions)
            rows["family"].append(spec.family)
            for name in ATTRIBUTE_NAMES + ("relation",):
                rows[name].append(spec.attributes.get(name))
            rows["parts"].append([part.family for part in spec.parts])
            rows["combination"].append(spec.combination)
            rows["novel_combination"].append(spec.combination in novel)
            rows["split"].append(split_name)
            rows["spec"].append(json.dumps(spec.to_dict(), sort_keys=True))
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(split_dir / "metadata.parquet"))

    card = _DATASET_CARD.format(
        seed=seed,
        num_train=num_train,
        num_test=num_heldout,
        num_combinations=len(list_combinations()),
        num_families=len(FAMILY_NAMES),
        extent=MESH_EXTENT,
        novel="; ".join(sorted(novel)),
    )
    (output_dir / "README.md").write_text(card)
    return output_dir


def load_tiny_world(output_dir: str | os.PathLike, split: str = "train", **load_kwargs):
    """Load one split of a dataset written by `build_tiny_world_dataset`.

    Args:
        output_dir: the folder given to `build_tiny_world_dataset`.
        split: `"train"` or `"test"` (the held-out split).
        **load_kwargs: forwarded to `datasets.load_dataset` (e.g. `cache_dir`).

    Returns:
        `datasets.Dataset` whose `mesh` column decodes to `trimesh.Trimesh` and `image` to `PIL.Image.Image`.
    """
    import datasets

    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the tiny world has splits {SPLITS} ('test' is held out).")
    if not (Path(output_dir) / split / "metadata.parquet").is_file():
        raise ValueError(
            f"No tiny world split {split!r} in {output_dir}; build it with build_tiny_world_dataset() or "
            "`python -m cgmllm.training.tiny_world --out DIR`."
        )
    return datasets.load_dataset("meshfolder", data_dir=str(output_dir), split=split, **load_kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m cgmllm.training.tiny_world --out DIR [--num-train N] [--num-heldout N] ...`."""
    parser = argparse.ArgumentParser(description="Build the CG-MLLM tiny world (procedural shapes with captions).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-heldout", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-images", action="store_true", help="do not render the image column")
    parser.add_argument("--num-workers", type=int, default=None, help="default: all CPU cores")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    output_dir = build_tiny_world_dataset(
        args.out,
        num_train=args.num_train,
        num_heldout=args.num_heldout,
        image_size=args.image_size,
        seed=args.seed,
        render_images=not args.no_images,
        num_workers=args.num_workers,
    )
    split = split_combinations(args.seed)
    print(
        f"Wrote {args.num_train} train + {args.num_heldout} held-out samples to {output_dir} in "
        f"{time.perf_counter() - start:.1f} s ({len(split.train)} training combinations, {len(split.novel)} novel)."
    )
    print("Novel combinations: " + ", ".join(spec.caption() for spec in split.novel))


if __name__ == "__main__":
    main()


__all__ = [
    "ATTRIBUTE_NAMES",
    "COMPOSITION",
    "FAMILIES",
    "FAMILY_NAMES",
    "ShapeFamily",
    "ShapeSpec",
    "TinyWorldSplit",
    "build_tiny_world_dataset",
    "classify_orientation",
    "classify_proportion",
    "list_combinations",
    "load_tiny_world",
    "main",
    "make_tiny_world_specs",
    "reference_meshes_for",
    "split_combinations",
]
