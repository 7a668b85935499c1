"""Smoke test of `cgmllm.training.train_vae`: a tiny ShapeVAE trained for a few steps on a tiny tiny world."""

import json

import numpy as np
import pytest
import torch
import trimesh

from conftest import real_mesh_path

from cgmllm.modeling_shape_vae import ShapeVAE
from cgmllm.training import train_vae
from cgmllm.training.tiny_world import build_tiny_world_dataset


ARGS = ["--steps", "4", "--batch-size", "4", "--num-latents", "16", "--min-latents", "8", "--width", "32",
        "--num-near", "256", "--num-uniform", "256", "--queries-per-step", "128", "--log-every", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_world")
    build_tiny_world_dataset(folder, num_train=8, num_heldout=3, render_images=False, num_workers=0)
    return folder


def test_train_vae_smoke(world, tmp_path):
    out = tmp_path / "vae_run"
    metrics = train_vae.main(["--data", str(world), "--out", str(out), *ARGS])
    assert metrics["num_train"] == 8 and metrics["num_heldout"] == 3
    for split in ("train", "heldout"):
        assert 0.0 <= metrics[split]["iou"] <= 1.0 and np.isfinite(metrics[split]["recon_loss"])
    assert metrics["timings"]["step_s"] > 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    cache = np.load(out / "cache_train.npz")
    assert cache["surface"].shape == (8, 16 * 8, 7) and cache["points"].shape == (8, 512, 3)
    assert set(np.unique(cache["labels"])) <= {0.0, 1.0} and cache["labels"].mean() > 0.01  # some points are inside

    # The saved VAE reloads and encodes a mesh the way the pipeline does (half sharp-edge points).
    vae = ShapeVAE.from_pretrained(out / "vae")
    assert vae.config.pc_size + vae.config.pc_sharpedge_size == 16 * 8
    latents = vae.encode(torch.from_numpy(cache["surface"][:2]), num_latents=8).mode()
    assert latents.shape == (2, 8, 8) and torch.isfinite(latents).all()


def test_train_vae_on_signed_distances(world, tmp_path):
    out = tmp_path / "sdf_run"
    metrics = train_vae.main(["--data", str(world), "--out", str(out), *ARGS, "--labels", "sdf",
                              "--sdf-truncation", "0.1", "--stretch", "2"])
    assert metrics["labels"] == "sdf" and np.isfinite(metrics["heldout"]["recon_loss"])
    cache = np.load(out / "cache_train.npz")
    assert cache["distances"].shape == (8, 512) and cache["directions"].shape == (8, 512, 3)
    np.testing.assert_array_equal(cache["distances"] > 0, cache["labels"] > 0.5)
    # The occupancy cache of the other run is not reused for distances (the key differs).
    plain = train_vae.precompute_samples(train_vae.find_meshes(world, "train"), out / "cache_train.npz", 128, 256, 256)
    assert "distances" not in plain


def test_cache_is_reused_and_invalidated(world, tmp_path):
    files = train_vae.find_meshes(world, "train")[:3]
    cache = tmp_path / "cache.npz"
    first = train_vae.precompute_samples(files, cache, 32, 64, 64, seed=0)
    mtime = cache.stat().st_mtime_ns
    again = train_vae.precompute_samples(files, cache, 32, 64, 64, seed=0)
    assert cache.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first["labels"], again["labels"])
    other = train_vae.precompute_samples(files, cache, 32, 64, 32, seed=0)  # other sizes: recomputed
    assert other["points"].shape == (3, 96, 3)
    sharp = train_vae.precompute_samples(files, cache, 32, 64, 32, seed=0, sharp_fraction=0.5)  # other queries
    assert sharp["points"].shape == (3, 96, 3) and not np.array_equal(sharp["points"], other["points"])


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="No meshes found"):
        train_vae.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--steps", "1"])


