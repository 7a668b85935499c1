"""Smoke test of the one-command tiny-world recipe: data set -> ShapeVAE -> latent cache -> stages -> pipeline."""

import json

import torch
import yaml

from cgmllm import cli
from cgmllm.pipelines import CGMLLMPipeline
from cgmllm.training.tiny_world import recipe as tiny_world_recipe
from cgmllm.training.cli import load_config


def test_shipped_config_is_valid(tmp_path):
    config = load_config(tiny_world_recipe.DEFAULT_CONFIG, [f"data.path={tmp_path}"])
    assert [stage.num_shape_tokens for stage in config["stages"]] == [16, 16, 32, 64]
    assert config["model"]["tiny"]["num_shape_tokens"] == 64
    assert config["model"]["tiny"]["shape_latent_channels"] == 16  # also the recipe's ShapeVAE latent channels


def test_recipe_smoke(tmp_path):
    config = {
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
    config_path = tmp_path / "smoke.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    summary = tiny_world_recipe.main([
        "--out", str(out), "--config", str(config_path), "--num-train", "6", "--num-heldout", "2",
        "--vae-steps", "2", "--vae-width", "32", "--vae-batch-size", "2", "--num-near", "64", "--num-uniform", "64",
        "--queries-per-step", "32", "--num-workers", "0", "--embed-dim", "4", "--vae-stretch", "1.5",
        "--vae-rotate", "0.25",
    ])
    assert set(summary["timings"]) == {"dataset", "vae", "latents", "stages", "save"}
    assert [s["num_shape_tokens"] for s in summary["stages"]] == [4, 4, 8]
    assert json.loads((out / "summary.json").read_text())["pipeline_mb"] > 0
    # The VAE augmentation flags reach train_vae (recorded in its metrics).
    assert json.loads((out / "vae_run" / "metrics.json").read_text())["augment"] == {"stretch": 1.5, "rotate": 0.25}
    card = (out / "pipeline" / "README.md").read_text()
    assert "stretches up to 1.5x, random rotations of 25% of the training samples" in card

    pipe = CGMLLMPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    # --embed-dim sets both the VAE's latent channels and the model's (the config said 8).
    assert pipe.vae.config.embed_dim == pipe.model.config.shape_latent_channels == 4
    latents = pipe("a shape", num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).latents
    assert latents.shape == (1, 8, 4) and torch.isfinite(latents).all()
    mesh_file = next((out / "data" / "test" / "meshes").iterdir())
    assert cli.main(["caption", str(mesh_file), "--model", str(out / "pipeline"), "--max-new-tokens", "3"]) == 0
