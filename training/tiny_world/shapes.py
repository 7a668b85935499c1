"""`ShapeSpec`, one procedural shape (family, attributes, jittered dimensions), and its watertight mesh."""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trimesh

from .captions import all_captions
from .families import (
    CAPSULE_RATIO,
    COMPOSITION,
    COMPOSITION_PARTS,
    FAMILIES,
    FAMILY_NAMES,
    HEADING_JITTER_DEGREES,
    MESH_EXTENT,
    PROPORTION_RATIOS,
    TILT_DEGREES,
    TORUS_THICKNESS,
    TUBE_WALL,
    regular_attributes,
)


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
        captions = all_captions(self)
        return captions[0] if rng is None else captions[int(rng.integers(len(captions)))]

    def captions(self, num: int | None = None, rng: np.random.Generator | None = None) -> list[str]:
        """Distinct captions, canonical first.

        Args:
            num: how many; `None` returns every paraphrase the grammar produces for this combination.
            rng: picks which paraphrases follow the canonical one (the first ones in grammar order when `None`).
        """
        captions = all_captions(self)
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
            if part.attributes != regular_attributes(part.family):
                raise ValueError(
                    f"Composition parts are plain shapes with attributes {regular_attributes(part.family)}; the {part.family} "
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
