"""CGMLLMPipeline: cached/batched denoising against an uncached reference, blocks, seeds, meshes, captions, remote code."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import trimesh
from conftest import REAL_MESHES, randomize_heads, tiny_cgmllm_config, tiny_text_config
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from cgmllm import CGMLLMForConditionalGeneration, CGMLLMProcessor, train_bbpe_tokenizer
from cgmllm.modeling_shape_vae import ShapeVAE
from cgmllm.pipelines import CGMLLMPipeline, CGMLLMPipelineOutput


N, C, STEPS = 8, 8, 4
PROMPTS = ["a red car", "a tall cylinder on a flat box"]  # different lengths: exercises left padding


def _tiny_pipeline(seed=0):
    tokenizer = train_bbpe_tokenizer(
        ["a red car", "a tall cylinder", "a flat box on a sphere", "describe this image"] * 4, vocab_size=300
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=1, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=64 * 64
    )
    processor = CGMLLMProcessor(image_processor=image_processor, tokenizer=tokenizer, num_shape_tokens=N)
    config = tiny_cgmllm_config(
        text_config=tiny_text_config(vocab_size=len(tokenizer), pad_token_id=0),
        num_shape_tokens=N,
        shape_latent_channels=C,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        **processor.special_token_ids,
    )
    torch.manual_seed(seed)
    model = randomize_heads(CGMLLMForConditionalGeneration(config).eval(), seed)
    vae = ShapeVAE(
        num_latents=N, embed_dim=C, width=32, heads=4, num_encoder_layers=1, num_decoder_layers=1, num_freqs=4,
        pc_size=256, pc_sharpedge_size=0, downsample_ratio=4,
    ).eval()
    pipe = CGMLLMPipeline(model=model, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _tiny_pipeline()


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(48, 48, 3) * 255).astype("uint8"))


def _seed(seed=0):
    return torch.Generator().manual_seed(seed)


def _block_tokens(config, index, num_blocks, size):
    ids = [config.obj_pad_token_id] * size
    if index == 0:
        ids = [config.obj_start_token_id] + ids
    if index == num_blocks - 1:
        ids = ids + [config.obj_end_token_id]
    return ids


def _uncached_reference(pipe, contexts, noise, guidance_scale, interval=(0.4, 1.0), block_size=None,
                        negative=None):
    """The same sampler written the slow way: every object and every CFG branch on its own, no KV cache, the whole
    sequence [context, clean blocks < j, noisy block j] recomputed at every step, Euler written out by hand."""
    model, processor = pipe.model, pipe.processor
    config = model.config
    # The official grid: t = linspace(1, 0, STEPS + 1) shifted by s, STEPS Euler steps ending at t = 0.
    shift = pipe.scheduler.config.shift
    grid = torch.linspace(1, 0, STEPS + 1, dtype=torch.float64)
    sigmas = (shift * grid / (1 + (shift - 1) * grid)).tolist()
    size = block_size or noise.shape[1]
    num_blocks = noise.shape[1] // size
    results = []
    for b, context in enumerate(contexts):
        branches = [processor.text_to_shape_prompt(context) if isinstance(context, str) else context]
        if guidance_scale > 1:
            branches.append(processor.text_to_shape_prompt(negative))
        ctx_ids = []
        for text in branches:
            ids = processor(text=[text])["input_ids"] if text else torch.zeros(1, 0, dtype=torch.long)
            ctx_ids.append(ids)
        clean = []
        for j in range(num_blocks):
            x = noise[b : b + 1, j * size : (j + 1) * size].clone()
            for i in range(STEPS):
                velocities = []
                for ids in ctx_ids:
                    pieces, block_ids, timesteps = [ids[0].tolist()], [[-1] * ids.shape[1]], []
                    for k in range(j + 1):
                        tokens = _block_tokens(config, k, num_blocks, size)
                        pieces.append(tokens)
                        block_ids.append([k] * len(tokens))
                        timesteps += [0.0 if k < j else sigmas[i]] * size
                    input_ids = torch.tensor([sum(pieces, [])])
                    out = model(
                        input_ids=input_ids,
                        shape_block_ids=torch.tensor([sum(block_ids, [])]),
                        shape_latents=torch.cat(clean + [x[0]], dim=0),
                        shape_timesteps=torch.tensor(timesteps),
                    )
                    velocities.append(out.velocity[-size:])
                v = velocities[0]
                if guidance_scale > 1 and interval[0] < sigmas[i] <= interval[1]:
                    v_c, v_u = velocities
                    v = v_u + guidance_scale * (v_c - v_u)
                    v = v * min(1.0, float(v_c.norm() / (v.norm() + 1e-8)))
                x = x + (sigmas[i + 1] - sigmas[i]) * v
            clean.append(x[0])
        results.append(torch.cat(clean, dim=0))
    return torch.stack(results)


# 1. The fast sampler equals the slow one -----------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale, negative", [(3.0, None), (3.0, "a flat box"), (1.0, None)])
@torch.no_grad()
def test_cached_batched_cfg_matches_uncached_separate_passes(pipe, guidance_scale, negative):
    noise = torch.randn(len(PROMPTS), N, C, generator=_seed(1))
    out = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance_scale,
               latents=noise, output_type="latent")
    expected = _uncached_reference(pipe, PROMPTS, noise, guidance_scale, negative=negative)
    torch.testing.assert_close(out.latents, expected, rtol=1e-4, atol=1e-5)
    assert out.meshes is None


@pytest.mark.parametrize("block_size", [4, 1])
@torch.no_grad()
def test_blockwise_generation_matches_uncached_reference(pipe, block_size):
    noise = torch.randn(1, N, C, generator=_seed(2))
    out = pipe(PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=3.0, latents=noise, output_type="latent",
               shape_block_size=block_size)
    expected = _uncached_reference(pipe, PROMPTS[:1], noise, 3.0, block_size=block_size)
    torch.testing.assert_close(out.latents, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_size", [N, 4])
def test_steps_outside_the_guidance_interval_run_only_the_conditional_rows(pipe, block_size):
    rows = []
    forward = pipe.model.forward

    def recording_forward(*args, **kwargs):
        if kwargs.get("shape_timesteps") is not None and kwargs.get("update_cache") is False:
            rows.append((kwargs["input_ids"].shape[0], float(kwargs["shape_timesteps"].reshape(-1)[0])))
        return forward(*args, **kwargs)

    pipe.model.forward = recording_forward
    steps = 8  # the official grid at 8 steps ends with t = 0.3 (shifted 1/8): one step outside the interval
    try:
        pipe(PROMPTS, num_inference_steps=steps, guidance_scale=3.0, guidance_interval=(0.4, 1.0),
             shape_block_size=block_size, generator=_seed(), output_type="latent")
    finally:
        del pipe.model.forward
    assert len(rows) == steps * (N // block_size)
    assert any(t <= 0.4 for _, t in rows) and any(t > 0.4 for _, t in rows)
    for batch, t in rows:  # cond + uncond rows inside the interval, the conditional rows alone outside it
        assert batch == (2 * len(PROMPTS) if 0.4 < t <= 1.0 else len(PROMPTS)), (batch, t)


def test_block_size_n_is_the_whole_object_and_smaller_blocks_return_n_rows(pipe):
    kwargs = dict(num_inference_steps=STEPS, output_type="latent")
    whole = pipe(PROMPTS, generator=_seed(), **kwargs).latents
    assert whole.shape == (2, N, C)
    torch.testing.assert_close(pipe(PROMPTS, generator=_seed(), shape_block_size=N, **kwargs).latents, whole,
                               rtol=0, atol=0)
    for block_size in (4, 2, 1):
        latents = pipe(PROMPTS, generator=_seed(), shape_block_size=block_size, **kwargs).latents
        assert latents.shape == (2, N, C) and torch.isfinite(latents).all()
        assert not torch.allclose(latents, whole)  # later blocks see the earlier ones: a different sampler


# 2. Seeds, batches, callbacks ----------------------------------------------------------------------------------------
def test_seeds_reproduce_and_batches_are_independent(pipe):
    kwargs = dict(num_inference_steps=STEPS, output_type="latent")
    first = pipe(PROMPTS, generator=_seed(3), **kwargs).latents
    torch.testing.assert_close(pipe(PROMPTS, generator=_seed(3), **kwargs).latents, first, rtol=0, atol=0)
    assert not torch.allclose(pipe(PROMPTS, generator=_seed(4), **kwargs).latents, first)
    # One generator per object: object 1 alone equals object 1 in the batch.
    both = pipe(PROMPTS, generator=[_seed(5), _seed(6)], **kwargs).latents
    alone = pipe(PROMPTS[1], generator=[_seed(6)], **kwargs).latents
    torch.testing.assert_close(alone[0], both[1], rtol=1e-4, atol=1e-5)
    many = pipe(PROMPTS, num_meshes_per_prompt=2, generator=_seed(7), **kwargs).latents
    assert many.shape == (4, N, C) and not torch.allclose(many[0], many[1])


def test_a_model_configured_with_return_dict_false_still_generates(pipe):
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", generator=_seed(3))
    expected = pipe(PROMPTS, **kwargs).latents
    pipe.model.config.return_dict = False  # a user's setting for their own tuple-unpacking code
    try:
        kwargs["generator"] = _seed(3)
        torch.testing.assert_close(pipe(PROMPTS, **kwargs).latents, expected, rtol=0, atol=0)
    finally:
        pipe.model.config.return_dict = True


def test_callback_on_step_end_sees_every_step(pipe):
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, callback_kwargs["latents"].shape[1]))
        return {"latents": callback_kwargs["latents"]}

    pipe(PROMPTS[0], num_inference_steps=STEPS, shape_block_size=4, output_type="latent",
         callback_on_step_end=callback, generator=_seed())
    assert [s for s, _ in seen] == list(range(2 * STEPS))
    assert [rows for _, rows in seen] == [4] * STEPS + [8] * STEPS


# 3. Meshes -----------------------------------------------------------------------------------------------------------
def _iso_level(pipe, latents):
    """The random field has no meaningful 0 level; the median of its grid values always cuts a surface."""
    with torch.no_grad():
        features = pipe.vae.decode(latents[:1] / pipe.vae.config.scale_factor)
        axis = torch.linspace(-1, 1, 9)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        return float(pipe.vae.query(features, grid)[0].median())


def test_text_to_mesh_exports_and_reloads(pipe, tmp_path):
    latents = pipe(PROMPTS[0], num_inference_steps=STEPS, generator=_seed(), output_type="latent").latents
    out = pipe(PROMPTS[0], num_inference_steps=STEPS, generator=_seed(), octree_resolution=16,
               mc_level=_iso_level(pipe, latents))
    assert isinstance(out, CGMLLMPipelineOutput)
    torch.testing.assert_close(out.latents, latents, rtol=0, atol=0)
    assert isinstance(out.mesh, trimesh.Trimesh) and len(out.mesh.faces) > 0
    for suffix in ("glb", "obj", "ply", "stl"):
        path = tmp_path / f"mesh.{suffix}"
        out.mesh.export(path)
        reloaded = trimesh.load(path, force="mesh")
        assert len(reloaded.faces) == len(out.mesh.faces), suffix


def test_image_to_mesh(pipe, image):
    latents = pipe(image=[image, image], num_inference_steps=STEPS, generator=_seed(), output_type="latent").latents
    assert latents.shape == (2, N, C) and not torch.allclose(latents[0], latents[1])  # one noise draw per object
    out = pipe(image=image, num_inference_steps=STEPS, generator=_seed(), octree_resolution=16,
               mc_level=_iso_level(pipe, latents))
    assert isinstance(out.mesh, trimesh.Trimesh) and len(out.mesh.faces) > 0
    assert not torch.allclose(out.latents, pipe(PROMPTS[0], num_inference_steps=STEPS, generator=_seed(),
                                                output_type="latent").latents)


# 4. Captioning -------------------------------------------------------------------------------------------------------
def test_caption_image_and_mesh(pipe, image, tmp_path):
    captions = pipe.caption(image=[image, image], max_new_tokens=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions) and captions[0] == captions[1]
    mesh_path = REAL_MESHES / "sphere.ply"
    if not mesh_path.exists():  # checkouts without ../shared: a sphere of our own
        mesh_path = tmp_path / "sphere.ply"
        trimesh.creation.icosphere(subdivisions=2).export(mesh_path)
    mesh_captions = pipe.caption(mesh=mesh_path, max_new_tokens=5)
    assert len(mesh_captions) == 1 and isinstance(mesh_captions[0], str)
    # The mesh path really goes through the VAE latents: the same prompt with other latents can decode differently,
    # and the greedy result equals generate() on the encoded latents.
    latents = pipe.encode_mesh(mesh_path)
    assert latents.shape == (1, N, C)
    inputs = pipe.processor(text=[pipe.processor.shape_caption_prompt()], num_shape_tokens=N)
    ids = pipe.model.generate(**inputs, shape_latents=latents[0], max_new_tokens=5, do_sample=False,
                              pad_token_id=0)
    assert pipe.processor.decode_captions(ids[:, inputs["input_ids"].shape[1]:]) == mesh_captions


# 5. Save / load ------------------------------------------------------------------------------------------------------
def test_save_and_load_as_remote_code_without_the_package(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    expected = pipe(PROMPTS, num_inference_steps=STEPS, generator=_seed(9), output_type="latent").latents

    loaded = CGMLLMPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.model) is CGMLLMForConditionalGeneration
    torch.testing.assert_close(
        loaded(PROMPTS, num_inference_steps=STEPS, generator=_seed(9), output_type="latent").latents, expected,
        rtol=0, atol=0,
    )

    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["cgmllm"] = None  # the installed package must not be needed
        import torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "pipe")!r}, trust_remote_code=True)
        assert type(pipe).__name__ == "CGMLLMPipeline", type(pipe)
        assert not type(pipe.model).__module__.startswith("cgmllm"), type(pipe.model).__module__
        pipe.set_progress_bar_config(disable=True)
        out = pipe({PROMPTS!r}, num_inference_steps={STEPS}, generator=torch.Generator().manual_seed(9),
                   output_type="latent")
        torch.save(out.latents, {str(tmp_path / "latents.pt")!r})
        """
    )
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "latents.pt"), expected, rtol=0, atol=0)


