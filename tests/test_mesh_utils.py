"""Mesh I/O, normalisation, surface / occupancy sampling, and field -> mesh extraction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from conftest import real_mesh_path

from cgmllm.mesh_utils import (
    closest_surface_points,
    denormalize_mesh,
    load_mesh,
    normalize_mesh,
    occupancy,
    remove_floaters,
    sample_sdf_points,
    sample_surface,
    sharp_edges,
    signed_distance,
    simplify_mesh,
    winding_number,
)
from cgmllm.volume_decoding import (
    _cells_touching,
    _collect,
    _corner_offsets,
    available_memory_bytes,
    cgroup_available_memory,
    decode_volume_dense,
    decode_volume_hierarchical,
    dense_grid_points,
    field_to_mesh,
    grid_memory_bytes,
    hierarchical_levels,
    marching_cubes,
)


REAL_MESHES = ["airplane.ply", "ant.ply", "nut.ply", "sphere.ply"]


def closest_faces(mesh: trimesh.Trimesh, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact `(distance, face index)` of each point to the mesh, brute force over all triangles with trimesh's
    point-triangle closest point (trimesh.proximity would need the optional rtree package)."""
    triangles = np.asarray(mesh.triangles)
    distances, faces = [], []
    for point in points:
        closest = trimesh.triangles.closest_point(triangles, np.repeat(point[None], len(triangles), axis=0))
        distance = np.linalg.norm(closest - point, axis=1)
        faces.append(distance.argmin())
        distances.append(distance.min())
    return np.asarray(distances), np.asarray(faces)


def sphere_field(radius: float = 0.6, center=(0.0, 0.0, 0.0)):
    center = torch.tensor(center, dtype=torch.float32)
    return lambda xyz: radius - (xyz - center).norm(dim=-1)  # positive inside


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_MESHES)
def test_load_and_normalize_real_meshes(name):
    mesh = load_mesh(real_mesh_path(name))
    assert len(mesh.faces) > 0 and np.isfinite(mesh.vertices).all()

    normalized, center, scale_factor = normalize_mesh(mesh)
    bounds = normalized.bounds
    np.testing.assert_allclose((bounds[0] + bounds[1]) / 2, 0.0, atol=1e-9)
    assert np.isclose((bounds[1] - bounds[0]).max(), 2 * 0.9999)
    restored = denormalize_mesh(normalized, center, scale_factor)
    np.testing.assert_allclose(restored.vertices, mesh.vertices, rtol=1e-9, atol=1e-9 * np.abs(mesh.vertices).max())


def test_load_from_bytes_with_sniffing_and_passthrough():
    data = real_mesh_path("nut.ply").read_bytes()
    from_bytes = load_mesh(data)  # type sniffed from the "ply" magic
    from_file = load_mesh(real_mesh_path("nut.ply"))
    np.testing.assert_allclose(from_bytes.vertices, from_file.vertices)
    assert load_mesh(from_file) is from_file


def test_glb_scene_is_merged_with_transforms():
    scene = trimesh.Scene()
    shifted = trimesh.transformations.translation_matrix((3, 0, 0))
    scene.add_geometry(trimesh.creation.box(extents=(1, 1, 1)), transform=shifted)
    scene.add_geometry(trimesh.creation.icosphere(subdivisions=1, radius=0.5))
    for source in (scene.export(file_type="glb"), scene):
        mesh = load_mesh(source, file_type="glb")
        assert len(mesh.faces) == 12 + 80
        np.testing.assert_allclose(mesh.bounds, [[-0.5, -0.5, -0.5], [3.5, 0.5, 0.5]], atol=1e-6)


PLY_HEADER = "ply\nformat ascii 1.0\nelement vertex {nv}\nproperty float x\nproperty float y\nproperty float z\n"


def ascii_ply(vertices: list[str], faces: list[str]) -> bytes:
    text = PLY_HEADER.format(nv=len(vertices))
    if faces:
        text += f"element face {len(faces)}\nproperty list uchar int vertex_indices\n"
    text += "end_header\n" + "\n".join(vertices + faces) + "\n"
    return text.encode()


