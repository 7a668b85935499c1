# Copyright 2026 The CG-MLLM Authors. Apache-2.0.
"""p-FID and p-KID: Fréchet and kernel distances between PointNet++ features of two sets of point clouds.

The protocol is Point-E's (openai/point-e, `point_e/evals/feature_extractor.py`, `fid_is.py`,
`scripts/evaluate_pfid.py`), which the 3D generation papers (CG-MLLM, TRELLIS, SAR3D, ...) report as p-FID:

1. Each set is a float array `[num_clouds, num_points, 3]` of raw xyz (Point-E's npz `arr_0`); `num_points >= 512`.
2. The clouds go through the classifier in batches of 64, in order. Each batch is normalised per cloud (centroid to
   the origin, farthest point at radius 1) in the array's own dtype, then cast to float32.
3. In eval mode farthest point sampling starts cloud r of a batch at point index r, so cloud i starts at `i % 64`:
   the same cloud at another position gets (slightly) different features. We reproduce it; `batch_size` sets the
   period, and the model runs in chunks of `chunk_size` clouds with the same start indices (memory only).
4. Features are `bn2(fc2(.))`, 256 * width_mult = 512 columns for Point-E's checkpoint.
5. p-FID = `|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrtm(S_a S_b)` on the feature means and covariances
   (`np.cov`, rowvar=False), with Point-E's handling of a singular product and of imaginary parts.
6. p-KID (not in Point-E; the definition of torchmetrics' `KernelInceptionDistance`): the unbiased MMD^2 with the
   kernel `(x.y / d + 1)^3`, averaged over `kid_subsets` random subsets of `kid_subset_size` features of each set.
   It is returned as is; papers often print it x100 or x1000.

PointNet++ is not rotation invariant: both sets must share the up axis and facing convention.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from ..mesh_utils import load_mesh, sample_uniform_surface, single_threaded_torch
from .modeling_pointnet2 import PointNet2ClassifierSSG


#: Point-E's `device_batch_size`: the period of the FPS start index (cloud i starts at i % 64).
POINT_E_BATCH_SIZE = 64
#: Surface points per mesh, as Point-E's upsampled clouds and the follow-up papers' p-FID scripts use.
DEFAULT_NUM_POINTS = 4096
#: The first set-abstraction level samples 512 centres.
MIN_POINTS = 512
#: The tiny world's PointNet++ (Point-E's layout), shipped next to the tiny-world pipeline.
TINY_WORLD_POINTNET = "checkpoints/tiny-world-pointnet/pointnet.pt"


def tiny_world_pointnet_path() -> Path | None:
    """The shipped tiny-world PointNet++ checkpoint (`cgmllm/checkpoints/...` in a wheel, or the repository's
    `checkpoints/...`), or None."""
    import cgmllm

    here = Path(cgmllm.__file__).resolve().parent
    for root in (here, here.parent):
        if (root / TINY_WORLD_POINTNET).is_file():
            return root / TINY_WORLD_POINTNET
    return None


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def validate_point_clouds(clouds, name: str = "clouds") -> np.ndarray:
    """Returns `clouds` as a floating numpy array `[num_clouds, num_points, 3]`, or raises `ValueError` saying what is
    wrong: not 3-D with 3 columns, no clouds, fewer than 512 points, NaN / inf, or a cloud whose points all coincide
    (it cannot be normalised)."""
    if isinstance(clouds, torch.Tensor):
        clouds = clouds.detach().cpu().numpy()
    clouds = np.asarray(clouds)
    if clouds.ndim != 3 or clouds.shape[-1] != 3:
        raise ValueError(f"{name} must be an array [num_clouds, num_points, 3] of xyz, got shape {clouds.shape}.")
    if not np.issubdtype(clouds.dtype, np.floating):
        raise ValueError(f"{name} must be a float array of xyz coordinates, got dtype {clouds.dtype}.")
    if clouds.shape[0] == 0:
        raise ValueError(f"{name} holds no point clouds (shape {clouds.shape}).")
    if clouds.shape[1] < MIN_POINTS:
        raise ValueError(f"{name} has {clouds.shape[1]} points per cloud; PointNet++ samples {MIN_POINTS} centres, "
                         f"so at least {MIN_POINTS} are needed (Point-E and the papers use {DEFAULT_NUM_POINTS}).")
    finite = np.isfinite(clouds).all(axis=(1, 2))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{name} has NaN or infinite coordinates in {len(bad)} cloud(s), e.g. index {bad[:5].tolist()}.")
    extent = (clouds.max(axis=1) - clouds.min(axis=1)).max(axis=-1)
    if (extent <= 0).any():
        bad = np.flatnonzero(extent <= 0)
        raise ValueError(f"{name} has {len(bad)} cloud(s) whose points all coincide, e.g. index {bad[:5].tolist()}; "
                         "they cannot be normalised to the unit ball.")
    return clouds


def normalize_point_clouds(clouds: np.ndarray) -> np.ndarray:
    """Point-E's normalisation of `[B, N, 3]`: subtract each cloud's centroid, divide by its largest point norm.
    Computed in the array's dtype (Point-E normalises the npz array as stored, then casts to float32)."""
    centred = clouds - clouds.mean(axis=1, keepdims=True)
    radius = np.sqrt((centred**2).sum(axis=-1, keepdims=True)).max(axis=1, keepdims=True)
    return centred / radius


