"""Plain trimesh primitives in any pose: held-out meshes that were not made by the tiny world's own generator.

Every tiny-world mesh is built by `ShapeSpec.to_mesh`: one tessellation per family (48 sections, an icosphere of
subdivision 3, ...), Y-up, in four poses (upright, upside down, lying, tilted) with little heading jitter. A user who
tries the model on `trimesh.creation.cylinder(...)` gives it something else: a Z-up shape, another tessellation, an
arbitrary rotation, size and position. `posed_primitive_rows` builds such meshes for every family that trimesh has a
constructor for (a pyramid is trimesh's cone with 4 sections), so the evaluation can ask whether captioning names the
family of a shape regardless of how it was meshed and posed:

* the first mesh of each family is the primitive as trimesh builds it (axis +Z, at the origin), as a new user tries it;
* the others are rotated by a uniformly random rotation, scaled and moved (the pipeline normalises both away);
* each has its own tessellation (sections / subdivisions / segment counts drawn per mesh, boxes subdivided 0-2 times);
* proportions are drawn from the tiny world's ranges of a random proportion of the family (`PROPORTION_RATIOS`, ...),
  so that the shape itself is one the model was trained on and only the meshing and the pose are new.
"""

import math

import numpy as np
import trimesh

from ..train_vae import random_rotations
from .families import CAPSULE_RATIO, FAMILIES, PROPORTION_RATIOS, TORUS_THICKNESS, TUBE_WALL


PRIMITIVE_FAMILIES = ("cylinder", "cone", "torus", "box", "sphere", "capsule", "tube", "pyramid")
"""The families built from trimesh constructors (no ellipsoid: trimesh has none), in the order of the rows."""

ROUND_SECTIONS = (12, 16, 24, 32, 64, 96)
"""Tessellations of round cross-sections (the tiny world always uses 48)."""


def _draw(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def build_primitive(family: str, rng: np.random.Generator) -> tuple[trimesh.Trimesh, str, dict[str, str]]:
    """One trimesh primitive of `family` along +Z (trimesh's convention), with a tessellation and proportions drawn
    from `rng`: `(mesh, the constructor call that built it, its tiny-world attributes: proportion / thickness)`."""
    if family not in PRIMITIVE_FAMILIES:
        raise ValueError(f"No trimesh primitive for family {family!r}; expected one of {PRIMITIVE_FAMILIES}.")
    proportions = FAMILIES[family].proportions
    proportion = str(rng.choice(proportions)) if proportions else None
    thicknesses = FAMILIES[family].thicknesses
    thickness = str(rng.choice(thicknesses)) if thicknesses else None
    ratio = _draw(rng, PROPORTION_RATIOS[proportion]) if proportion else 1.0  # height / width
    radius = 0.5
    creation = trimesh.creation
    if family == "cylinder":
        sections = int(rng.choice(ROUND_SECTIONS))
        mesh = creation.cylinder(radius=radius, height=ratio, sections=sections)
        call = f"cylinder(radius=0.5, height={ratio:.2f}, sections={sections})"
    elif family == "cone":
        sections = int(rng.choice(ROUND_SECTIONS))
        mesh = creation.cone(radius=radius, height=ratio, sections=sections)
        call = f"cone(radius=0.5, height={ratio:.2f}, sections={sections})"
    elif family == "pyramid":  # a square pyramid is a cone with 4 sections
        mesh = creation.cone(radius=radius * math.sqrt(2), height=ratio, sections=4)
        call = f"cone(radius=0.71, height={ratio:.2f}, sections=4)"
    elif family == "tube":
        inner = radius * _draw(rng, TUBE_WALL[thickness])
        sections = int(rng.choice(ROUND_SECTIONS))
        mesh = creation.annulus(r_min=inner, r_max=radius, height=ratio, sections=sections)
        call = f"annulus(r_min={inner:.2f}, r_max=0.5, height={ratio:.2f}, sections={sections})"
    elif family == "torus":
        minor = _draw(rng, TORUS_THICKNESS[thickness])  # minor / major radius
        major_sections, minor_sections = int(rng.choice(ROUND_SECTIONS)), int(rng.choice((8, 12, 16, 32)))
        mesh = creation.torus(1.0, minor, major_sections=major_sections, minor_sections=minor_sections)
        call = f"torus(1.0, {minor:.2f}, major_sections={major_sections}, minor_sections={minor_sections})"
    elif family == "capsule":
        length = _draw(rng, CAPSULE_RATIO)  # total length / diameter
        count = int(rng.choice((8, 16, 24, 32)))
        mesh = creation.capsule(height=2 * radius * (length - 1.0), radius=radius, count=[count, count])
        call = f"capsule(height={2 * radius * (length - 1.0):.2f}, radius=0.5, count=[{count}, {count}])"
    elif family == "box":
        subdivisions = int(rng.integers(0, 3))
        mesh = creation.box(extents=(1.0, 1.0, ratio))
        for _ in range(subdivisions):
            mesh = mesh.subdivide()
        call = f"box(extents=(1, 1, {ratio:.2f}))" + ".subdivide()" * subdivisions
    else:  # sphere: an icosphere or a UV sphere
        if rng.random() < 0.5:
            subdivisions = int(rng.integers(1, 5))
            mesh = creation.icosphere(subdivisions=subdivisions, radius=radius)
            call = f"icosphere(subdivisions={subdivisions})"
        else:
            count = int(rng.choice((8, 16, 32, 64)))
            mesh = creation.uv_sphere(radius=radius, count=[count, count])
            call = f"uv_sphere(count=[{count}, {count}])"
    attributes = {name: value for name, value in (("proportion", proportion), ("thickness", thickness)) if value}
    return mesh, "trimesh.creation." + call, attributes


def posed_primitive_rows(num_per_family: int = 5, seed: int = 0,
                         families: tuple[str, ...] = PRIMITIVE_FAMILIES) -> list[dict]:
    """`num_per_family` trimesh primitives of every family in `families` (module docstring), as evaluation rows:
    `family`, `mesh`, `caption` (how the mesh was made: the trimesh call and the pose), `posed`, and the tiny-world
    attributes of its shape, `proportion` and `thickness` (None where the family has none; no orientation: the pose is
    arbitrary).

    Mesh `i` of a family is drawn from its own seed `(seed, family, i)`, so rows do not change when `num_per_family`
    or `families` do; mesh 0 is left as trimesh builds it (axis +Z), the others are posed (random rotation, scale in
    [0.5, 2] and offset up to 1)."""
    if num_per_family < 1:
        raise ValueError(f"num_per_family must be at least 1, got {num_per_family}.")
    rows = []
    for family in families:
        for index in range(num_per_family):
            rng = np.random.default_rng([seed, PRIMITIVE_FAMILIES.index(family) if family in PRIMITIVE_FAMILIES
                                         else len(PRIMITIVE_FAMILIES), index])
            mesh, call, attributes = build_primitive(family, rng)
            pose = "as built (axis +Z)"
            if index > 0:
                transform = np.eye(4)
                transform[:3, :3] = random_rotations(1, rng)[0] * rng.uniform(0.5, 2.0)
                transform[:3, 3] = rng.uniform(-1.0, 1.0, size=3)
                mesh.apply_transform(transform)
                pose = "randomly rotated, scaled and moved"
            rows.append({"family": family, "mesh": mesh, "caption": f"{call}, {pose}", "posed": index > 0,
                         "proportion": attributes.get("proportion"), "thickness": attributes.get("thickness")})
    return rows
