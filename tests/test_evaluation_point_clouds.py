"""p-FID / p-KID: Point-E's PointNet++ layout, normalisation, batch-position FPS, FID / KID against hand computations."""

import numpy as np
import pytest
import torch
import trimesh

from cgmllm.evaluation import (
    PointNet2ClassifierSSG,
    compute_pfid_pkid,
    frechet_distance,
    kernel_distance,
    load_pointnet,
    normalize_point_clouds,
    pointnet_features,
    sample_point_clouds,
)
from cgmllm.evaluation.modeling_pointnet2 import ball_query, farthest_point_sample


def point_e_state_dict(num_class=40, width_mult=2, seed=0):
    """A random state dict with exactly the key names and shapes of Point-E's
    `get_model(num_class=40, normal_channel=False, width_mult=2).state_dict()` (written out by hand, not taken from
    our module): 3 set-abstraction levels of 3 (Conv2d, BatchNorm2d) pairs, fc1/bn1, fc2/bn2, fc3."""
    generator = torch.Generator().manual_seed(seed)
    w = width_mult
    levels = {"sa1": [3, 64 * w, 64 * w, 128 * w], "sa2": [128 * w + 3, 128 * w, 128 * w, 256 * w],
              "sa3": [256 * w + 3, 256 * w, 512 * w, 1024 * w]}
    state = {}

    def batch_norm(prefix, channels):
        state[f"{prefix}.weight"] = 1 + 0.1 * torch.rand(channels, generator=generator)
        state[f"{prefix}.bias"] = 0.1 * torch.randn(channels, generator=generator)
        state[f"{prefix}.running_mean"] = 0.1 * torch.randn(channels, generator=generator)
        state[f"{prefix}.running_var"] = 0.5 + torch.rand(channels, generator=generator)
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)

    for level, channels in levels.items():
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            state[f"{level}.mlp_convs.{i}.weight"] = torch.randn(c_out, c_in, 1, 1, generator=generator) / c_in**0.5
            state[f"{level}.mlp_convs.{i}.bias"] = 0.1 * torch.randn(c_out, generator=generator)
            batch_norm(f"{level}.mlp_bns.{i}", c_out)
    for name, (c_in, c_out) in {"fc1": (1024 * w, 512 * w), "fc2": (512 * w, 256 * w), "fc3": (256 * w, num_class)}.items():
        state[f"{name}.weight"] = torch.randn(c_out, c_in, generator=generator) / c_in**0.5
        state[f"{name}.bias"] = 0.1 * torch.randn(c_out, generator=generator)
    batch_norm("bn1", 512 * w)
    batch_norm("bn2", 256 * w)
    return state


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """Point-E's layout at width 1 and 10 classes (fast), as the tiny world's checkpoint is saved."""
    path = tmp_path_factory.mktemp("pointnet") / "pointnet.pt"
    torch.save({"model_state_dict": point_e_state_dict(num_class=10, width_mult=1), "epoch": 3}, path)
    return path


def random_clouds(count, num_points=512, seed=0):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, size=(count, 1, 3))
    return (rng.normal(size=(count, num_points, 3)) * scale + rng.normal(size=(count, 1, 3))).astype(np.float32)


