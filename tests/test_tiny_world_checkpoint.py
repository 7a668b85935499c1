"""The shipped tiny-world checkpoint (`checkpoints/tiny-world`, the CLI's default model) really generates and
captions, from text, meshes and rendered views: a floor on held-out prompts with fixed seeds (the full measurement is
`benchmarks/eval_tiny_world.py`)."""

import pytest
import torch

from cgmllm.cli import default_model_dir


@pytest.fixture(scope="module")
def pipe():
    from cgmllm import CGMLLMPipeline

    folder = default_model_dir()
    assert folder is not None, "the tiny-world checkpoint must be shipped in checkpoints/tiny-world"
    pipe = CGMLLMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def rows():
    from cgmllm.training.tiny_world.evaluation import heldout_rows, single_shape_rows

    # 20 held-out prompts: fresh samples (new dimensions, poses and seeds) of attribute combinations seen in
    # training. Unseen combinations are much harder for this tiny model; the benchmark reports them separately.
    return single_shape_rows(heldout_rows(), 20, "seen")


def test_shipped_checkpoint_is_small_and_loads_with_remote_code_layout():
    folder = default_model_dir()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"checkpoint is {size / 2**20:.1f} MB"
    for name in ("model_index.json", "README.md", "model/config.json", "model/model.safetensors",
                 "vae/config.json", "scheduler/scheduler_config.json", "processor/tokenizer.json"):
        assert (folder / name).is_file(), name


def test_text_to_shape_family_accuracy_floor(pipe, rows):
    from cgmllm.training.tiny_world.evaluation import text_to_shape

    torch.set_num_threads(2)
    result = text_to_shape(pipe, rows, num_inference_steps=25, guidance_scale=4.0, octree_resolution=64, seed=0,
                           batch_size=20)
    wrong = [(p["caption"], p["predicted"]) for p in result["predictions"] if p["predicted"] != p["family"]]
    assert result["family_accuracy"] >= 0.7, wrong
    assert result["proportion_accuracy"] >= 0.6


def test_mesh_caption_names_the_family(pipe, rows):
    from cgmllm.training.tiny_world.evaluation import shape_to_caption

    result = shape_to_caption(pipe, rows[::2], max_new_tokens=24)
    assert result["family_word_accuracy"] >= 0.7, result["captions"]


def test_image_caption_and_image_to_shape(pipe, rows):
    # The views are rendered as the data set renders them (128 px, one camera): image tasks are trained in the recipe.
    from cgmllm.training.tiny_world.evaluation import image_to_caption, render_view, text_to_shape

    torch.set_num_threads(2)
    views = [dict(row, image=render_view(row)) for row in rows[::2]]
    captions = image_to_caption(pipe, views, max_new_tokens=24)
    assert captions["family_word_accuracy"] >= 0.6, captions["captions"]
    result = text_to_shape(pipe, views, num_inference_steps=25, guidance_scale=4.0, octree_resolution=64,
                           seed=0, batch_size=10, condition="image")
    assert result["family_accuracy"] >= 0.5, result["predictions"]


def test_vae_round_trip_keeps_the_shapes(pipe, rows):
    from cgmllm.training.tiny_world.evaluation import vae_reconstruction

    result = vae_reconstruction(pipe, rows[:6], octree_resolution=64)
    assert result["count"] == 6
    assert result["iou"] >= 0.6 and result["chamfer"] < 0.2, result
    assert result["family_accuracy"] >= 0.5, result