@pytest.mark.parametrize("rotate", [0.0, 1.0])
def test_augmentation_keeps_occupancy_and_the_cube(rotate):
    # A real mesh (not made here), sampled as the VAE cache does. The augmented samples must be the samples of one
    # affine map of the mesh (per-axis stretch, then a rotation if asked, then re-normalisation): cached labels =
    # occupancy of the mapped mesh, normals mapped by the inverse transpose, the surface fitted to the VAE cube again.
    from cgmllm.mesh_utils import load_mesh, normalize_mesh, occupancy, sample_sdf_points, sample_surface

    mesh = normalize_mesh(load_mesh(real_mesh_path("nut.ply")))[0]
    surface = sample_surface(mesh, 256, 256, seed=0)[None].astype(np.float32)
    points, labels = sample_sdf_points(mesh, num_near=256, num_uniform=256, seed=1)
    points = points[None].astype(np.float32)

    same = train_vae.augment_samples(surface, points, np.random.default_rng(0), 1.0, 0.0)
    assert same[0] is surface and same[1] is points
    with pytest.raises(ValueError, match="max_stretch must be >= 1"):
        train_vae.augment_samples(surface, points, np.random.default_rng(0), 0.5)
    with pytest.raises(ValueError, match="rotate is a probability"):
        train_vae.augment_samples(surface, points, np.random.default_rng(0), 2.0, 1.5)

    new_surface, new_points = train_vae.augment_samples(surface, points, np.random.default_rng(3), 3.0, rotate)
    xyz = new_surface[0, :, :3]
    extent = xyz.max(0) - xyz.min(0)
    assert np.isclose(extent.max(), 2 * 0.9999, atol=1e-4) and np.allclose(xyz.max(0) + xyz.min(0), 0, atol=1e-4)

    # Recover the affine map x' = A x + b from the surface points.
    homogeneous = np.c_[surface[0, :, :3], np.ones(len(xyz))]
    solution = np.linalg.lstsq(homogeneous, xyz, rcond=None)[0]  # (4, 3): x' = x @ A^T + b
    assert np.allclose(homogeneous @ solution, xyz, atol=1e-4)
    linear, shift = solution[:3].T, solution[3]
    # A = c R diag(s): A^T A = c^2 diag(s)^2 is diagonal with unequal entries (the axes were stretched differently);
    # A itself is diagonal exactly when no rotation was applied.
    gram = linear.T @ linear
    assert np.allclose(gram, np.diag(np.diag(gram)), atol=1e-4) and np.ptp(np.sqrt(np.diag(gram))) > 0.05
    assert np.allclose(linear, np.diag(np.diag(linear)), atol=1e-4) == (rotate == 0.0)
    np.testing.assert_allclose(np.c_[points[0], np.ones(len(points[0]))] @ solution, new_points[0], atol=1e-4)

    mapped = mesh.copy()
    mapped.vertices = np.asarray(mesh.vertices) @ linear.T + shift
    np.testing.assert_array_equal(occupancy(mapped, new_points[0]) > 0.5, labels > 0.5)
    expected_normals = surface[0, :, 3:6] @ np.linalg.inv(linear)  # n' ~ A^-T n
    expected_normals /= np.linalg.norm(expected_normals, axis=-1, keepdims=True)
    np.testing.assert_allclose(new_surface[0, :, 3:6], expected_normals, atol=1e-4)
    np.testing.assert_array_equal(new_surface[0, :, 6], surface[0, :, 6])


