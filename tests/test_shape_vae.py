"""ShapeVAE: official key layout and loading, attention layout, encode / decode / query, meshes, training loss."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh
import yaml
from safetensors.torch import save_file

from conftest import real_mesh_path

from cgmllm.mesh_utils import load_mesh, normalize_mesh, sample_sdf_points, sample_surface
from cgmllm.modeling_shape_vae import (
    DiagonalGaussianDistribution,
    FourierEmbedder,
    MultiheadAttention,
    MultiheadCrossAttention,
    ShapeVAE,
    farthest_point_sampling,
)
from cgmllm.volume_decoding import decode_volume_dense, decode_volume_hierarchical, marching_cubes


# Tiny model: 256 uniform + 64 sharp-edge points; 32 latents -> 26 uniform and 6 sharp queries, 4 points each.
TINY = dict(
    num_latents=32,
    embed_dim=8,
    width=32,
    heads=4,
    num_encoder_layers=1,
    num_decoder_layers=2,
    num_freqs=4,
    point_feats=4,
    pc_size=256,
    pc_sharpedge_size=64,
    downsample_ratio=4,
)


def tiny_vae(seed: int = 0, **overrides) -> ShapeVAE:
    torch.manual_seed(seed)
    return ShapeVAE(**{**TINY, **overrides}).eval()


def tiny_surface(mesh: trimesh.Trimesh, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(sample_surface(mesh, TINY["pc_size"], TINY["pc_sharpedge_size"], seed=seed))


@pytest.fixture(scope="module")
def nut() -> trimesh.Trimesh:
    return normalize_mesh(load_mesh(real_mesh_path("nut.ply")))[0]


# ----------------------------------------------------------------------------------------------------------------
# The official key list, written out from the Hunyuan3D-2.1 state dict (independently of the model code)
# ----------------------------------------------------------------------------------------------------------------


def official_state_dict_shapes(
    width=32, heads=4, embed_dim=8, encoder_layers=1, decoder_layers=2, num_freqs=4, point_feats=4, with_encoder=True
) -> OrderedDict[str, tuple[int, ...]]:
    head_dim, fourier = width // heads, 3 * (2 * num_freqs + 1)
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def linear(name, out_features, in_features, bias=True):
        shapes[f"{name}.weight"] = (out_features, in_features)
        if bias:
            shapes[f"{name}.bias"] = (out_features,)

    def layer_norm(name, size=width):
        shapes[f"{name}.weight"] = (size,)
        shapes[f"{name}.bias"] = (size,)

    def mlp(name):
        linear(f"{name}.c_fc", 4 * width, width)
        linear(f"{name}.c_proj", width, 4 * width)

    def qk_norms(name):
        layer_norm(f"{name}.attention.q_norm", head_dim)
        layer_norm(f"{name}.attention.k_norm", head_dim)

    def cross_block(name):
        linear(f"{name}.attn.c_q", width, width, bias=False)
        linear(f"{name}.attn.c_kv", 2 * width, width, bias=False)
        linear(f"{name}.attn.c_proj", width, width)
        qk_norms(f"{name}.attn")
        for ln in ("ln_1", "ln_2", "ln_3"):
            layer_norm(f"{name}.{ln}")
        mlp(f"{name}.mlp")

    def self_block(name):
        linear(f"{name}.attn.c_qkv", 3 * width, width, bias=False)
        linear(f"{name}.attn.c_proj", width, width)
        qk_norms(f"{name}.attn")
        layer_norm(f"{name}.ln_1")
        layer_norm(f"{name}.ln_2")
        mlp(f"{name}.mlp")

    if with_encoder:
        linear("encoder.input_proj", width, fourier + point_feats)
        cross_block("encoder.cross_attn")
        for i in range(encoder_layers):
            self_block(f"encoder.self_attn.resblocks.{i}")
        layer_norm("encoder.ln_post")
        linear("pre_kl", 2 * embed_dim, width)
    linear("post_kl", width, embed_dim)
    for i in range(decoder_layers):
        self_block(f"transformer.resblocks.{i}")
    linear("geo_decoder.query_proj", width, fourier)
    cross_block("geo_decoder.cross_attn_decoder")
    layer_norm("geo_decoder.ln_post")
    linear("geo_decoder.output_proj", 1, width)
    return shapes


def random_official_state_dict(seed=0, dtype=torch.float16, **sizes) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (key, (0.1 * torch.randn(shape, generator=generator)).to(dtype))
        for key, shape in official_state_dict_shapes(**sizes).items()
    )


def test_full_size_config_matches_the_release():
    with torch.device("meta"):
        model = ShapeVAE()
    assert sum(p.numel() for p in model.parameters()) == 327_746_177
    expected = official_state_dict_shapes(1024, 16, 64, 8, 16, 8, 4)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dict(expected)
    assert model.config.scale_factor == 1.0039506158752403


def write_checkpoints(folder: Path, state_dict) -> dict[str, Path]:
    paths = {
        "flat_ckpt": folder / "flat" / "model.fp16.ckpt",
        "nested_state_dict_ckpt": folder / "nested.ckpt",
        "dit_ckpt": folder / "dit.ckpt",
        "flat_safetensors": folder / "flat.safetensors",
        "pipeline_safetensors": folder / "pipeline.safetensors",
    }
    paths["flat_ckpt"].parent.mkdir()
    torch.save(state_dict, paths["flat_ckpt"])
    torch.save({"state_dict": state_dict}, paths["nested_state_dict_ckpt"])
    dit = {"model": {"x_embedder.weight": torch.zeros(4, 8)}, "vae": state_dict, "conditioner": {}}
    torch.save(dit, paths["dit_ckpt"])
    save_file(dict(state_dict), paths["flat_safetensors"])
    pipeline = {f"vae.{k}": v for k, v in state_dict.items()}
    pipeline["model.x_embedder.weight"] = torch.zeros(4, 8)
    pipeline["conditioner.main_image_encoder.w"] = torch.zeros(2)
    save_file(pipeline, paths["pipeline_safetensors"])
    return paths


@pytest.mark.parametrize(
    "variant", ["flat_ckpt", "nested_state_dict_ckpt", "dit_ckpt", "flat_safetensors", "pipeline_safetensors", "folder"]
)
def test_from_hunyuan3d_loads_official_layout_strictly(tmp_path, variant):
    state_dict = random_official_state_dict()
    paths = write_checkpoints(tmp_path, state_dict)
    if variant == "folder":
        # As `hunyuan3d-vae-v2-1/`: config.yaml {target, params} next to model.fp16.ckpt.
        params = {**TINY, "include_pi": False, "qkv_bias": False, "qk_norm": True, "label_type": "binary"}
        with open(paths["flat_ckpt"].parent / "config.yaml", "w") as handle:
            yaml.safe_dump({"target": "hy3dshape.models.autoencoders.ShapeVAE", "params": params}, handle)
        model = ShapeVAE.from_hunyuan3d(paths["flat_ckpt"].parent)
        assert model.config.num_latents == 32 and model.config.pc_sharpedge_size == 64
    else:
        model = ShapeVAE.from_hunyuan3d(paths[variant], num_latents=32, pc_size=256, pc_sharpedge_size=64)

    # Sizes come from the tensors.
    config = model.config
    assert (config.width, config.heads, config.embed_dim) == (32, 4, 8)
    assert (config.num_encoder_layers, config.num_decoder_layers, config.num_freqs, config.point_feats) == (1, 2, 4, 4)
    assert config.qk_norm and not config.qkv_bias and config.with_encoder
    loaded = model.state_dict()
    assert list(loaded) == list(state_dict) or set(loaded) == set(state_dict)
    for key, value in state_dict.items():
        torch.testing.assert_close(loaded[key], value.float(), rtol=0, atol=0)
    assert model.dtype == torch.float32


def test_from_hunyuan3d_rejects_missing_extra_and_misshaped_keys(tmp_path):
    state_dict = random_official_state_dict()
    missing = OrderedDict(state_dict)
    del missing["geo_decoder.cross_attn_decoder.ln_3.bias"]
    torch.save(missing, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"missing keys: geo_decoder\.cross_attn_decoder\.ln_3\.bias"):
        ShapeVAE.from_hunyuan3d(tmp_path / "missing.ckpt")

    extra = OrderedDict(state_dict)
    extra["geo_decoder.output_proj.extra_scale"] = torch.ones(1)
    save_file(dict(extra), tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys: geo_decoder\.output_proj\.extra_scale"):
        ShapeVAE.from_hunyuan3d(tmp_path / "extra.safetensors")

    torch.save(state_dict, tmp_path / "ok.ckpt")
    expected = r"shape mismatches: .*geo_decoder\.query_proj\.weight: checkpoint \(32, 27\) vs model \(32, 39\)"
    with pytest.raises(ValueError, match=expected):
        ShapeVAE.from_hunyuan3d(tmp_path / "ok.ckpt", num_freqs=6)

    with pytest.raises(ValueError, match="does not exist"):
        ShapeVAE.from_hunyuan3d(tmp_path / "nowhere.ckpt")


def test_decoder_only_checkpoint(tmp_path):
    state_dict = random_official_state_dict(with_encoder=False)
    torch.save(state_dict, tmp_path / "model.fp16.ckpt")
    model = ShapeVAE.from_hunyuan3d(tmp_path, num_freqs=4)
    assert not model.config.with_encoder
    features = model.decode(torch.randn(1, 8, 8))
    assert model.query(features, torch.rand(10, 3)).shape == (1, 10)
    with pytest.raises(ValueError, match="no encoder"):
        model.encode(torch.randn(1, 320, 7))


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny_vae()
    model.save_pretrained(tmp_path)
    reloaded = ShapeVAE.from_pretrained(tmp_path).eval()
    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(reloaded.config) == public(model.config)
    latents = torch.randn(2, 12, 8)
    torch.testing.assert_close(reloaded.decode(latents), model.decode(latents))


# ----------------------------------------------------------------------------------------------------------------
# Attention layout and building blocks
# ----------------------------------------------------------------------------------------------------------------


def reference_attention(q, k, v, q_norm, k_norm):
    """Per-head LayerNorm on q and k, softmax(q k^T / sqrt(d)) v, written out by hand. q: (B, H, N, d)."""
    q = F.layer_norm(q, q.shape[-1:], q_norm.weight, q_norm.bias, 1e-6)
    k = F.layer_norm(k, k.shape[-1:], k_norm.weight, k_norm.bias, 1e-6)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module


def test_self_attention_uses_per_head_interleaved_qkv():
    width, heads, head_dim = 32, 4, 8
    attention = randomize(MultiheadAttention(width, heads, qkv_bias=False, qk_norm=True))
    x = torch.randn(2, 7, width)

    # Rows of c_qkv: head h, component j (q/k/v), channel i at h*3*d + j*d + i.
    w = attention.c_qkv.weight.view(heads, 3, head_dim, width)
    q = torch.einsum("bnc,hdc->bhnd", x, w[:, 0])
    k = torch.einsum("bnc,hdc->bhnd", x, w[:, 1])
    v = torch.einsum("bnc,hdc->bhnd", x, w[:, 2])
    out = reference_attention(q, k, v, attention.attention.q_norm, attention.attention.k_norm)
    expected = attention.c_proj(out.permute(0, 2, 1, 3).reshape(2, 7, width))
    torch.testing.assert_close(attention(x), expected, rtol=1e-4, atol=1e-5)

    # The naive [Q; K; V] split gives something else: the layout matters.
    wq, wk, wv = attention.c_qkv.weight.chunk(3, dim=0)
    naive_q = (x @ wq.T).view(2, 7, heads, head_dim).transpose(1, 2)
    naive_k = (x @ wk.T).view(2, 7, heads, head_dim).transpose(1, 2)
    naive_v = (x @ wv.T).view(2, 7, heads, head_dim).transpose(1, 2)
    naive = reference_attention(naive_q, naive_k, naive_v, attention.attention.q_norm, attention.attention.k_norm)
    naive = attention.c_proj(naive.permute(0, 2, 1, 3).reshape(2, 7, width))
    assert not torch.allclose(attention(x), naive, atol=1e-3)


def test_cross_attention_uses_per_head_interleaved_kv():
    width, heads, head_dim = 32, 4, 8
    attention = randomize(MultiheadCrossAttention(width, heads, qkv_bias=False, qk_norm=True), seed=1)
    x, data = torch.randn(2, 5, width), torch.randn(2, 11, width)

    q = torch.einsum("bnc,hdc->bhnd", x, attention.c_q.weight.view(heads, head_dim, width))
    w = attention.c_kv.weight.view(heads, 2, head_dim, width)  # rows h*2*d + j*d + i
    k = torch.einsum("bmc,hdc->bhmd", data, w[:, 0])
    v = torch.einsum("bmc,hdc->bhmd", data, w[:, 1])
    out = reference_attention(q, k, v, attention.attention.q_norm, attention.attention.k_norm)
    expected = attention.c_proj(out.permute(0, 2, 1, 3).reshape(2, 5, width))
    torch.testing.assert_close(attention(x, data), expected, rtol=1e-4, atol=1e-5)


def test_fourier_embedder_is_coordinate_major():
    embedder = FourierEmbedder(num_freqs=3, include_pi=False)
    x = torch.tensor([[0.1, 0.2, 0.3]])
    out = embedder(x)
    assert out.shape == (1, 21) and embedder.out_dim == 21
    frequencies = [1.0, 2.0, 4.0]
    expected = [0.1, 0.2, 0.3]
    expected += [math.sin(c * f) for c in (0.1, 0.2, 0.3) for f in frequencies]
    expected += [math.cos(c * f) for c in (0.1, 0.2, 0.3) for f in frequencies]
    torch.testing.assert_close(out[0], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert "frequencies" not in embedder.state_dict()


def test_fourier_features_are_float32_under_half_precision():
    # bfloat16 coordinates (exactly representable in float32) give the float32 features of those coordinates.
    x = (torch.rand(50, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(torch.bfloat16)
    out = FourierEmbedder(num_freqs=8).to(torch.bfloat16)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, FourierEmbedder(num_freqs=8)(x.float()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, field_bound", [(torch.bfloat16, 0.15), (torch.float16, 0.02)])
def test_half_precision_field_error_of_the_shipped_vae_is_bounded(dtype, field_bound):
    # The shipped tiny-world VAE (fields in about [-12, 9]). Measured max |field - float32 field| on 4000 points:
    # bfloat16 0.186 / float16 0.024 with Fourier features and surfaces in the model dtype, 0.10 / 0.016 with them
    # in float32. The encoded latents moved by up to 4.2 in bfloat16 (farthest point sampling picked other
    # queries from bfloat16 coordinates), 0.022 now.
    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-world" / "vae"
    reference = ShapeVAE.from_pretrained(folder).eval()
    half = ShapeVAE.from_pretrained(folder, torch_dtype=dtype).eval()
    assert half.dtype == dtype
    surface = torch.as_tensor(sample_surface(trimesh.creation.box(extents=(0.8, 0.5, 0.6)), 512, 256, seed=0))
    xyz = torch.rand(4000, 3, generator=torch.Generator().manual_seed(1)) * 2.02 - 1.01
    with torch.no_grad():
        latents = reference.encode(surface[None].float(), generator=torch.Generator().manual_seed(0)).mode()
        latents_half = half.encode(surface[None].float(), generator=torch.Generator().manual_seed(0)).mode()
        field = reference.query(reference.decode(latents), xyz)
        field_half = half.query(half.decode(latents), xyz)
    assert field_half.dtype == dtype
    assert (field_half.float() - field).abs().max() < field_bound
    assert (latents_half.float() - latents).abs().max() < 0.1


def test_farthest_point_sampling_matches_naive_reference():
    points = torch.rand(2, 300, 3, generator=torch.Generator().manual_seed(0))
    picked = farthest_point_sampling(points, 20, random_start=False)
    for b in range(2):
        chosen, distance = [0], torch.full((300,), float("inf"))
        for _ in range(19):
            distance = torch.minimum(distance, ((points[b] - points[b, chosen[-1]]) ** 2).sum(-1))
            chosen.append(int(distance.argmax()))
        assert picked[b].tolist() == chosen
    first = farthest_point_sampling(points, 20, generator=torch.Generator().manual_seed(5))
    again = farthest_point_sampling(points, 20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again) and len(set(first[0].tolist())) == 20


def test_diagonal_gaussian():
    moments = torch.cat([torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)], dim=-1)
    posterior = DiagonalGaussianDistribution(moments)
    torch.testing.assert_close(posterior.kl(), torch.zeros(2))
    torch.testing.assert_close(posterior.std, torch.ones(2, 3, 4))
    shifted = DiagonalGaussianDistribution(torch.cat([torch.ones(1, 3, 4), torch.zeros(1, 3, 4)], dim=-1))
    torch.testing.assert_close(shifted.kl(), torch.tensor([0.5]))
    sample = shifted.sample(torch.Generator().manual_seed(0))
    assert torch.equal(sample, shifted.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(shifted.mode(), shifted.mean)


# ----------------------------------------------------------------------------------------------------------------
# Encode / decode on real meshes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["airplane.ply", "ant.ply", "nut.ply", "sphere.ply"])
def test_encode_decode_real_meshes(name):
    mesh, _, _ = normalize_mesh(load_mesh(real_mesh_path(name)))
    model = tiny_vae()
    surface = torch.stack([tiny_surface(mesh, seed=0), tiny_surface(mesh, seed=1)])  # (2, 320, 7)
    with torch.no_grad():
        posterior = model.encode(surface, generator=torch.Generator().manual_seed(0))
        latents = posterior.sample(torch.Generator().manual_seed(0))
        features = model.decode(latents)
        field = model.query(features, torch.rand(2, 50, 3) * 2 - 1)
    assert latents.shape == (2, 32, 8) and posterior.mean.shape == (2, 32, 8)
    assert features.shape == (2, 32, 32) and field.shape == (2, 50)
    assert torch.isfinite(field).all() and torch.isfinite(posterior.kl()).all()


def test_encode_is_deterministic_given_a_generator_and_num_latents_can_change(nut):
    model = tiny_vae()
    surface = tiny_surface(nut)[None]
    with torch.no_grad():
        first = model.encode(surface, generator=torch.Generator().manual_seed(3))
        again = model.encode(surface, generator=torch.Generator().manual_seed(3))
        other = model.encode(surface, generator=torch.Generator().manual_seed(4))
        assert torch.equal(first.mean, again.mean)
        assert torch.equal(
            first.sample(torch.Generator().manual_seed(1)), again.sample(torch.Generator().manual_seed(1))
        )
        assert not torch.equal(first.mean, other.mean)  # different subset / FPS start

        for num_latents in (8, 16, 64):
            assert model.encode(surface, num_latents=num_latents).mean.shape == (1, num_latents, 8)
        # 6-channel input: the sharp flag is appended from the pool layout (last pc_sharpedge_size rows).
        six = model.encode(surface[..., :6], generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(six.mean, first.mean)

        with pytest.raises(ValueError, match="channels"):
            model.encode(surface[..., :5])
        with pytest.raises(ValueError, match="num_latents must be positive"):
            model.encode(surface, num_latents=0)
        with pytest.raises(ValueError, match="uniform pool has"):
            model.encode(surface, num_latents=400)


def test_hierarchical_equals_dense_on_tiny_vae_field(nut):
    model = tiny_vae(seed=1)
    with torch.no_grad():
        latents = model.encode(tiny_surface(nut)[None], generator=torch.Generator().manual_seed(0)).mode()
        features = model.decode(latents)
    field = model.field_fn(features)
    dense = decode_volume_dense(field, 32, num_chunks=4096)
    level = float(np.median(dense.values))  # random weights: pick a level inside the field's range
    hierarchical = decode_volume_hierarchical(field, 32, level=level, num_chunks=4096, min_resolution=16)
    assert hierarchical.num_queries < dense.num_queries
    mesh_dense, mesh_hier = marching_cubes(dense, level), marching_cubes(hierarchical, level)
    assert len(mesh_dense.faces) > 0
    np.testing.assert_array_equal(mesh_dense.faces, mesh_hier.faces)
    np.testing.assert_array_equal(mesh_dense.vertices, mesh_hier.vertices)

    # The model-level API gives the same mesh through both methods.
    meshes = {
        method: model.latents_to_mesh(latents, octree_resolution=32, mc_level=level, method=method)[0]
        for method in ("dense", "hierarchical")
    }
    np.testing.assert_array_equal(meshes["dense"].vertices, mesh_dense.vertices)
    np.testing.assert_array_equal(meshes["hierarchical"].faces, mesh_dense.faces)
    assert np.abs(meshes["dense"].vertices).max() <= 1.01 + 1e-6


def test_check_mesh_settings_accepts_numpy_integers_and_refuses_the_rest():
    resolution = ShapeVAE.check_mesh_settings(np.int64(128))
    assert resolution == 128 and type(resolution) is int
    assert type(ShapeVAE.check_mesh_settings(64, "dense")) is int
    for bad in (1.5, True, 0, np.int64(0), -3, "128", None):
        with pytest.raises(ValueError, match=r"`octree_resolution` must be a positive integer, got "):
            ShapeVAE.check_mesh_settings(bad)


def test_field_fn_projects_the_latents_once_with_the_same_values(nut):
    model = tiny_vae(seed=1)
    with torch.no_grad():
        latents = model.encode(tiny_surface(nut)[None], generator=torch.Generator().manual_seed(0)).mode()
        features = model.decode(latents)
        xyz = torch.rand(500, 3) * 2 - 1
        expected = model.query(features, xyz[None])[0]
    calls = []
    c_kv = model.geo_decoder.cross_attn_decoder.attn.c_kv
    handle = c_kv.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    try:
        field = model.field_fn(features)
        values = [field(xyz) for _ in range(3)]
    finally:
        handle.remove()
    assert len(calls) == 1  # once per object, not once per chunk of queries
    for value in values:
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    reported = []
    model.latents_to_mesh(latents, octree_resolution=16, mc_level=0.0, progress_callback=reported.append)
    assert sum(reported) > 0 and all(n > 0 for n in reported)  # every chunk of field queries is reported


def test_latents_to_mesh_empty_field_gives_empty_mesh():
    model = tiny_vae()
    meshes = model.latents_to_mesh(torch.randn(2, 8, 8), octree_resolution=8, mc_level=1e6)
    assert len(meshes) == 2 and all(len(m.faces) == 0 for m in meshes)


# ----------------------------------------------------------------------------------------------------------------
# Training loss
# ----------------------------------------------------------------------------------------------------------------


def test_compute_loss_trains_a_tiny_vae(nut):
    model = tiny_vae(num_decoder_layers=1).train()
    surface = tiny_surface(nut)[None]
    points, labels = sample_sdf_points(nut, num_near=256, num_uniform=256, seed=0)
    points, labels = torch.from_numpy(points)[None], torch.from_numpy(labels)[None]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        output = model.compute_loss(surface, points, labels, kl_weight=1e-3, generator=generator)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.recon_loss.item())
    assert output.logits.shape == (1, 512) and output.latents.shape == (1, 32, 8)
    torch.testing.assert_close(output.loss, output.recon_loss + 1e-3 * output.kl_loss)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])

    sdf = model.compute_loss(surface, points, labels * 2 - 1, label_type="sdf", sample_posterior=False)
    assert sdf.recon_loss.ndim == 0
    torch.testing.assert_close(sdf.recon_loss, ((sdf.logits - (labels * 2 - 1)) ** 2).mean())
    # Clamped (DeepSDF): far labels (+-5) count as +-1, and so does any prediction beyond +-1.
    far = (labels * 2 - 1) * 5
    clamped = model.compute_loss(surface, points, far, label_type="sdf", sdf_clamp=1.0, sdf_loss="l1",
                                 sample_posterior=False)
    expected = (clamped.logits.clamp(-1, 1) - far.clamp(-1, 1)).abs().mean()
    torch.testing.assert_close(clamped.recon_loss, expected)
    with pytest.raises(ValueError, match="sdf_loss must be"):
        model.compute_loss(surface, points, far, label_type="sdf", sdf_loss="huber")
    with pytest.raises(ValueError, match="sdf_clamp must be a positive"):
        model.compute_loss(surface, points, far, label_type="sdf", sdf_clamp=0.0)
    with pytest.raises(ValueError, match="query_labels"):
        model.compute_loss(surface, points, labels[:, :10])
    with pytest.raises(ValueError, match="label_type"):
        model.compute_loss(surface, points, labels, label_type="bce")


def test_gradient_checkpointing_gives_the_same_gradients(nut):
    surface = tiny_surface(nut)[None]
    points, labels = torch.rand(1, 64, 3) * 2 - 1, (torch.rand(1, 64) > 0.5).float()
    grads = []
    for checkpointing in (False, True):
        model = tiny_vae().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        output = model.compute_loss(surface, points, labels, generator=torch.Generator().manual_seed(0))
        output.loss.backward()
        grads.append(model.transformer.resblocks[0].attn.c_qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
