"""Posed trimesh primitives, the held-out meshes the tiny world did not make (`tiny_world.primitives`)."""

import numpy as np
import pytest

from cgmllm.training.tiny_world import classify_family
from cgmllm.training.tiny_world.primitives import PRIMITIVE_FAMILIES, posed_primitive_rows


def test_rows_are_trimesh_primitives_as_built_then_posed():
    rows = posed_primitive_rows(2, families=("cylinder", "torus"))
    assert [(row["family"], row["posed"]) for row in rows] == [
        ("cylinder", False), ("cylinder", True), ("torus", False), ("torus", True)]
    for row in rows:
        assert row["mesh"].is_watertight, row["caption"]
        assert row["caption"].startswith("trimesh.creation.")
    as_built, posed = rows[0]["mesh"], rows[1]["mesh"]
    # As built: trimesh's +Z axis, centred at the origin; the cylinder's height is its z extent.
    height = float(rows[0]["caption"].split("height=")[1].split(",")[0])
    assert as_built.extents == pytest.approx([1.0, 1.0, height], abs=0.01)
    assert np.allclose(as_built.bounds.mean(axis=0), 0.0, atol=1e-6)
    # Posed: the axis (the principal direction of a cylinder's vertices) is no longer a coordinate axis.
    _, vectors = np.linalg.eigh(np.cov((posed.vertices - posed.vertices.mean(axis=0)).T))
    assert np.abs(vectors).max(axis=0).min() < 0.99
    assert not np.allclose(posed.bounds.mean(axis=0), 0.0, atol=1e-3)
    # Another tessellation than the tiny world's (48 sections: 192 faces for a cylinder).
    assert len(as_built.faces) != 4 * 48 or len(posed.faces) != 4 * 48


def test_rows_are_the_family_they_claim():
    # The ground-truth classifier (pose and proportions taken out) agrees: the shapes are tiny-world shapes, only
    # their meshing and pose are new.
    for row in posed_primitive_rows(2, seed=1, families=("cylinder", "torus", "pyramid")):
        attributes = {name: row[name] for name in ("proportion", "thickness") if row[name]}
        assert classify_family(row["mesh"], attributes) == row["family"], row["caption"]


def test_rows_are_reproducible_and_independent_of_the_count():
    few = posed_primitive_rows(2, seed=3)
    many = posed_primitive_rows(3, seed=3)
    assert len(few) == 2 * len(PRIMITIVE_FAMILIES) and len(many) == 3 * len(PRIMITIVE_FAMILIES)
    # Mesh i of a family is the same whatever the count: the first two of each family of `many` are `few`.
    firsts = [row for index, row in enumerate(many) if index % 3 < 2]
    assert [row["caption"] for row in firsts] == [row["caption"] for row in few]
    for row, twin in zip(few, firsts):
        assert np.array_equal(twin["mesh"].vertices, row["mesh"].vertices)
    assert [row["caption"] for row in posed_primitive_rows(2, seed=4)] != [row["caption"] for row in few]


def test_unknown_family_and_count_are_clear_errors():
    with pytest.raises(ValueError, match="No trimesh primitive for family 'ellipsoid'"):
        posed_primitive_rows(1, families=("ellipsoid",))
    with pytest.raises(ValueError, match="at least 1"):
        posed_primitive_rows(0)
