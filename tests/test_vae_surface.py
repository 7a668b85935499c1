"""One surface draw for the VAE: the training latent cache and mesh captioning sample a shape the same way, with the
counts of the VAE config (`pc_size` uniform + `pc_sharpedge_size` sharp points)."""

import numpy as np
import pytest
import torch
import trimesh
from datasets import Dataset
from test_pipeline import N, _tiny_pipeline

from cgmllm.mesh_utils import sample_vae_surface
from cgmllm.training.data import example_surface
from cgmllm.training.preprocess import encode_dataset, encode_latents


@pytest.fixture(scope="module")
def pipe():
    # The tiny pipeline's VAE is shaped like Hunyuan3D-2.1's release: pc_size = 256, pc_sharpedge_size = 0.
    pipe = _tiny_pipeline()
    assert pipe.vae.config.pc_sharpedge_size == 0
    return pipe


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meshes")
    paths = []
    for name, mesh in (("box", trimesh.creation.box((1.0, 0.5, 0.3))), ("cone", trimesh.creation.cone(0.5, 1.0))):
        mesh.export(folder / f"{name}.ply")
        paths.append(folder / f"{name}.ply")
    return paths


def test_captioning_draws_the_cache_surface_with_a_hunyuan21_like_config(pipe, meshes):
    vae = pipe.vae
    path = meshes[0]
    cache_surface = example_surface({"mesh": {"bytes": path.read_bytes(), "path": None}}, vae.config, seed=5)
    caption_surface = pipe.processor.prepare_surfaces([path], vae.config, seed=5)[0]
    torch.testing.assert_close(caption_surface, cache_surface, rtol=0, atol=0)
    assert cache_surface.shape == (256, 7)  # pc_size uniform points, no sharp pool
    assert not bool(cache_surface[:, 6].any())

    # The pipeline encodes exactly that surface.
    generator = torch.Generator().manual_seed(5)
    expected = vae.encode(cache_surface[None], num_latents=N, generator=generator).mode()
    torch.testing.assert_close(pipe.encode_mesh(path, seed=5), expected, rtol=0, atol=0)

    # And the latent cache (`cgmllm-preprocess`) encodes it too.
    data = Dataset.from_dict({"uid": ["box"], "caption": ["a box"],
                              "mesh": [{"bytes": path.read_bytes(), "path": None}]})
    cached = encode_dataset(data, vae, num_latents=N, seed=5).with_format("torch")
    torch.testing.assert_close(cached[0]["latents"], encode_latents(vae, caption_surface[None], N, seed=5)[0],
                               rtol=0, atol=0)


def test_sharp_pool_follows_the_config(meshes):
    config = {"pc_size": 64, "pc_sharpedge_size": 32}
    surface = sample_vae_surface(meshes[0], config, seed=0)
    assert surface.shape == (96, 7)
    assert not bool(surface[:64, 6].any()) and bool(surface[64:, 6].all())  # a box has sharp edges
    assert torch.equal(surface, sample_vae_surface(meshes[0], config, seed=0))
    assert not torch.equal(surface, sample_vae_surface(meshes[0], config, seed=1))


def test_point_clouds_are_resampled_pool_by_pool():
    rng = np.random.default_rng(0)
    uniform = np.concatenate([rng.normal(size=(50, 6)), np.zeros((50, 1))], axis=1)
    sharp = np.concatenate([rng.normal(size=(10, 6)) + 5.0, np.ones((10, 1))], axis=1)
    cloud = np.concatenate([sharp, uniform]).astype(np.float32)  # any row order
    surface = sample_vae_surface(cloud, {"pc_size": 40, "pc_sharpedge_size": 20}, seed=0).numpy()
    assert surface.shape == (60, 7)
    assert (surface[:40, 6] == 0).all() and (surface[:40, 0] < 4).all()
    assert (surface[40:, 6] == 1).all() and (surface[40:, 0] > 2).all()
    # Hunyuan3D-2.1's config takes uniform points only.
    only_uniform = sample_vae_surface(cloud, {"pc_size": 30, "pc_sharpedge_size": 0}, seed=0).numpy()
    assert only_uniform.shape == (30, 7) and (only_uniform[:, 6] == 0).all()


def test_bad_configs_and_clouds_raise_clear_errors(meshes):
    with pytest.raises(ValueError, match="pc_sharpedge_size"):
        sample_vae_surface(meshes[0], {"pc_size": 64})
    with pytest.raises(ValueError, match="positive total"):
        sample_vae_surface(meshes[0], {"pc_size": 0, "pc_sharpedge_size": 0})
    with pytest.raises(ValueError, match=r"\(P, 6\) or \(P, 7\)"):
        sample_vae_surface(np.zeros((10, 3)), {"pc_size": 8, "pc_sharpedge_size": 0})


def test_beam_search_captions_over_two_meshes_equal_each_alone(pipe, meshes):
    together = pipe.caption(mesh=meshes, num_beams=2, max_new_tokens=4)
    latents = pipe.encode_mesh(meshes)  # what `caption` encodes: (2, N, C)
    processor = pipe.processor
    inputs = processor(text=[processor.shape_caption_prompt()], num_shape_tokens=N)
    alone = []
    for own in latents:
        generated = pipe.model.generate(**inputs, shape_latents=own, num_beams=2, max_new_tokens=4, do_sample=False,
                                        pad_token_id=processor.tokenizer.pad_token_id)
        alone += processor.decode_captions(generated[:, inputs["input_ids"].shape[1]:])
    assert together == alone