# 6. Bad inputs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "Provide a `prompt`"),
        (dict(prompt=[]), "empty list"),
        (dict(prompt=""), "non-empty string"),
        (dict(prompt="a car", num_shape_tokens=0), "num_shape_tokens"),
        (dict(prompt="a car", num_shape_tokens=N + 1), rf"\[1, {N}\]"),
        (dict(prompt="a car", shape_block_size=3), "divisor of num_shape_tokens=8, got 3"),
        (dict(prompt="a car", num_inference_steps=0), "positive integer, got 0"),
        (dict(prompt="a car", output_type="pil"), "'pil'"),
        (dict(prompt="a car", latents=torch.zeros(1, 4, C)), r"\(1, 8, 8\)"),
        (dict(image="/nonexistent/picture.png"), "Could not read image 0"),
        (dict(image=42), "int"),
    ],
)
def test_bad_inputs_raise(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(num_inference_steps=kwargs.pop("num_inference_steps", STEPS), **kwargs)


def test_mesh_settings_are_checked_before_the_prompt_is_encoded(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "encode_prompt", lambda *args, **kwargs: pytest.fail("the prompt was encoded"))
    with pytest.raises(ValueError, match="octree resolution 10000 needs about .* GiB"):
        pipe("a car", octree_resolution=10_000)  # about 9 TB of grid
    with pytest.raises(ValueError, match="`octree_resolution` must be a positive integer, got 0"):
        pipe("a car", octree_resolution=0)
    with pytest.raises(ValueError, match="'sparse'"):
        pipe("a car", mesh_kwargs={"method": "sparse"})


def test_bad_caption_inputs_raise(pipe, tmp_path, image):
    with pytest.raises(ValueError, match="exactly one"):
        pipe.caption()
    with pytest.raises(ValueError, match="exactly one"):
        pipe.caption(image=image, mesh=REAL_MESHES / "sphere.ply")
    broken = tmp_path / "broken.ply"
    broken.write_bytes(b"not a mesh at all")
    with pytest.raises(ValueError):
        pipe.caption(mesh=broken)
    with pytest.raises(ValueError):
        pipe.caption(mesh=tmp_path / "missing.obj")


def test_prompts_longer_than_the_trained_context_warn(pipe, monkeypatch):
    import cgmllm.pipelines.pipeline_cgmllm as pipeline_module

    warnings = []
    monkeypatch.setattr(pipeline_module.logger, "warning", lambda message: warnings.append(message))
    monkeypatch.setattr(pipe.model.config, "max_prompt_tokens", 12)
    kwargs = dict(num_inference_steps=1, output_type="latent", generator=_seed())
    pipe("a red car", **kwargs)
    assert warnings == []
    pipe(["a red car", "a tall cylinder on a flat box " * 3], **kwargs)
    assert len(warnings) == 1 and "1 prompt(s)" in warnings[0] and "(12 tokens)" in warnings[0]
    monkeypatch.setattr(pipe.model.config, "max_prompt_tokens", None)  # unknown: only the position limit counts
    pipe("a tall cylinder on a flat box " * 3, **kwargs)
    assert len(warnings) == 1
