"""The `cgmllm` command line: render / caption / generate on real meshes and a tiny random pipeline folder."""

import subprocess
import sys
import textwrap

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
    # A missing folder is created (the default is outputs/preview.png); a file in the way is an error.
    assert cli.main(["render", str(sphere), "-o", str(tmp_path / "new" / "p.png"), "--size", "8"]) == 0
    assert (tmp_path / "new" / "p.png").is_file()
    assert cli.main(["render", str(sphere), "-o", str(sphere / "p.png")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


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


def test_caption_of_a_transparent_image_equals_the_python_api(pipe_dir, tmp_path, capsys):
    # The CLI reads the file as the pipeline does (alpha kept), so the processor flattens transparency as it
    # would for `pipe.caption(image=path)`; it used to drop the alpha channel first (black where transparent).
    pixels = (np.random.RandomState(1).rand(48, 48, 4) * 255).astype("uint8")
    pixels[..., 3] = np.where(np.arange(48)[:, None] < 24, 0, 255)  # the top half transparent
    image_path = tmp_path / "cutout.png"
    Image.fromarray(pixels, "RGBA").save(image_path)
    assert cli.read_image(image_path, "input").mode == "RGBA"
    assert cli.main(["caption", str(image_path), "--model", str(pipe_dir), "--max-new-tokens", "4"]) == 0
    pipe = CGMLLMPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    assert capsys.readouterr().out.strip() == pipe.caption(image=str(image_path), max_new_tokens=4)[0].strip()


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


# First contact: start-up, harm, feedback, files --------------------------------------------------------------------
def test_help_and_import_load_no_heavy_library():
    # What `cgmllm --help` and argument errors cost is what they import: nothing of torch / transformers / diffusers.
    # (Wall times are measured by benchmarks/bench_cli.py, not asserted here.)
    script = textwrap.dedent(
        """
        import sys
        import cgmllm
        from cgmllm import cli
        try:
            cli.main(["generate", "a ball", "-o", "x.txt"])
        except SystemExit:
            pass
        try:
            cli.main(["--help"])
        except SystemExit:
            pass
        names = ("torch", "transformers", "diffusers", "peft", "datasets", "trimesh")
        heavy = sorted(m for m in names if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert "unsupported extension" in result.stderr


def test_every_public_name_is_importable_from_cgmllm():
    import cgmllm

    for name in cgmllm.__all__:
        assert getattr(cgmllm, name) is not None, name
    from cgmllm import CGMLLMConfig, CGMLLMPipeline, CGMLLMTrainer  # noqa: F401
    from transformers import AutoConfig

    assert AutoConfig.for_model("cgmllm").__class__ is CGMLLMConfig  # the first use registered the Auto classes
    with pytest.raises(AttributeError, match="no attribute"):
        cgmllm.NotAName  # noqa: B018


def test_incomplete_folder_is_refused_before_any_model_is_built(pipe_dir, tmp_path, capsys, monkeypatch):
    import shutil

    from cgmllm import CGMLLMForConditionalGeneration, ShapeVAE

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(CGMLLMForConditionalGeneration, "__init__", refuse)
    monkeypatch.setattr(ShapeVAE, "__init__", refuse)
    broken = tmp_path / "broken"
    shutil.copytree(pipe_dir, broken)
    (broken / "model" / "config.json").unlink()  # the weights stay: transformers alone would build a default model
    assert cli.main(["generate", "a ball", "-o", str(tmp_path / "x.glb"), "--model", str(broken)]) == 2
    assert "model/config.json" in capsys.readouterr().err
    with pytest.raises(OSError, match="model/config.json"):
        CGMLLMPipeline.from_pretrained(broken)
    with pytest.raises(OSError, match="no config.json"):
        CGMLLMForConditionalGeneration.from_pretrained(broken / "model")
    assert not (tmp_path / "x.glb").exists()


def test_an_octree_larger_than_the_memory_is_refused_before_loading(pipe_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *args: pytest.fail("the pipeline was loaded"))
    output = tmp_path / "x.glb"
    assert cli.main(["generate", "a ball", "-o", str(output), "--model", str(pipe_dir), "--octree-resolution",
                     "10000"]) == 2
    err = capsys.readouterr().err
    assert "--octree-resolution: octree resolution 10000 needs about" in err and "available" in err
    assert not output.exists()


def test_gltf_outputs_are_self_contained_and_overwrite_is_announced(pipe_dir, tmp_path, capsys):
    level = _iso_level(pipe_dir, "a round ball", steps=2, seed=1)
    common = ["--model", str(pipe_dir), "--steps", "2", "--seed", "1", "--octree-resolution", "16", "--mc-level",
              repr(level), "--quiet"]
    first, second = tmp_path / "out" / "first.gltf", tmp_path / "out" / "second.gltf"
    assert cli.main(["generate", "a round ball", "-o", str(first), *common]) == 0  # creates the folder
    assert cli.main(["generate", "a round ball", "-o", str(second), *common]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote") == 2 and "buffers embedded" in out and "overwrote" not in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["first.gltf", "second.gltf"]  # no .bin files
    for path in (first, second):
        assert len(trimesh.load(path, force="mesh").faces) > 0
    assert cli.main(["generate", "a round ball", "-o", str(first), *common]) == 0
    assert capsys.readouterr().out.startswith(f"overwrote {first} ")


def test_progress_bars_quiet_and_threads(pipe_dir, tmp_path, capsys):
    level = _iso_level(pipe_dir, "a round ball", steps=2, seed=1)
    args = ["generate", "a round ball", "-o", str(tmp_path / "x.ply"), "--model", str(pipe_dir), "--steps", "2",
            "--seed", "1", "--octree-resolution", "16", "--mc-level", repr(level), "--threads", "1"]
    threads = torch.get_num_threads()
    capsys.readouterr()  # the bars of `_iso_level`'s own loading
    try:
        assert cli.main(args) == 0
        assert torch.get_num_threads() == 1
        err = capsys.readouterr().err
        assert "denoising" in err and "2/2" in err and "meshing" in err
        assert "Loading weights" not in err
        assert cli.main(args + ["--quiet"]) == 0
        err = capsys.readouterr().err
        assert "denoising" not in err and "meshing" not in err
    finally:
        torch.set_num_threads(threads)
    assert 1 <= cli.default_num_threads() <= 8
    with pytest.raises(SystemExit):
        cli.main(args + ["--threads", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_ctrl_c_prints_one_line_and_writes_nothing(pipe_dir, tmp_path, capsys, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CGMLLMPipeline, "__call__", interrupted)
    output = tmp_path / "x.glb"
    assert cli.main(["generate", "a ball", "-o", str(output), "--model", str(pipe_dir), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "cgmllm generate: interrupted; nothing written."
    assert not output.exists()


def test_mesh_caption_of_an_unfamiliar_real_mesh_stops_instead_of_repeating(capsys):
    # The shipped model captions the real airplane (nothing like its procedural shapes) with "... lying on its side
    # pyramid lying pyramid lying ..." up to the token limit, never emitting its end token (repetition penalties and
    # n-gram bans only vary the loop). The caption now ends where the loop starts.
    from cgmllm.pipelines import CGMLLMPipeline as Pipeline
    from cgmllm.pipelines.pipeline_cgmllm import cut_immediate_repeat

    pipe = Pipeline.from_pretrained(cli.default_model_dir())
    pipe.set_progress_bar_config(disable=True)
    tokenizer = pipe.processor.tokenizer
    looping = pipe.caption(mesh=real_mesh_path("airplane.ply"), max_new_tokens=64, stop_on_repetition=False)[0]
    caption = pipe.caption(mesh=real_mesh_path("airplane.ply"), max_new_tokens=64)[0]
    assert len(tokenizer(looping, add_special_tokens=False)["input_ids"]) >= 60  # the loop this guards against
    tokens = tokenizer(caption, add_special_tokens=False)["input_ids"]
    assert len(tokens) < 30 and looping.startswith(caption), caption
    for end in range(len(tokens) + 1):  # no span of 2+ tokens written twice back to back
        for span in range(2, end // 2 + 1):
            assert tokens[end - span : end] != tokens[end - 2 * span : end - span], caption
    # The cut itself: end token first, then the first back-to-back repeat of 2+ tokens; single tokens may repeat.
    assert cut_immediate_repeat([5, 6, 6, 7, 8, 7, 8, 7, 8], {2}) == [5, 6, 6, 7, 8]
    assert cut_immediate_repeat([5, 6, 2, 7, 8, 7, 8], {2}) == [5, 6]
    assert cut_immediate_repeat([5, 6, 7], {2}) == [5, 6, 7]
