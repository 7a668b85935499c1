"""Ground truth for evaluation: reference meshes of a combination and the three shape classifiers (family,
proportion, orientation) that score generated meshes."""

import functools
import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import trimesh

from .families import ATTRIBUTE_NAMES, COMPOSITION, FAMILIES, FAMILY_NAMES, regular_attributes
from .shapes import ShapeSpec


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
        spec = ShapeSpec(family, attributes, tuple(ShapeSpec(part, regular_attributes(part)) for part in parts))
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