def test_benchmark_round_trip_rows_per_subset(capsys):
    # `eval_tiny_world.py --vae FOLDER` prints only the ShapeVAE rows, the round trip split into novel and seen rows
    # (the cap of text -> 3D on each). Here FOLDER is the shipped VAE itself.
    import importlib.util

    from cgmllm.cli import default_model_dir

    path = default_model_dir().parents[1] / "benchmarks" / "eval_tiny_world.py"
    assert path.is_file(), f"{path} is part of the repository"
    spec = importlib.util.spec_from_file_location("eval_tiny_world", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.main(["--vae", str(default_model_dir() / "vae"), "--num", "4", "--threads", "2"]) == 0
    rows = dict(line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()
                if line.startswith("| ") and not line.startswith("| metric"))
    percent = {name: float(value.rstrip("%")) for name, value in rows.items() if "round-trip" in name}
    assert set(percent) == {"ShapeVAE round-trip family accuracy, all",
                            "ShapeVAE round-trip family accuracy, novel combinations (2)",
                            "ShapeVAE round-trip family accuracy, seen combinations (2)"}, rows
    assert not any("text->3D" in name for name in rows)
    novel, seen = (percent[f"ShapeVAE round-trip family accuracy, {name} combinations (2)"]
                   for name in ("novel", "seen"))
    assert percent["ShapeVAE round-trip family accuracy, all"] == pytest.approx((novel + seen) / 2, abs=1)
    assert rows["ShapeVAE latent rows of the round trip"] == "64"  # the pipeline's largest N by default


def test_benchmark_round_trip_at_fewer_latent_rows(pipe, capsys):
    # `--vae-latents N`: the round trip (the cap of generation) at a smaller N, as the latent-rows ablation trains.
    import importlib.util

    from cgmllm.cli import default_model_dir
    from cgmllm.training.tiny_world.evaluation import heldout_rows, single_shape_rows, vae_reconstruction

    spec = importlib.util.spec_from_file_location(
        "eval_tiny_world", default_model_dir().parents[1] / "benchmarks" / "eval_tiny_world.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    vae = str(default_model_dir() / "vae")
    assert benchmark.main(["--vae", vae, "--vae-latents", "16", "--num", "2", "--threads", "2"]) == 0
    printed = dict(line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()
                   if line.startswith("| ") and not line.startswith("| metric"))
    assert printed["ShapeVAE latent rows of the round trip"] == "16"
    at_16 = vae_reconstruction(pipe, single_shape_rows(heldout_rows(), 2), octree_resolution=64, num_shape_tokens=16)
    at_64 = vae_reconstruction(pipe, single_shape_rows(heldout_rows(), 2), octree_resolution=64)
    assert printed["ShapeVAE volume IoU (2 meshes)"] == f"{at_16['iou']:.3f}" != f"{at_64['iou']:.3f}"
    for bad in ("0", "65"):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(["--vae", vae, "--vae-latents", bad, "--num", "2"])
        assert exit_info.value.code == 2
    assert "--vae-latents 65: the round trip takes 1 to 64 latent rows" in capsys.readouterr().err


def test_posed_sphere_primitives_are_captioned_as_spheres(pipe):
    # trimesh's own spheres (UV and icospheres, other tessellations than the tiny world's), as built and randomly
    # posed: the family the shipped checkpoint names in every pose (`eval_tiny_world.py` reports every family).
    from cgmllm.training.tiny_world.evaluation import names_family, primitive_captions
    from cgmllm.training.tiny_world.primitives import posed_primitive_rows

    rows = posed_primitive_rows(3, families=("sphere", "cylinder"))
    result = primitive_captions(pipe, rows, max_new_tokens=16)
    assert result["count"] == 6 and len(result["captions"]) == 6
    assert result["by_family"]["sphere"] == (3, 3), result["captions"]
    hits = [names_family(caption, row["family"]) for caption, row in zip(result["captions"], rows)]
    assert result["by_family"]["cylinder"] == (sum(hits[3:]), 3)
    assert result["family_word_accuracy"] == pytest.approx(sum(hits) / 6)
    assert result["as_built_accuracy"] == pytest.approx((hits[0] + hits[3]) / 2)


def test_benchmark_refuses_a_negative_number_of_primitives(capsys):
    # `--num-primitives 0` skips the primitives rows; below 0 is refused before any model is loaded.
    import importlib.util

    from cgmllm.cli import default_model_dir

    path = default_model_dir().parents[1] / "benchmarks" / "eval_tiny_world.py"
    spec = importlib.util.spec_from_file_location("eval_tiny_world", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    with pytest.raises(SystemExit):
        benchmark.main(["--num-primitives", "-1"])
    assert "--num-primitives -1: give 0 (skip the primitives rows) or more." in capsys.readouterr().err