@pytest.mark.parametrize(
    "data, file_type, message",
    [
        (b"", "ply", "empty"),
        (b"", None, "not a recognisable mesh"),
        (bytes(range(256)) * 8, None, "not a recognisable mesh"),
        (bytes(range(256)) * 8, "glb", "Could not parse"),
        (b"\x00garbage\xff" * 40, "ply", "Could not parse"),
        (ascii_ply(["0 0 0", "1 0 0", "0 1 0"], []), "ply", "no triangle mesh"),  # a point cloud
        (ascii_ply(["0 0 0", "nan 0 0", "0 1 0"], ["3 0 1 2"]), "ply", "NaN"),
        (ascii_ply(["0 0 0", "1 0 0", "0 1 0"], ["3 0 1 7"]), "ply", None),  # face index out of range
        (ascii_ply(["0 0 0", "1e15 0 0", "0 1 0"], ["3 0 1 2"]), "ply", "magnitude"),
        (b"v 0 0 0\nv 0 0 0\nv 0 0 0\nf 1 2 3\n", "obj", None),  # all faces degenerate
        (b"hello, I am a text file\n", "txt", "not a supported mesh format"),
    ],
)
def test_bad_meshes_raise_value_error(data, file_type, message):
    with pytest.raises(ValueError, match=message):
        load_mesh(data, file_type=file_type)


def test_bad_files_are_named_in_the_error(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a mesh")
    with pytest.raises(ValueError, match="notes.txt"):
        load_mesh(text_file)
    garbage = tmp_path / "broken.glb"
    garbage.write_bytes(b"\x13\x37" * 100)
    with pytest.raises(ValueError, match="broken.glb"):
        load_mesh(garbage)
    with pytest.raises(ValueError, match="does not exist"):
        load_mesh(tmp_path / "missing.obj")
    empty = trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="no vertices"):
        load_mesh(empty)


# ----------------------------------------------------------------------------------------------------------------
# Surface and occupancy sampling
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_MESHES)
def test_sample_surface_lies_on_surface(name):
    mesh, _, _ = normalize_mesh(load_mesh(real_mesh_path(name)))
    surface = sample_surface(mesh, num_points=256, num_sharp_points=64, seed=0)
    assert surface.shape == (320, 7) and surface.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(surface[:, 3:6], axis=1), 1.0, atol=1e-5)
    assert (surface[:256, 6] == 0).all()
    distance, face = closest_faces(mesh, surface[::4, :3].astype(np.float64))
    assert distance.max() < 1e-5

    # Uniform points carry the normal of the face they lie on.
    uniform = slice(0, 64)  # rows 0, 4, ..., 252 of the strided selection above are uniform points
    cosine = np.einsum("ij,ij->i", surface[::4][uniform, 3:6], mesh.face_normals[face[uniform]])
    assert (cosine > 0.999).mean() > 0.95  # points within float32 rounding of an edge may pick the neighbour

    again = sample_surface(mesh, num_points=256, num_sharp_points=64, seed=0)
    np.testing.assert_array_equal(surface, again)
    assert not np.array_equal(surface, sample_surface(mesh, num_points=256, num_sharp_points=64, seed=1))


def test_sharp_edge_samples_on_a_cube():
    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    edges = sharp_edges(cube)
    assert len(edges) == 12  # the face diagonals are flat and must not count
    surface = sample_surface(cube, num_points=64, num_sharp_points=200, seed=0)
    sharp = surface[64:]
    assert (sharp[:, 6] == 1).all()
    # A point on a cube edge has two coordinates at +-0.5.
    on_boundary = (np.abs(np.abs(sharp[:, :3]) - 0.5) < 1e-6).sum(axis=1)
    assert (on_boundary >= 2).all()
    np.testing.assert_allclose(np.linalg.norm(sharp[:, 3:6], axis=1), 1.0, atol=1e-5)

    smooth = trimesh.creation.icosphere(subdivisions=4)  # dihedral angles ~3.6 degrees: no sharp edges
    surface = sample_surface(smooth, num_points=16, num_sharp_points=16, seed=0)
    assert (surface[:, 6] == 0).all()


def test_winding_number_and_occupancy():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, size=(2000, 3)).astype(np.float32)
    radius = np.linalg.norm(points, axis=1)
    clear = np.abs(radius - 0.5) > 0.02  # away from the faceted surface
    w = winding_number(sphere, points)
    np.testing.assert_allclose(w[clear & (radius < 0.5)], 1.0, atol=1e-3)
    np.testing.assert_allclose(w[clear & (radius > 0.5)], 0.0, atol=1e-3)

    # An inward-facing copy and a copy with holes still give the right labels.
    inverted = sphere.copy()
    inverted.invert()
    truth = (radius < 0.5).astype(np.float32)
    np.testing.assert_array_equal(occupancy(inverted, points)[clear], truth[clear])
    holed = sphere.copy()
    holed.update_faces(np.arange(len(holed.faces)) % 37 != 0)  # drop ~3% of the faces
    assert not holed.is_watertight
    far = np.abs(radius - 0.5) > 0.1
    assert (occupancy(holed, points)[far] == truth[far]).mean() > 0.99


