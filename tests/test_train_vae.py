"""Smoke test of `cgmllm.training.train_vae`: a tiny ShapeVAE trained for a few steps on a tiny tiny world."""

import json

import numpy as np
import pytest
import torch

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


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="No meshes found"):
        train_vae.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--steps", "1"])