def sample_point_clouds(meshes: Sequence, num_points: int = DEFAULT_NUM_POINTS, seed: int = 0,
                        progress: bool = False, desc: str = "sampling") -> np.ndarray:
    """Area-uniform surface samples of each mesh: float32 `[len(meshes), num_points, 3]`.

    `meshes` are paths, bytes or `trimesh` objects (loaded by `cgmllm.mesh_utils.load_mesh`). Every mesh is sampled
    with its own generator seeded with `seed`, so a mesh's cloud does not depend on the other meshes or their order.
    float32 is the dtype of Point-E's sample clouds, which its normalisation then runs in.
    """
    from tqdm.auto import tqdm

    clouds = np.empty((len(meshes), num_points, 3), dtype=np.float32)
    for i, mesh in enumerate(tqdm(meshes, desc=desc, disable=not progress)):
        points, _ = sample_uniform_surface(load_mesh(mesh), num_points, seed=seed)
        clouds[i] = points
    return clouds


# ----------------------------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------------------------


def load_pointnet(checkpoint_path: str | os.PathLike, trust_checkpoint: bool = False) -> PointNet2ClassifierSSG:
    """Loads a PointNet++ classifier saved in Point-E's layout (`{"model_state_dict": state_dict, ...}`, the format
    of Point-E's `pointnet.pt`; other keys of the file are ignored), in eval mode.

    The class count and width multiplier are read from the tensor shapes (Point-E's file: 40 classes, width 2).
    The file is unpickled with `torch.load(weights_only=True)`; a file that needs arbitrary code to unpickle is
    refused unless `trust_checkpoint=True`.

    Raises:
        ValueError: a missing file, a file torch cannot read, no `model_state_dict`, or a state dict whose keys or
            shapes are not Point-E's PointNet++ SSG.
    """
    path = os.fspath(checkpoint_path)
    if not os.path.isfile(path):
        raise ValueError(f"PointNet++ checkpoint {path}: no such file (Point-E's is `pointnet.pt`).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as error:
        hint = ("" if trust_checkpoint else " If the file is from a source you trust and holds pickled objects "
                "besides tensors, pass trust_checkpoint=True (--trust-checkpoint).")
        raise ValueError(f"PointNet++ checkpoint {path}: torch.load failed ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}).{hint}") from error
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"PointNet++ checkpoint {path}: expected Point-E's layout, a dict with a 'model_state_dict' "
                         f"entry; found {found}.")
    state_dict = checkpoint["model_state_dict"]
    if not isinstance(state_dict, dict) or "sa1.mlp_convs.0.weight" not in state_dict or "fc3.weight" not in state_dict:
        keys = sorted(state_dict)[:6] if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"PointNet++ checkpoint {path}: 'model_state_dict' is not Point-E's PointNet++ SSG "
                         f"(no 'sa1.mlp_convs.0.weight' / 'fc3.weight'); first keys: {keys}.")
    width, remainder = divmod(int(state_dict["sa1.mlp_convs.0.weight"].shape[0]), 64)
    num_classes = int(state_dict["fc3.weight"].shape[0])
    if remainder or width < 1:
        raise ValueError(f"PointNet++ checkpoint {path}: sa1.mlp_convs.0 has {width * 64 + remainder} output "
                         "channels, not a multiple of 64 (Point-E's width multiplier 2 gives 128).")
    model = PointNet2ClassifierSSG(num_classes=num_classes, width_mult=width)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"PointNet++ checkpoint {path} does not match Point-E's PointNet++ SSG layout "
                         f"(num_class={num_classes}, width_mult={width}): missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}.")
    model.load_state_dict(state_dict)
    return model.float().eval().requires_grad_(False)


