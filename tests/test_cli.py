"""The `cgmllm` command line: render / caption / generate on real meshes and a tiny random pipeline folder."""

import numpy as np
import pytest
import torch
import trimesh
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from conftest import real_mesh_path

from cgmllm import cli
from cgmllm.pipelines import CGMLLMPipeline
from cgmllm.training.testing import tiny_model, tiny_processor, tiny_vae


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    processor = tiny_processor()
    model = tiny_model(processor).eval()
    with torch.no_grad():  # a non-zero velocity head, so the sampler really moves the latents
        model.llm2obj.weight.normal_(0, 0.02) if hasattr(model, "llm2obj") else None
    pipe = CGMLLMPipeline(model=model, vae=tiny_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          processor=processor)
    folder = tmp_path_factory.mktemp("pipe") / "tiny"
    pipe.save_pretrained(folder)
    return folder


def _iso_level(folder, prompt, steps, seed, image=None):
    """A random field has no meaningful 0 level; the median of its values on a coarse grid always cuts a surface."""
    pipe = CGMLLMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    condition = {"prompt": prompt} if image is None else {"image": image}
    latents = pipe(**condition, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                   output_type="latent").latents
    with torch.no_grad():
        features = pipe.vae.decode(latents / pipe.vae.config.scale_factor)
        axis = torch.linspace(-1, 1, 9)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        return float(pipe.vae.query(features, grid)[0].median())


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "render", "caption", "generate", "--model"):
        assert command in text
    for command in ("render", "caption", "generate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
    generate_help = capsys.readouterr().out
    for option in ("--steps", "--guidance-scale", "--seed", "--num-shape-tokens", "--octree-resolution", "--size",
                   "--views"):
        assert option in generate_help


def test_render_real_mesh(tmp_path, capsys):
    output = tmp_path / "preview.png"
    assert cli.main(["render", str(real_mesh_path("ant.ply")), "-o", str(output), "--size", "64", "--views", "3"]) == 0
    image = Image.open(output)
    assert image.size == (3 * 64, 64)
    pixels = np.asarray(image.convert("RGB"))
    assert (pixels < 250).any(), "the object must be visible on the white background"
    assert "wrote" in capsys.readouterr().out


def test_render_errors(tmp_path, capsys):
    assert cli.main(["render", str(tmp_path / "missing.glb"), "-o", str(tmp_path / "p.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.obj"
    broken.write_text("this is not a mesh\n")
    assert cli.main(["render", str(broken), "-o", str(tmp_path / "p.png")]) == 2
    assert "broken.obj" in capsys.readouterr().err
    sphere = tmp_path / "sphere.ply"  # error checks need only a readable mesh: our own, so they run without ../shared
    trimesh.creation.icosphere(subdivisions=1).export(sphere)
    assert cli.main(["render", str(sphere), "-o", str(tmp_path / "p.txt")]) == 2
    assert "unsupported extension" in capsys.readouterr().err
    assert cli.main(["render", str(sphere), "-o", str(tmp_path / "nope" / "p.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_writes_a_mesh(pipe_dir, tmp_path, capsys):
    level = _iso_level(pipe_dir, "a round ball", steps=3, seed=1)
    output = tmp_path / "out.glb"
    rc = cli.main(["generate", "a round ball", "-o", str(output), "--model", str(pipe_dir), "--steps", "3",
                   "--seed", "1", "--octree-resolution", "16", "--mc-level", repr(level), "--guidance-scale", "3"])
    assert rc == 0, capsys.readouterr().err
    mesh = trimesh.load(output, force="mesh")
    assert len(mesh.faces) > 0
    # A level the field never reaches: a clean error, no file.
    missing = tmp_path / "none.obj"
    rc = cli.main(["generate", "a round ball", "-o", str(missing), "--model", str(pipe_dir), "--steps", "2",
                   "--octree-resolution", "8", "--mc-level", "1e6"])
    assert rc == 2 and not missing.exists()
    assert "never crosses" in capsys.readouterr().err


def test_caption_mesh_and_image(pipe_dir, tmp_path, capsys):
    assert cli.main(["caption", str(real_mesh_path("sphere.ply")), "--model", str(pipe_dir),
                     "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    image_path = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(0).rand(48, 48, 3) * 255).astype("uint8")).save(image_path)
    assert cli.main(["caption", str(image_path), "--model", str(pipe_dir), "--max-new-tokens", "4"]) == 0
    # image -> mesh from the same file
    level = _iso_level(pipe_dir, None, steps=2, seed=0, image=Image.open(image_path).convert("RGB"))
    output = tmp_path / "from_image.ply"
    rc = cli.main(["generate", "--image", str(image_path), "-o", str(output), "--model", str(pipe_dir), "--steps",
                   "2", "--octree-resolution", "16", "--mc-level", repr(level)])
    assert rc == 0, capsys.readouterr().err
    assert len(trimesh.load(output, force="mesh").faces) > 0


def test_caption_and_generate_errors(pipe_dir, tmp_path, capsys, monkeypatch):
    assert cli.main(["caption", str(tmp_path / "missing.ply"), "--model", str(pipe_dir)]) == 2
    assert "no such file" in capsys.readouterr().err
    fake_image = tmp_path / "fake.png"
    fake_image.write_bytes(b"not a png")
    assert cli.main(["caption", str(fake_image), "--model", str(pipe_dir)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    sphere = tmp_path / "sphere.ply"
    trimesh.creation.icosphere(subdivisions=1).export(sphere)
    assert cli.main(["caption", str(sphere), "--model", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert cli.main(["generate", "a ball", "-o", str(tmp_path / "x.glb"), "--model", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["generate", "-o", str(tmp_path / "x.glb"), "--model", str(pipe_dir)]) == 2
    assert "either a PROMPT" in capsys.readouterr().err
    assert cli.main(["generate", "a ball", "--image", str(fake_image), "--model", str(pipe_dir)]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(["generate", "--image", str(fake_image), "--model", str(pipe_dir)]) == 2
    assert "--image" in capsys.readouterr().err
    # Without --model and without a shipped folder: the error names the paths to use.
    monkeypatch.setattr(cli, "default_model_dir", lambda: None)
    assert cli.main(["generate", "a ball", "-o", str(tmp_path / "x.glb")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and cli.DEFAULT_MODEL_NAME in err
