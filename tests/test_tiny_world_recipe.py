"""Smoke test of the one-command tiny-world recipe: data set -> ShapeVAE -> latent cache -> stages -> pipeline ->
PointNet++ (p-FID classifier)."""

import json

import pytest
import torch
import yaml

from cgmllm import cli
from cgmllm.evaluation import load_pointnet
from cgmllm.pipelines import CGMLLMPipeline
from cgmllm.training import train_vae
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
        "--vae-rotate", "0.25", "--vae-steps", "4", "--batch-scale", "2",
    ])
    assert set(summary["timings"]) == {"dataset", "vae", "latents", "stages", "save", "pointnet"}
    assert [s["num_shape_tokens"] for s in summary["stages"]] == [4, 4, 8]
    assert summary["device"].startswith("cpu") and summary["batch_scale"] == 2 and summary["compile"] is False
    # --batch-scale 2: twice the batch for half the steps in every phase (the ShapeVAE's 4 steps at batch 2 are 2
    # at batch 4; each stage's 1 step at batch 2 stays 1 step, rounded up, at batch 4).
    vae_metrics = json.loads((out / "vae_run" / "metrics.json").read_text())
    assert vae_metrics["steps"] == 2 and vae_metrics["device"].startswith("cpu")
    for stage in ("align", "progressive-4", "progressive-8"):
        state = json.loads((out / "stages" / stage / "final" / "trainer_state.json").read_text())
        assert (state["train_batch_size"], state["global_step"]) == (4, 1), stage
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


def test_batch_scale_keeps_the_samples_of_every_stage(tmp_path):
    config = load_config(tiny_world_recipe.DEFAULT_CONFIG, [f"data.path={tmp_path}"])
    samples = [(stage.per_device_train_batch_size or 16) * stage.max_steps for stage in config["stages"]]
    scaled = tiny_world_recipe.scale_batches(config, 4)
    assert [stage.per_device_train_batch_size for stage in scaled["stages"]] == [64] * 4
    assert [stage.max_steps for stage in scaled["stages"]] == [625, 750, 1000, 1750]  # 2500 / 3000 / 4000 / 7000 / 4
    assert [64 * stage.max_steps for stage in scaled["stages"]] == samples
    with pytest.raises(ValueError, match="whole number >= 1"):
        tiny_world_recipe.scale_batches(config, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is available")
def test_recipe_on_a_missing_gpu_is_a_clear_error_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available here.*--device cpu"):
        tiny_world_recipe.main(["--out", str(out), "--config", str(_smoke_config(tmp_path)), *SMOKE_ARGS,
                                "--device", "cuda"])
    assert not out.exists()
    with pytest.raises(ValueError, match="not a device torch knows"):
        tiny_world_recipe.main(["--out", str(out), *SMOKE_ARGS, "--device", "gpu"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_recipe_on_cuda(tmp_path):
    out = tmp_path / "run"
    summary = tiny_world_recipe.main(["--out", str(out), "--config", str(_smoke_config(tmp_path)), *SMOKE_ARGS,
                                      "--device", "cuda", "--batch-scale", "2"])
    assert summary["device"].startswith("cuda") and "cuda" in (out / "pipeline" / "README.md").read_text()
    pipe = CGMLLMPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a shape", num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).latents
    assert torch.isfinite(latents).all()


def test_device_compile_and_batch_scale_reach_both_trainings(tmp_path):
    # What `--device cuda --compile --batch-scale 2` hands to train_vae and to cgmllm-train (no GPU needed to check).
    args = tiny_world_recipe.build_parser().parse_args([
        "--out", str(tmp_path), "--device", "cuda", "--compile", "--batch-scale", "2", "--vae-steps", "9",
        "--seed", "3", "--set", "training.torch_compile=false"])
    overrides = tiny_world_recipe.stage_overrides(args, tmp_path)
    assert {"training.use_cpu=false", "training.torch_compile=true", "seed=3"} <= set(overrides)
    assert overrides[-1] == "training.torch_compile=false"  # the user's --set comes last and wins
    config = load_config(tiny_world_recipe.DEFAULT_CONFIG, overrides)
    assert config["training"]["use_cpu"] is False and config["seed"] == 3
    vae_args = train_vae.build_parser().parse_args(
        tiny_world_recipe.vae_arguments(args, tmp_path / "data", tmp_path / "vae_run", [16, 32, 64], 16))
    assert (vae_args.device, vae_args.compile, vae_args.seed) == ("cuda", True, 3)
    assert (vae_args.steps, vae_args.batch_size, vae_args.warmup) == (5, 32, 25)  # 9 / 2 rounded up, 16 x 2, 50 / 2
    default = tiny_world_recipe.build_parser().parse_args(["--out", str(tmp_path)])
    assert "training.use_cpu=true" in tiny_world_recipe.stage_overrides(default, tmp_path)
    vae_default = train_vae.build_parser().parse_args(
        tiny_world_recipe.vae_arguments(default, tmp_path / "data", tmp_path / "vae_run", [16, 32, 64], 16))
    assert (vae_default.device, vae_default.compile) == ("cpu", False)
    assert (vae_default.steps, vae_default.batch_size, vae_default.warmup) == (8000, 16, 50)
