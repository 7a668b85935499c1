"""Smoke test of the one-command tiny-world recipe: data set -> ShapeVAE -> latent cache -> stages -> pipeline ->
PointNet++ (p-FID classifier)."""

import json

import pytest
import torch
import yaml

from cgmllm import cli
from cgmllm.evaluation import load_pointnet
from cgmllm.pipelines import CGMLLMPipeline
from cgmllm.training.tiny_world import FAMILY_NAMES
from cgmllm.training.tiny_world import recipe as tiny_world_recipe
from cgmllm.training.cli import load_config


def test_shipped_config_is_valid(tmp_path):
    config = load_config(tiny_world_recipe.DEFAULT_CONFIG, [f"data.path={tmp_path}"])
    assert [stage.num_shape_tokens for stage in config["stages"]] == [16, 16, 32, 64]
    assert config["model"]["tiny"]["num_shape_tokens"] == 64
    assert config["model"]["tiny"]["shape_latent_channels"] == 16  # also the recipe's ShapeVAE latent channels


SMOKE_CONFIG = {
    "seed": 0,
    "model": {"tiny": {"vocab_size": 300, "num_shape_tokens": 8, "shape_latent_channels": 8}},
    "data": {"path": "unused"},
    "training": {"per_device_train_batch_size": 2, "logging_steps": 1, "save_strategy": "no", "use_cpu": True},
    "stages": [
        {"name": "align", "kind": "alignment", "num_shape_tokens": 4, "condition_dropout": 0.9,
         "learning_rate": 1.0e-3, "max_steps": 1},
        {"name": "progressive", "kind": "progressive", "num_shape_tokens": [4, 8],
         "condition_dropout": [0.5, 0.1], "learning_rate": [1.0e-3, 5.0e-4], "max_steps": 1},
    ],
}
SMOKE_ARGS = ["--num-train", "6", "--num-heldout", "2", "--vae-steps", "2", "--vae-width", "32", "--vae-batch-size",
              "2", "--num-near", "64", "--num-uniform", "64", "--queries-per-step", "32", "--num-workers", "0",
              "--pointnet-num-train", "8", "--pointnet-num-heldout", "2", "--pointnet-steps", "1",
              "--pointnet-batch-size", "4", "--pointnet-head-steps", "2", "--pointnet-width-mult", "1"]


def _smoke_config(tmp_path):
    config_path = tmp_path / "smoke.yaml"
    config_path.write_text(yaml.safe_dump(SMOKE_CONFIG))
    return config_path


def test_recipe_smoke(tmp_path):
    config_path = _smoke_config(tmp_path)
    out = tmp_path / "run"
    summary = tiny_world_recipe.main([
        "--out", str(out), "--config", str(config_path), *SMOKE_ARGS, "--embed-dim", "4", "--vae-stretch", "1.5",
        "--vae-rotate", "0.25",
    ])
    assert set(summary["timings"]) == {"dataset", "vae", "latents", "stages", "save", "pointnet"}
    assert [s["num_shape_tokens"] for s in summary["stages"]] == [4, 4, 8]
    assert json.loads((out / "summary.json").read_text())["pipeline_mb"] > 0
    # The VAE augmentation flags reach train_vae (recorded in its metrics).
    assert json.loads((out / "vae_run" / "metrics.json").read_text())["augment"] == {"stretch": 1.5, "rotate": 0.25}
    card = (out / "pipeline" / "README.md").read_text()
    assert "stretches up to 1.5x, random rotations of 25% of the training samples" in card
    # The p-FID classifier phase: Point-E's layout, read by the evaluation's loader, with its accuracy and card.
    pointnet = load_pointnet(out / "pointnet" / "pointnet.pt")
    assert (pointnet.num_classes, pointnet.width_mult) == (len(FAMILY_NAMES), 1)
    assert summary["pointnet"]["num_heldout"] == 2 and 0 <= summary["pointnet"]["heldout_accuracy"] <= 1
    assert "held-out family accuracy (2 shapes" in (out / "pointnet" / "README.md").read_text()

    pipe = CGMLLMPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    # --embed-dim sets both the VAE's latent channels and the model's (the config said 8).
    assert pipe.vae.config.embed_dim == pipe.model.config.shape_latent_channels == 4
    latents = pipe("a shape", num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).latents
    assert latents.shape == (1, 8, 4) and torch.isfinite(latents).all()
    mesh_file = next((out / "data" / "test" / "meshes").iterdir())
    assert cli.main(["caption", str(mesh_file), "--model", str(out / "pipeline"), "--max-new-tokens", "3"]) == 0


def test_recipe_resumes_to_the_uninterrupted_pipeline(tmp_path):
    from safetensors.torch import load_file

    config_path = _smoke_config(tmp_path)
    args = ["--config", str(config_path), *SMOKE_ARGS, "--vae-steps", "4", "--vae-save-every", "1"]
    tiny_world_recipe.main(["--out", str(tmp_path / "straight"), *args])

    out = tmp_path / "sittings"
    stopped = tiny_world_recipe.main(["--out", str(out), *args, "--vae-stop-after", "2"])
    assert stopped == {"stopped": "vae", "stopped_at": 2, "steps": 4}
    assert json.loads((out / "recipe_state.json").read_text())["done"] == ["dataset"]
    with pytest.raises(ValueError, match="pass --resume"):  # never silently restarted or overwritten
        tiny_world_recipe.main(["--out", str(out), *args])
    with pytest.raises(ValueError, match="other arguments .*vae_lr"):
        tiny_world_recipe.main(["--out", str(out), *args, "--resume", "--vae-lr", "1e-2"])
    summary = tiny_world_recipe.main(["--out", str(out), *args, "--resume"])
    assert [s["num_shape_tokens"] for s in summary["stages"]] == [4, 4, 8]
    assert json.loads((out / "recipe_state.json").read_text())["done"] == [
        "dataset", "vae", "latents", "stages", "save", "pointnet"]

    straight_pointnet = torch.load(tmp_path / "straight" / "pointnet" / "pointnet.pt", weights_only=True)
    for name, value in straight_pointnet["model_state_dict"].items():  # seeded: the same classifier in sittings
        torch.testing.assert_close(
            torch.load(out / "pointnet" / "pointnet.pt", weights_only=True)["model_state_dict"][name], value,
            rtol=0, atol=0, msg=f"pointnet: {name}")
    for weights in ("vae/diffusion_pytorch_model.safetensors", "model/model.safetensors"):
        straight = load_file(tmp_path / "straight" / "pipeline" / weights)
        resumed = load_file(out / "pipeline" / weights)
        assert straight.keys() == resumed.keys()
        for name, value in straight.items():
            torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=f"{weights}: {name}")

    # Resuming a finished run redoes nothing but the (cheap) save.
    pointnet_written = (out / "pointnet" / "pointnet.pt").stat().st_mtime_ns
    again = tiny_world_recipe.main(["--out", str(out), *args, "--resume"])
    assert again["stages"] == summary["stages"] and again["pointnet"] == summary["pointnet"]
    assert (out / "pointnet" / "pointnet.pt").stat().st_mtime_ns == pointnet_written