def test_point_e_checkpoint_loads_with_its_key_names(tmp_path):
    state = point_e_state_dict()
    assert len(state) == 79  # Point-E's pointnet.pt state dict
    path = tmp_path / "pointnet.pt"
    torch.save({"model_state_dict": state, "optimizer_state_dict": {"lr": 1e-3}, "epoch": 200}, path)
    model = load_pointnet(path)
    assert (model.num_classes, model.width_mult, model.feature_dim) == (40, 2, 512)
    assert sum(p.numel() for p in model.parameters()) == 5_859_496
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key], state[key].float()) for key in state if key.endswith("weight"))
    assert not model.training
    features, probabilities = pointnet_features(model, random_clouds(2), chunk_size=2)
    assert features.shape == (2, 512) and probabilities.shape == (2, 40)  # 512-d, not the stale 256
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_pointnet(tmp_path / "missing.pt")
    torch.save(point_e_state_dict(width_mult=1), tmp_path / "bare.pt")  # a state dict without the container
    with pytest.raises(ValueError, match="model_state_dict"):
        load_pointnet(tmp_path / "bare.pt")
    torch.save({"model_state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not Point-E's PointNet"):
        load_pointnet(tmp_path / "other.pt")
    state = point_e_state_dict(width_mult=1)
    del state["sa2.mlp_bns.1.running_var"]
    state["head.weight"] = torch.zeros(1)
    torch.save({"model_state_dict": state}, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"missing \['sa2.mlp_bns.1.running_var'\], unexpected \['head.weight'\]"):
        load_pointnet(tmp_path / "renamed.pt")
    state = point_e_state_dict(width_mult=1)
    state["fc2.weight"] = torch.zeros(256, 64)
    torch.save({"model_state_dict": state}, tmp_path / "shapes.pt")
    with pytest.raises(ValueError, match="wrong shapes"):
        load_pointnet(tmp_path / "shapes.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="torch.load failed"):
        load_pointnet(tmp_path / "text.pt")
    # Arbitrary pickled objects are refused by the safe loader unless the user trusts the file.
    torch.save({"model_state_dict": point_e_state_dict(width_mult=1), "args": trimesh.creation.box()},
               tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="trust_checkpoint=True"):
        load_pointnet(tmp_path / "pickled.pt")
    assert load_pointnet(tmp_path / "pickled.pt", trust_checkpoint=True).width_mult == 1


def test_normalisation_is_point_e_s():
    clouds = random_clouds(3)
    normalised = normalize_point_clouds(clouds)
    np.testing.assert_allclose(normalised.mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=-1).max(axis=1), 1, rtol=1e-6)
    assert normalised.dtype == np.float32  # computed in the input dtype, as Point-E normalises its npz arrays
    # Scale and translation do not change the features.
    model = load_pointnet_small()
    a, _ = pointnet_features(model, clouds[:2])
    b, _ = pointnet_features(model, clouds[:2] * 3.0 + 5.0)
    np.testing.assert_allclose(a, b, atol=2e-4)


def load_pointnet_small(seed=0):
    torch.manual_seed(seed)
    model = PointNet2ClassifierSSG(num_classes=10, width_mult=1)
    model.load_state_dict(point_e_state_dict(num_class=10, width_mult=1, seed=seed))
    return model.eval()


def test_bad_clouds_are_refused(small_checkpoint):
    good = random_clouds(4)
    with pytest.raises(ValueError, match=r"\[num_clouds, num_points, 3\]"):
        compute_pfid_pkid(small_checkpoint, good[..., :2], good, kid_subset_size=2)
    with pytest.raises(ValueError, match="at least 512"):
        compute_pfid_pkid(small_checkpoint, good[:, :100], good, kid_subset_size=2)
    bad = good.copy()
    bad[2, 7, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite coordinates in 1 cloud\(s\), e.g. index \[2\]"):
        compute_pfid_pkid(small_checkpoint, good, bad, kid_subset_size=2)
    with pytest.raises(ValueError, match="float array"):
        compute_pfid_pkid(small_checkpoint, good.astype(np.int64), good, kid_subset_size=2)
    flat = good.copy()
    flat[1] = 1.0
    with pytest.raises(ValueError, match="all coincide"):
        compute_pfid_pkid(small_checkpoint, flat, good, kid_subset_size=2)
    with pytest.raises(ValueError, match="subset size 1000 needs at least that many clouds"):
        compute_pfid_pkid(small_checkpoint, good, good)


def brute_force_fps(points, count, start):
    chosen = [start]
    for _ in range(count - 1):
        distance = ((points[:, None, :] - points[None, chosen, :]) ** 2).sum(-1).min(axis=1)
        chosen.append(int(np.argmax(distance)))
    return chosen


def test_sampling_and_grouping_match_their_definitions():
    points = torch.from_numpy(random_clouds(2, 600)[..., :3]).double()
    selected = farthest_point_sample(points, 40, torch.tensor([0, 5]))
    assert selected[0].tolist() == brute_force_fps(points[0].numpy(), 40, 0)
    assert selected[1].tolist() == brute_force_fps(points[1].numpy(), 40, 5)
    centres = points[:, :7]
    groups = ball_query(0.8, 16, points, centres)
    for b in range(2):
        for s in range(7):
            inside = np.flatnonzero(((points[b] - centres[b, s]) ** 2).sum(-1).numpy() <= 0.64)[:16]
            expected = list(inside) + [inside[0]] * (16 - len(inside))  # padded with the first member
            assert groups[b, s].tolist() == expected


def test_features_depend_on_batch_position_as_in_point_e():
    model = load_pointnet_small()
    clouds = random_clouds(6)
    features, _ = pointnet_features(model, clouds, batch_size=64, chunk_size=6)
    # Chunking is memory only: the same FPS starts (i % 64) give the same features (to float32 rounding: a matmul over
    # 4 clouds may block its sums differently from one over 6, as this machine's BLAS did by 3e-7).
    chunked, _ = pointnet_features(model, clouds, batch_size=64, chunk_size=4)
    np.testing.assert_allclose(features, chunked, rtol=1e-5, atol=1e-6)
    # Cloud 3 alone starts its FPS at point 0, inside the batch at point 3: its centres and features differ.
    xyz = torch.from_numpy(normalize_point_clouds(clouds[3:4]))
    assert farthest_point_sample(xyz, 512, torch.tensor([0]))[0, 0] == 0
    assert farthest_point_sample(xyz, 512, torch.tensor([3]))[0, 0] == 3
    alone, _ = pointnet_features(model, clouds[3:4])
    assert not np.array_equal(alone[0], features[3])
    # ... and equal what the model gives for that cloud with the FPS started at index 3.
    with torch.no_grad():
        xyz = torch.from_numpy(normalize_point_clouds(clouds[3:4])).transpose(1, 2)
        _, at_three = model(xyz, fps_start=torch.tensor([3]))
    np.testing.assert_allclose(at_three.numpy()[0], features[3], rtol=1e-5, atol=1e-5)
    # The period is the batch size: with batches of 3, cloud 3 starts at 0 like a cloud on its own.
    period_three, _ = pointnet_features(model, clouds, batch_size=3)
    np.testing.assert_allclose(period_three[3], alone[0], rtol=1e-5, atol=1e-5)
    # Deterministic: the same call twice gives the same bits.
    np.testing.assert_array_equal(pointnet_features(model, clouds, chunk_size=6)[0], features)


def test_fid_of_two_gaussians_with_known_statistics():
    rng = np.random.default_rng(0)
    n, d = 400, 6
    # Orthonormal combinations of centred columns: zero mean and sample covariance exactly I after the scaling.
    centred = rng.normal(size=(n, d))
    basis = np.linalg.qr(centred - centred.mean(axis=0))[0] * np.sqrt(n - 1)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    var_a, var_b = rng.uniform(0.5, 2, size=d), rng.uniform(0.5, 2, size=d)
    a, b = mu_a + basis * np.sqrt(var_a), mu_b + basis[::-1] * np.sqrt(var_b)
    np.testing.assert_allclose(np.cov(a, rowvar=False), np.diag(var_a), atol=1e-9)
    # Diagonal covariances commute: FID = |mu_a - mu_b|^2 + sum(var_a + var_b - 2 sqrt(var_a var_b)).
    expected = ((mu_a - mu_b) ** 2).sum() + (var_a + var_b - 2 * np.sqrt(var_a * var_b)).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(a, b[:, :3])


def brute_force_mmd(x, y):
    """Unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3, by explicit loops."""
    d, m = x.shape[1], len(x)

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.5
    mean, std = kernel_distance(x, y, subsets=4, subset_size=5)
    assert mean == pytest.approx(brute_force_mmd(x, y), rel=1e-10)  # every subset is the whole set
    assert std == pytest.approx(0.0, abs=1e-12)
    # Subsets smaller than the sets: the average of the MMD of each drawn subset pair (torchmetrics' procedure).
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(9, 3))
    generator = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(5):
        ia, ib = torch.randperm(7, generator=generator)[:4].numpy(), torch.randperm(9, generator=generator)[:4].numpy()
        expected.append(brute_force_mmd(x[ia], y[ib]))
    mean, std = kernel_distance(x, y, subsets=5, subset_size=4, seed=3)
    assert mean == pytest.approx(np.mean(expected), rel=1e-10)
    assert std == pytest.approx(np.std(expected, ddof=1), rel=1e-8)
    with pytest.raises(ValueError, match=r"subset size 8 must be in \[2, 7\]"):
        kernel_distance(x, y, subset_size=8)


def test_compute_pfid_pkid_end_to_end(small_checkpoint):
    clouds_a, clouds_b = random_clouds(4, seed=1), random_clouds(5, seed=2)
    result = compute_pfid_pkid(small_checkpoint, clouds_a, clouds_b, kid_subsets=3, kid_subset_size=4)
    assert set(result) >= {"p_fid", "p_kid", "features_a", "features_b"}
    assert result["features_a"].shape == (4, 256) and result["features_b"].shape == (5, 256)  # width 1: 256-d
    assert result["p_fid"] == pytest.approx(frechet_distance(result["features_a"], result["features_b"]))
    assert result["p_kid"] == pytest.approx(kernel_distance(result["features_a"], result["features_b"], 3, 4)[0])
    again = compute_pfid_pkid(small_checkpoint, clouds_a, clouds_b, kid_subsets=3, kid_subset_size=4)
    assert again["p_fid"] == result["p_fid"] and again["p_kid"] == result["p_kid"]
    same = compute_pfid_pkid(small_checkpoint, clouds_a, clouds_a, kid_subsets=1, kid_subset_size=4)
    assert abs(same["p_fid"]) < 1e-3 * result["p_fid"]


def test_sample_point_clouds_is_uniform_and_seeded():
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    clouds = sample_point_clouds([box, box], num_points=1000, seed=7)
    assert clouds.shape == (2, 1000, 3) and clouds.dtype == np.float32
    np.testing.assert_array_equal(clouds[0], clouds[1])  # each mesh has its own generator
    on_face = np.isclose(np.abs(clouds[0]), [1.0, 0.5, 0.25], atol=1e-5).any(axis=1)
    assert on_face.all()
    # Area-uniform: the two 2 x 1 faces hold 2 / 3.5 of the area.
    assert abs(np.isclose(np.abs(clouds[0, :, 2]), 0.25, atol=1e-5).mean() - 2 / 3.5) < 0.05
    assert not np.array_equal(sample_point_clouds([box], 1000, seed=8)[0], clouds[0])