@pytest.mark.parametrize("rotate", [0.0, 1.0])
def test_augmentation_maps_signed_distances(rotate):
    # A stretched and rotated box is a box: inside it every closest point lies on a planar face, where the mapped
    # distance d / |A^-T u| * f is exact. Compare with the distances of the mapped mesh, computed from scratch.
    from cgmllm.mesh_utils import sample_sdf_points, sample_surface, signed_distance

    box = trimesh.creation.box(extents=(1.2, 0.8, 0.5))
    surface = sample_surface(box, 128, 128, seed=0)[None].astype(np.float32)
    points, labels = sample_sdf_points(box, num_near=200, num_uniform=200, seed=1)
    distances, directions = signed_distance(box, points, labels)
    with pytest.raises(ValueError, match="both distances and directions"):
        train_vae.augment_samples(surface, points[None], np.random.default_rng(0), 2.0, distances=distances[None])
    unchanged = train_vae.augment_samples(surface, points[None], np.random.default_rng(0), 1.0,
                                          distances=distances[None], directions=directions[None])
    assert unchanged[2] is not None and np.array_equal(unchanged[2][0], distances)

    new_surface, new_points, new_distances = train_vae.augment_samples(
        surface, points[None].astype(np.float32), np.random.default_rng(5), 2.5, rotate,
        distances=distances[None], directions=directions[None])
    homogeneous = np.c_[surface[0, :, :3], np.ones(surface.shape[1])]
    solution = np.linalg.lstsq(homogeneous, new_surface[0, :, :3], rcond=None)[0]  # x' = x @ A^T + b
    mapped = box.copy()
    mapped.vertices = np.asarray(box.vertices) @ solution[:3] + solution[3]
    truth, _ = signed_distance(mapped, new_points[0], labels)
    np.testing.assert_array_equal(new_distances[0] > 0, distances > 0)
    # Inside, the mapped value is the distance to the image of the original closest face: exact where that face is
    # still the closest one, an overestimate where the stretch brought another face closer.
    inside = labels > 0.5
    mapped_normals = _unit(_closest_face_normals(box, points) @ np.linalg.inv(solution[:3].T))  # n' ~ A^-T n
    same_side = np.einsum("qi,qi->q", mapped_normals, _closest_face_normals(mapped, new_points[0])) > 1 - 1e-6
    exact = inside & same_side
    assert exact.sum() > 0.5 * inside.sum()
    np.testing.assert_allclose(new_distances[0][exact], truth[exact], atol=1e-5)
    assert (new_distances[0][inside] >= truth[inside] - 1e-5).all()
    # Outside, the closest point may be an edge or corner: first order only, but never far off.
    assert np.abs(new_distances[0] - truth).max() < 0.5 * np.abs(truth).max()


def _unit(vectors):
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _closest_face_normals(mesh, points):
    from cgmllm.mesh_utils import closest_surface_points

    return np.asarray(mesh.face_normals)[closest_surface_points(mesh, points)[1]]


def test_random_rotations_are_rotations():
    rotations = train_vae.random_rotations(2000, np.random.default_rng(0))
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (2000, 3, 3)),
                               atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-6)
    # Uniform on SO(3): every column is uniform on the sphere, so each entry has mean 0 and variance 1/3.
    np.testing.assert_allclose(rotations.mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose(rotations.var(0), 1 / 3, atol=0.04)


def test_train_vae_resumes_to_the_uninterrupted_weights(world, tmp_path):
    args = ["--data", str(world), *ARGS, "--steps", "6", "--stretch", "1.5", "--rotate", "0.5", "--save-every", "2"]
    straight = train_vae.main([*args, "--out", str(tmp_path / "straight")])
    assert not (tmp_path / "straight" / "checkpoint").exists()  # a finished run keeps only the VAE and metrics

    sittings = tmp_path / "sittings"
    assert train_vae.main([*args, "--out", str(sittings), "--stop-after", "3"]) == {"stopped_at": 3, "steps": 6}
    assert (sittings / "checkpoint" / "state.pt").is_file() and not (sittings / "vae").exists()
    with pytest.raises(ValueError, match="pass --resume"):  # a fresh run never silently restarts over a checkpoint
        train_vae.main([*args, "--out", str(sittings)])
    with pytest.raises(ValueError, match=r"--lr 0.001 \(now 0.002\)"):
        train_vae.main([*args, "--out", str(sittings), "--resume", "--lr", "2e-3"])
    assert train_vae.main([*args, "--out", str(sittings), "--resume", "--stop-after", "2"])["stopped_at"] == 5
    resumed = train_vae.main([*args, "--out", str(sittings), "--resume"])

    for name, value in ShapeVAE.from_pretrained(tmp_path / "straight" / "vae").state_dict().items():
        torch.testing.assert_close(ShapeVAE.from_pretrained(sittings / "vae").state_dict()[name], value, rtol=0, atol=0)
    assert resumed["history"] == straight["history"] and resumed["heldout"] == straight["heldout"]


def test_a_checkpoint_from_before_an_argument_existed_resumes_at_its_default(world, tmp_path):
    """A run started by an older `train_vae` has no entry for arguments added since (e.g. `--device`, `--compile`):
    they count as their defaults, which is what the older command did; set to anything else, the resume is refused."""
    args = ["--data", str(world), *ARGS, "--out", str(tmp_path / "run"), "--steps", "4"]
    train_vae.main([*args, "--stop-after", "2"])
    path = tmp_path / "run" / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=False)
    for name in ("device", "compile"):
        del state["run_key"][name]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"--compile False \(now True\)"):
        train_vae.main([*args, "--resume", "--compile"])
    assert train_vae.main([*args, "--resume", "--stop-after", "1"])["stopped_at"] == 3