@pytest.mark.parametrize("name", ["airplane.ply", "nut.ply"])
def test_sample_sdf_points(name):
    mesh, _, _ = normalize_mesh(load_mesh(real_mesh_path(name)))
    points, labels = sample_sdf_points(mesh, num_near=1000, num_uniform=1000, seed=0)
    assert points.shape == (2000, 3) and labels.shape == (2000,)
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert np.abs(points).max() <= 1.05 + 1e-6
    assert 0.05 < labels[:1000].mean() < 0.95  # near-surface points straddle the surface
    again = sample_sdf_points(mesh, num_near=1000, num_uniform=1000, seed=0)
    np.testing.assert_array_equal(points, again[0])
    np.testing.assert_array_equal(labels, again[1])


def test_sample_sdf_points_seeds_a_share_on_sharp_edges():
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    points, labels = sample_sdf_points(box, num_near=400, num_uniform=0, seed=0, near_sigmas=(0.0,),
                                       sharp_fraction=0.25)
    # Without offsets a seed on an edge of the box has two coordinates on the box faces; area-uniform seeds only one.
    on_faces = (np.abs(np.abs(points) - np.array([0.5, 0.3, 0.2])) < 1e-5).sum(axis=1)
    assert (on_faces[300:] >= 2).all() and (on_faces[:300] >= 2).mean() < 0.05
    assert labels.shape == (400,)
    smooth = trimesh.creation.icosphere(subdivisions=3)  # no sharp edges: area-uniform seeds instead
    assert sample_sdf_points(smooth, num_near=100, num_uniform=10, seed=0, sharp_fraction=1.0)[0].shape == (110, 3)
    with pytest.raises(ValueError, match="sharp_fraction must be in"):
        sample_sdf_points(box, num_near=10, num_uniform=10, sharp_fraction=1.5)


@pytest.mark.parametrize("name", ["airplane.ply", "nut.ply"])
def test_signed_distance_matches_brute_force_on_real_meshes(name):
    mesh, _, _ = normalize_mesh(load_mesh(real_mesh_path(name)))
    points, labels = sample_sdf_points(mesh, num_near=300, num_uniform=300, seed=0)
    distance, direction = signed_distance(mesh, points, labels)
    exact, _ = closest_faces(mesh, points)
    error = np.abs(np.abs(distance) - exact)
    # Exact unless the closest face is not among the KD-tree candidates (documented bound: 8e-4, < 1% of points).
    assert (error > 1e-5).mean() < 0.01 and error.max() < 2e-3
    np.testing.assert_array_equal(distance > 0, labels > 0.5)  # inside-positive, signs from the labels
    np.testing.assert_array_equal(signed_distance(mesh, points)[0] > 0, labels > 0.5)  # ... or from occupancy
    np.testing.assert_allclose(np.linalg.norm(direction, axis=1), 1.0, atol=1e-5)
    closest, faces = closest_surface_points(mesh, points)
    np.testing.assert_allclose(points - np.abs(distance)[:, None] * direction, closest, atol=1e-5)
    assert faces.shape == (600,) and faces.max() < len(mesh.faces)
    with pytest.raises(ValueError, match=r"points must be \(Q, 3\)"):
        closest_surface_points(mesh, points[:, :2])


def test_signed_distance_of_a_box_is_analytic():
    half = np.array([0.5, 0.3, 0.2])
    box = trimesh.creation.box(extents=2 * half)
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.8, 0.8, size=(500, 3))
    outside = np.linalg.norm(np.maximum(np.abs(points) - half, 0.0), axis=1)
    expected = np.where(outside > 0, -outside, (half - np.abs(points)).min(axis=1))
    distance, direction = signed_distance(box, points)
    np.testing.assert_allclose(distance, expected, atol=1e-6)
    # On the surface the direction is the face normal.
    on_top = np.array([[0.1, 0.0, 0.2], [-0.2, 0.1, 0.2]])
    distance, direction = signed_distance(box, on_top, labels=np.ones(2))
    np.testing.assert_allclose(distance, 0.0, atol=1e-7)
    np.testing.assert_allclose(direction, [[0, 0, 1], [0, 0, 1]], atol=1e-6)