@torch.no_grad()
def pointnet_features(model: PointNet2ClassifierSSG, clouds, batch_size: int = POINT_E_BATCH_SIZE,
                      chunk_size: int = 8, progress: bool = False, desc: str = "PointNet++ features"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Features `[M, model.feature_dim]` and class probabilities `[M, num_classes]` (float32) of raw clouds
    `[M, N, 3]`, computed as Point-E's `PointNetClassifier.features_and_preds`: batches of `batch_size` in order,
    normalised per batch, FPS of cloud i starting at point `i % batch_size`.

    `chunk_size` only bounds memory (the ball query holds `[chunk, 512, N]` distances); it does not change the result.
    """
    clouds = validate_point_clouds(clouds)
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}.")
    if model.training:
        raise ValueError("pointnet_features needs the model in eval mode (model.eval()): BatchNorm and dropout "
                         "would otherwise depend on the batch and the FPS start would be random.")
    features, probabilities = [], []
    for xyz, fps_start in point_e_batches(model, clouds, batch_size, chunk_size, progress, desc):
        log_probs, chunk_features = model(xyz, fps_start=fps_start)
        features.append(chunk_features.cpu().numpy())
        probabilities.append(log_probs.exp().cpu().numpy())
    return np.concatenate(features), np.concatenate(probabilities)


def point_e_batches(model: PointNet2ClassifierSSG, clouds: np.ndarray, batch_size: int = POINT_E_BATCH_SIZE,
                    chunk_size: int = 8, progress: bool = False, desc: str = "PointNet++"):
    """Yields `(xyz [C, 3, N], fps_start [C])` on the model's device for consecutive chunks of `clouds [M, N, 3]`
    (validated raw xyz), as Point-E feeds its classifier: each cloud normalised, cloud i's FPS starting at point
    `i % batch_size`. Runs single-threaded on a CPU: FPS is a loop of small ops, and one thread avoids a thread
    barrier per op (see `single_threaded_torch`)."""
    device = next(model.parameters()).device
    with single_threaded_torch(device.type == "cpu"):
        for start in _progress(range(0, len(clouds), chunk_size), progress, desc):
            chunk = normalize_point_clouds(clouds[start : start + chunk_size])
            xyz = torch.from_numpy(np.ascontiguousarray(chunk)).to(device=device, dtype=torch.float32).transpose(1, 2)
            yield xyz, torch.arange(start, start + len(chunk), device=device) % batch_size


def _progress(iterable, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled)


# ----------------------------------------------------------------------------------------------------------------
# Distances between feature sets
# ----------------------------------------------------------------------------------------------------------------


def _features(features, name: str, min_count: int) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [num_samples, feature_dim], got shape {features.shape}.")
    if len(features) < min_count:
        raise ValueError(f"{name} has {len(features)} samples; at least {min_count} are needed.")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return features


def frechet_distance(features_a, features_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `[A, D]`, `[B, D]`, as Point-E's
    `FIDStatistics.frechet_distance`: if `sqrtm(S_a S_b)` is not finite, `eps * I` is added to both covariances;
    an imaginary part larger than 1e-3 on the diagonal is an error, a smaller one is dropped."""
    a, b = _features(features_a, "features_a", 2), _features(features_b, "features_b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}.")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a, sigma_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are expected with few samples
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
        if not np.isfinite(covmean).all():
            warnings.warn(f"p-FID: singular covariance product; adding {eps} to the diagonals (as Point-E does).")
            offset = np.eye(len(sigma_a)) * eps
            covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"p-FID: sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}; the "
                             "feature covariances are too ill-conditioned (too few samples?).")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def kernel_distance(features_a, features_b, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                    gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel (inception) distance, torchmetrics' `KernelInceptionDistance` definition, on feature arrays:
    the unbiased MMD^2 with the kernel `(gamma x.y + coef)^degree` (gamma = 1 / D by default) on `subsets` pairs of
    random subsets of `subset_size` rows (drawn without replacement from each set with a generator seeded by
    `seed`). Returns `(mean, std)` over the subsets (std unbiased; 0 for one subset). Computed in float64."""
    from torchmetrics.image.kid import poly_mmd

    a, b = _features(features_a, "features_a", 2), _features(features_b, "features_b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}.")
    if subsets < 1:
        raise ValueError(f"KID needs at least one subset, got subsets={subsets}.")
    if subset_size < 2 or subset_size > min(len(a), len(b)):
        raise ValueError(f"KID subset size {subset_size} must be in [2, {min(len(a), len(b))}] (the smaller set has "
                         f"{min(len(a), len(b))} samples: {len(a)} vs {len(b)}); pass a smaller kid_subset_size "
                         "(--kid-subset-size) or evaluate more shapes.")
    a, b = torch.from_numpy(a), torch.from_numpy(b)
    generator = torch.Generator().manual_seed(seed)
    values = torch.stack([
        poly_mmd(a[torch.randperm(len(a), generator=generator)[:subset_size]],
                 b[torch.randperm(len(b), generator=generator)[:subset_size]], degree=degree, gamma=gamma, coef=coef)
        for _ in range(subsets)
    ])
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------------


def compute_pfid_pkid(checkpoint_path: str | os.PathLike | None, clouds_a, clouds_b, *,
                      model: PointNet2ClassifierSSG | None = None, batch_size: int = POINT_E_BATCH_SIZE,
                      chunk_size: int = 8, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                      trust_checkpoint: bool = False, progress: bool = False) -> dict:
    """p-FID and p-KID between two sets of point clouds, as Point-E computes p-FID (see the module docstring).

    Args:
        checkpoint_path: a PointNet++ checkpoint in Point-E's layout (Point-E's `pointnet.pt`, or the tiny world's);
            ignored when `model` is given.
        clouds_a, clouds_b: float arrays `[num_clouds, num_points, 3]` of raw xyz, `num_points >= 512`
            (e.g. generated and reference shapes, `sample_point_clouds(meshes)`).
        batch_size: Point-E's batch of 64, which fixes each cloud's FPS start (`i % batch_size`).
        kid_subsets, kid_subset_size: torchmetrics' defaults (100 x 1000); both sets need >= kid_subset_size clouds.
        seed: the KID subset draw.

    Returns:
        `{"p_fid": float, "p_kid": float, "p_kid_std": float, "features_a": [A, D], "features_b": [B, D]}` with
        D = 512 for Point-E's checkpoint; p_kid is the raw MMD^2 (not x100).
    """
    clouds_a = validate_point_clouds(clouds_a, "clouds_a")
    clouds_b = validate_point_clouds(clouds_b, "clouds_b")
    # Checked before the (slow) features: both sets must be large enough for the KID subsets and a covariance.
    smallest = min(len(clouds_a), len(clouds_b))
    if smallest < max(2, kid_subset_size):
        raise ValueError(f"p-KID subset size {kid_subset_size} needs at least that many clouds in each set, and p-FID "
                         f"needs at least 2; got {len(clouds_a)} and {len(clouds_b)}. Pass a smaller "
                         "kid_subset_size (--kid-subset-size) or evaluate more shapes.")
    if model is None:
        if checkpoint_path is None:
            raise ValueError("compute_pfid_pkid needs checkpoint_path (Point-E's pointnet.pt) or a model.")
        model = load_pointnet(checkpoint_path, trust_checkpoint=trust_checkpoint)
    features_a, _ = pointnet_features(model, clouds_a, batch_size, chunk_size, progress, "features of set A")
    features_b, _ = pointnet_features(model, clouds_b, batch_size, chunk_size, progress, "features of set B")
    p_kid, p_kid_std = kernel_distance(features_a, features_b, kid_subsets, kid_subset_size, seed=seed)
    return {"p_fid": frechet_distance(features_a, features_b), "p_kid": p_kid, "p_kid_std": p_kid_std,
            "features_a": features_a, "features_b": features_b}