def test_train_vae_uses_the_checkpoint_left_by_a_kill_between_renames(world, tmp_path):
    args = ["--data", str(world), *ARGS, "--out", str(tmp_path / "run")]
    train_vae.main([*args, "--stop-after", "2"])
    (tmp_path / "run" / "checkpoint").rename(tmp_path / "run" / "checkpoint.old")  # the state save_training_state
    assert train_vae.main([*args, "--resume", "--stop-after", "1"])["stopped_at"] == 3  # leaves mid-rename
    assert sorted(path.name for path in (tmp_path / "run").glob("checkpoint*")) == ["checkpoint"]


def test_device_cpu_is_the_default(world, tmp_path):
    default = train_vae.main(["--data", str(world), "--out", str(tmp_path / "default"), *ARGS])
    explicit = train_vae.main(["--data", str(world), "--out", str(tmp_path / "cpu"), *ARGS, "--device", "cpu"])
    assert default["device"] == explicit["device"] and default["device"].startswith("cpu")
    expected = ShapeVAE.from_pretrained(tmp_path / "default" / "vae").state_dict()
    for name, value in ShapeVAE.from_pretrained(tmp_path / "cpu" / "vae").state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    assert explicit["history"] == default["history"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is available")
def test_missing_gpu_is_a_clear_error_before_any_work(world, tmp_path):
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available here"):
        train_vae.main(["--data", str(world), "--out", str(tmp_path / "run"), *ARGS, "--device", "cuda"])
    assert not (tmp_path / "run").exists()  # refused before the precomputation
    with pytest.raises(ValueError, match="cpu, cuda or mps, not meta"):
        train_vae.main(["--data", str(world), "--out", str(tmp_path / "run"), *ARGS, "--device", "meta"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_vae_on_cuda_resumes_and_matches_the_cpu_run(world, tmp_path):
    args = ["--data", str(world), *ARGS, "--save-every", "2"]
    cpu = train_vae.main([*args, "--out", str(tmp_path / "cpu")])
    assert train_vae.main([*args, "--out", str(tmp_path / "gpu"), "--device", "cuda", "--stop-after", "2"])[
        "stopped_at"] == 2
    gpu = train_vae.main([*args, "--out", str(tmp_path / "gpu"), "--device", "cuda", "--resume"])
    assert gpu["device"].startswith("cuda")
    # The same samples and random streams: the losses agree with the CPU run up to the GPU's arithmetic.
    for a, b in zip(cpu["history"], gpu["history"]):
        assert a["step"] == b["step"] and a["recon_loss"] == pytest.approx(b["recon_loss"], rel=1e-3, abs=1e-4)