def test_sample_sdf_points_matches_analytic_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.7)
    points, labels = sample_sdf_points(sphere, num_near=500, num_uniform=1500, seed=3)
    radius = np.linalg.norm(points, axis=1)
    clear = np.abs(radius - 0.7) > 0.01
    np.testing.assert_array_equal(labels[clear], (radius[clear] < 0.7).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Volume decoding and marching cubes
# ----------------------------------------------------------------------------------------------------------------


def test_dense_grid_layout_matches_hunyuan():
    points = dense_grid_points(4, 1.01)
    assert points.shape == (125, 3)
    np.testing.assert_allclose(points[0], [-1.01, -1.01, -1.01], rtol=1e-6)
    np.testing.assert_allclose(points[1], [-1.01, -1.01, -0.505], rtol=1e-6)  # ij indexing: z fastest
    assert hierarchical_levels(384) == [96, 192, 384]
    assert hierarchical_levels(256) == [64, 128, 256]
    assert hierarchical_levels(100) == [100]


def test_marching_cubes_sphere_is_watertight_outward_and_right_size():
    radius = 0.6
    mesh = field_to_mesh(sphere_field(radius), resolution=48, method="dense")
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward-facing triangles
    # Every face normal points away from the centre.
    assert (np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center) > 0).all()
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=1), radius, atol=2e-3)
    assert abs(mesh.volume - 4 / 3 * math.pi * radius**3) / (4 / 3 * math.pi * radius**3) < 0.01

    # Hunyuan3D's vertex mapping divides by R + 1 and so shrinks the mesh by R / (R + 1) towards -bounds.
    quirk = marching_cubes(decode_volume_dense(sphere_field(radius), 48), hunyuan_vertex_scale=True)
    expected = (mesh.vertices + 1.01) * 48 / 49 - 1.01
    np.testing.assert_allclose(quirk.vertices, expected, atol=1e-6)  # skimage vertices are float32


@pytest.mark.parametrize(
    "field",
    [
        sphere_field(0.6),
        sphere_field(0.37, center=(0.2, -0.1, 0.05)),
        # Cut open by the box on five of its faces: active cells on the grid's first and last planes.
        sphere_field(0.8, center=(-1.0, -1.0, 1.0)),
        # A wavy ellipsoid pierced by a thin disc (0.06 thick, radius 0.9). The coarse 8^3 grid sees none of the
        # disc's rim; the closure follows the surface out along the disc at the finer levels.
        lambda p: torch.maximum(
            0.5 - ((p / torch.tensor([0.8, 0.5, 0.3])) ** 2).sum(-1).sqrt() + 0.05 * torch.sin(20 * p[:, 0]),
            torch.minimum(0.03 - (p[:, 2] - 0.2).abs(), 0.9 - p[:, :2].norm(dim=-1)),
        ),
    ],
)
def test_hierarchical_equals_dense_on_analytic_fields(field):
    dense = decode_volume_dense(field, 64)
    hierarchical = decode_volume_hierarchical(field, 64, min_resolution=8)
    assert hierarchical.num_queries < dense.num_queries / 3
    mesh_dense, mesh_hier = marching_cubes(dense), marching_cubes(hierarchical)
    assert len(mesh_dense.faces) > 0
    np.testing.assert_array_equal(mesh_dense.faces, mesh_hier.faces)
    np.testing.assert_array_equal(mesh_dense.vertices, mesh_hier.vertices)
    # Wherever the hierarchical decoder did evaluate, its values are the dense ones, bit for bit.
    np.testing.assert_array_equal(dense.values[hierarchical.evaluated], hierarchical.values[hierarchical.evaluated])


def test_index_bookkeeping_of_the_hierarchical_decoder_matches_brute_force():
    n = 6
    marks = np.zeros(n**3, dtype=bool)
    rng = np.random.default_rng(0)
    sets = [rng.integers(0, n**3, size) for size in (0, 1, 40, 300)]
    np.testing.assert_array_equal(_collect(marks, sets), np.unique(np.concatenate(sets)))
    assert not marks.any()  # left all-False for the next use

    # Cells touching points, with points on every face, edge and corner of the grid (where flat offsets borrow).
    points = np.unique(np.concatenate([rng.integers(0, n**3, 60), [0, n - 1, n * n - 1, n**3 - n * n, n**3 - 1]]))
    expected = set()
    for i, j, k in zip(*np.unravel_index(points, (n, n, n))):
        for ci in (i - 1, i):
            for cj in (j - 1, j):
                for ck in (k - 1, k):
                    if 0 <= min(ci, cj, ck) and max(ci, cj, ck) < n - 1:
                        expected.add((ci * n + cj) * n + ck)
    found = _cells_touching(marks, points, _corner_offsets(n), n)
    np.testing.assert_array_equal(found, sorted(expected))
    assert not marks.any()


def test_a_grid_larger_than_the_memory_is_refused_before_the_field_is_called():
    calls = []

    def field(xyz):
        calls.append(len(xyz))
        return sphere_field()(xyz)

    # 10,000 cells per axis: about 9 TB for the hierarchical grid, more than any machine running these tests has.
    assert grid_memory_bytes(10_000) > 9e12 and grid_memory_bytes(10_000, "dense") > grid_memory_bytes(10_000)
    for method in ("hierarchical", "dense"):
        with pytest.raises(ValueError, match=f"octree resolution 10000 needs about .* GiB .*{method}"):
            field_to_mesh(field, resolution=10_000, method=method)
    assert calls == []
    field_to_mesh(field, resolution=16)  # an ordinary size passes the check
    assert calls


def test_cgroup_memory_limit_caps_the_available_memory(tmp_path):
    # Layouts of the kernel's cgroup files, written into a tmp folder standing in for /sys/fs/cgroup.
    v2, v1, unlimited, empty = (tmp_path / name for name in ("v2", "v1", "unlimited", "empty"))
    v2.mkdir()
    (v2 / "memory.max").write_text("1073741824\n")  # 1 GiB
    (v2 / "memory.current").write_text("268435456\n")  # 256 MiB used
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("536870912\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("134217728\n")
    unlimited.mkdir()
    (unlimited / "memory.max").write_text("max\n")
    (unlimited / "memory.current").write_text("268435456\n")
    empty.mkdir()
    assert cgroup_available_memory(v2) == 768 * 2**20
    assert cgroup_available_memory(v1) == 384 * 2**20
    assert cgroup_available_memory(unlimited) is None
    assert cgroup_available_memory(empty) is None
    # Reclaimable page cache (inactive file pages) is not counted as used.
    (v2 / "memory.stat").write_text("anon 100\nfile 300000000\ninactive_file 134217728\nactive_file 5\n")
    assert cgroup_available_memory(v2) == 896 * 2**20
    (v1 / "memory" / "memory.stat").write_text("cache 9\ntotal_inactive_file 67108864\n")
    assert cgroup_available_memory(v1) == 448 * 2**20
    (v2 / "memory.stat").write_text("inactive_file 999999999999\n")  # never below zero used, never above the limit
    assert cgroup_available_memory(v2) == 2**30
    psutil = pytest.importorskip("psutil")
    system = psutil.virtual_memory().available
    assert available_memory_bytes(v2) == min(system, 2**30)
    assert available_memory_bytes(empty) is not None and abs(available_memory_bytes(empty) - system) < 2**30


def test_band_catches_parts_the_coarse_grid_cannot_see():
    # A blob of radius 0.05 centred between coarse (16^3) grid points: every coarse value near it is < 0, so sign
    # changes alone never refine there; a band of 0.1 around the level does.
    center = -1.01 + 13.5 * 2.02 / 16
    field = lambda p: torch.maximum(sphere_field(0.5)(p), sphere_field(0.05, center=(center,) * 3)(p))  # noqa: E731
    dense = marching_cubes(decode_volume_dense(field, 64))
    assert len(dense.split(only_watertight=False)) == 2
    no_band = marching_cubes(decode_volume_hierarchical(field, 64, min_resolution=16))
    assert len(no_band.split(only_watertight=False)) == 1  # the documented limitation
    with_band = marching_cubes(decode_volume_hierarchical(field, 64, min_resolution=16, band=0.1))
    np.testing.assert_array_equal(dense.faces, with_band.faces)
    np.testing.assert_array_equal(dense.vertices, with_band.vertices)


def test_empty_field_gives_empty_mesh():
    mesh = field_to_mesh(lambda p: -torch.ones(len(p)), resolution=16)
    assert len(mesh.faces) == 0


def test_remove_floaters_and_simplify():
    big, small = sphere_field(0.6), sphere_field(0.08, center=(0.85, 0.85, 0.85))

    def field(p):
        return torch.maximum(big(p), small(p))

    mesh = field_to_mesh(field, resolution=48, method="dense")
    assert len(mesh.split(only_watertight=False)) == 2
    cleaned = field_to_mesh(field, resolution=48, method="hierarchical", remove_floaters=0.05)
    assert len(cleaned.split(only_watertight=False)) == 1
    assert np.linalg.norm(cleaned.vertices, axis=1).max() < 0.61

    unchanged = remove_floaters(mesh, 0.0)
    assert len(unchanged.faces) == len(mesh.faces)

    try:
        import fast_simplification  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="fast-simplification"):
            simplify_mesh(mesh, 500)
    else:
        simplified = simplify_mesh(mesh, 500)
        assert len(simplified.faces) <= 550
    assert simplify_mesh(mesh, 10**9) is mesh
