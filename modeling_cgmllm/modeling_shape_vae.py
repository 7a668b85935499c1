# Copyright 2026 The CG-MLLM Authors. Apache-2.0.
"""ShapeVAE: a Hunyuan3D-2.1-compatible vector-set VAE for 3D shapes.

Data flow (shapes for the released 2.1 configuration, W = width = 1024, H = 16 heads):

    surface (B, 81920, 7) = [xyz, normal, sharp flag]
      -> random subsample (num_latents * downsample_ratio points) + farthest point sampling (num_latents queries)
      -> Fourier(xyz) ++ feats -> encoder.input_proj            queries (B, 4096, W), data (B, 81920, W)
      -> encoder.cross_attn(queries, data) -> encoder.self_attn (8 blocks) -> encoder.ln_post
      -> pre_kl -> DiagonalGaussianDistribution                 latents z (B, 4096, 64)
    z -> post_kl -> transformer (16 blocks)                     features (B, 4096, W)          = `decode`
    query xyz (B, Q, 3) -> Fourier -> geo_decoder.query_proj
      -> geo_decoder.cross_attn_decoder(queries, features) -> ln_post -> output_proj
                                                                field (B, Q), positive inside  = `query`
    field on a grid -> marching cubes at level 0                trimesh.Trimesh                = `latents_to_mesh`

Module and parameter names equal the official state-dict keys, so `from_hunyuan3d` loads the released checkpoint
with an identity key mapping. The official fused projections keep their *per-head interleaved* layout: row
`h * 3 * d + j * d + i` of `c_qkv.weight` is head `h`, component `j` (q, k, v), channel `i` (likewise `c_kv` with two
components); the attention modules split them that way in the forward instead of permuting the weights.
The latents are unscaled; a diffusion model works on `latents * config.scale_factor`.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.accelerate_utils import apply_forward_hook
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .mesh_utils import single_threaded_torch
from .volume_decoding import check_grid_memory, field_to_mesh, grid_memory_bytes


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (names follow the official state dict)
# ----------------------------------------------------------------------------------------------------------------


class FourierEmbedder(nn.Module):
    """`x (..., 3) -> [x, sin(x f), cos(x f)] (..., 3 * (2 * num_freqs + 1))` with `f = 2^0 .. 2^(num_freqs-1)`
    (times pi if `include_pi`). The product is coordinate-major: x*f0..x*fK, y*f0.., z*f0..; `input_proj` and
    `query_proj` were trained on exactly this order. Frequencies are a non-persistent buffer (not in checkpoints).

    Always computed in float32 and returned in float32, whatever the model dtype: `x * 2^7` in bfloat16 has an
    absolute error of up to 0.25 rad (half precision: 0.03), which the sines turn into a different field. The caller
    casts the features to its projection's dtype."""

    def __init__(self, num_freqs: int = 8, include_pi: bool = False, input_dim: int = 3):
        super().__init__()
        frequencies = 2.0 ** torch.arange(num_freqs, dtype=torch.float32)
        if include_pi:
            frequencies = frequencies * math.pi
        self.register_buffer("frequencies", frequencies, persistent=False)
        self.out_dim = input_dim * (2 * num_freqs + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        embed = (x[..., None] * self.frequencies.float()).flatten(-2)  # (..., 3 * num_freqs)
        return torch.cat([x, embed.sin(), embed.cos()], dim=-1)


class MLP(nn.Module):
    def __init__(self, width: int, expand_ratio: int = 4):
        super().__init__()
        self.c_fc = nn.Linear(width, width * expand_ratio)
        self.gelu = nn.GELU()  # exact erf GELU, as the official model
        self.c_proj = nn.Linear(width * expand_ratio, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class _QKNormAttention(nn.Module):
    """Per-head LayerNorm of queries and keys (qk-norm), then SDPA; subclasses split their projections into heads."""

    def __init__(self, heads: int, width: int, qk_norm: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        head_dim = width // heads
        self.q_norm = nn.LayerNorm(head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=norm_eps) if qk_norm else nn.Identity()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q `(B, N, H, d)`, k and v `(B, M, H, d)` -> `(B, N, H * d)`."""
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, N, d)
        return out.transpose(1, 2).flatten(2)


class QKVMultiheadAttention(_QKNormAttention):
    """Splits a per-head interleaved `(B, N, H * 3 * d)` qkv tensor, applies qk-norm and SDPA -> `(B, N, H * d)`."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, length, channels = qkv.shape
        head_dim = channels // (3 * self.heads)
        q, k, v = qkv.view(batch, length, self.heads, 3 * head_dim).split(head_dim, dim=-1)  # 3 x (B, N, H, d)
        return self.attend(q, k, v)


class MultiheadAttention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool = False, qk_norm: bool = True):
        super().__init__()
        self.c_qkv = nn.Linear(width, width * 3, bias=qkv_bias)
        self.c_proj = nn.Linear(width, width)
        self.attention = QKVMultiheadAttention(heads, width, qk_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.attention(self.c_qkv(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN self-attention block: `x += attn(ln_1 x); x += mlp(ln_2 x)`."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = False, qk_norm: bool = True, mlp_expand_ratio: int = 4):
        super().__init__()
        self.attn = MultiheadAttention(width, heads, qkv_bias, qk_norm)
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, mlp_expand_ratio)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of self-attention blocks (no final norm). Supports diffusers gradient checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, qkv_bias: bool = False, qk_norm: bool = True):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, qkv_bias, qk_norm) for _ in range(layers)]
        )
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x)
            else:
                x = block(x)
        return x


class QKVMultiheadCrossAttention(_QKNormAttention):
    """Plain head split of q; per-head interleaved split of `(B, M, H * 2 * d)` kv; qk-norm; SDPA."""

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        batch, length, _ = q.shape
        data_length, channels = kv.shape[1], kv.shape[2]
        head_dim = channels // (2 * self.heads)
        k, v = kv.view(batch, data_length, self.heads, 2 * head_dim).split(head_dim, dim=-1)
        return self.attend(q.view(batch, length, self.heads, head_dim), k, v)


class MultiheadCrossAttention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool = False, qk_norm: bool = True):
        super().__init__()
        self.c_q = nn.Linear(width, width, bias=qkv_bias)
        self.c_kv = nn.Linear(width, width * 2, bias=qkv_bias)
        self.c_proj = nn.Linear(width, width)
        self.attention = QKVMultiheadCrossAttention(heads, width, qk_norm)

    def forward(self, x: torch.Tensor, data: torch.Tensor | None = None, kv: torch.Tensor | None = None):
        """`kv` is `c_kv(data)` when already computed (see `ResidualCrossAttentionBlock.project_data`)."""
        return self.c_proj(self.attention(self.c_q(x), self.c_kv(data) if kv is None else kv))


class ResidualCrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention block: `x += attn(ln_1 x, ln_2 data); x += mlp(ln_3 x)`."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = False, qk_norm: bool = True, mlp_expand_ratio: int = 4):
        super().__init__()
        self.attn = MultiheadCrossAttention(width, heads, qkv_bias, qk_norm)
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.ln_3 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, mlp_expand_ratio)

    def project_data(self, data: torch.Tensor) -> torch.Tensor:
        """`(B, M, width) -> (B, M, 2 * width)` keys and values of `data`: what every query chunk of a volume decoding
        attends to, computed once per object instead of once per chunk (same values: same inputs, same shapes)."""
        return self.attn.c_kv(self.ln_2(data))

    def forward(self, x: torch.Tensor, data: torch.Tensor | None = None, kv: torch.Tensor | None = None):
        x = x + self.attn(self.ln_1(x), kv=self.project_data(data) if kv is None else kv)
        return x + self.mlp(self.ln_3(x))


# ----------------------------------------------------------------------------------------------------------------
# Farthest point sampling
# ----------------------------------------------------------------------------------------------------------------


def farthest_point_sampling(
    points: torch.Tensor, num_samples: int, generator: torch.Generator | None = None, random_start: bool = True
) -> torch.Tensor:
    """Pure-torch farthest point sampling, batched.

    Args:
        points: `(B, P, 3)`.
        num_samples: `S <= P` points to pick.
        generator: draws the start point (like `torch_cluster.fps(random_start=True)`); deterministic given it.
        random_start: if False, every batch element starts at point 0.

    Returns:
        long `(B, S)` indices into `P`. About 0.4 s for 81,920 -> 4,096 on one CPU core: coordinates are kept as
        three contiguous `(B, P)` planes and updated in place, so each of the S steps is a few passes over memory.
        On CPU it runs single-threaded (`single_threaded_torch`): S sequential tiny steps gain nothing from threads
        and stall badly on a busy machine.
    """
    batch, num_points, _ = points.shape
    if not 0 < num_samples <= num_points:
        raise ValueError(f"Cannot pick {num_samples} farthest points out of {num_points}.")
    planes = points.detach().float().permute(2, 0, 1).contiguous()  # (3, B, P)
    x, y, z = planes[0], planes[1], planes[2]
    if random_start:
        gen_device = generator.device if generator is not None else points.device
        current = torch.randint(num_points, (batch, 1), generator=generator, device=gen_device).to(points.device)
    else:
        current = torch.zeros(batch, 1, dtype=torch.long, device=points.device)
    indices = torch.empty(batch, num_samples, dtype=torch.long, device=points.device)
    min_dist = torch.full((batch, num_points), float("inf"), device=points.device)
    dist, tmp = torch.empty_like(min_dist), torch.empty_like(min_dist)
    with single_threaded_torch(enabled=points.device.type == "cpu"):
        for step in range(num_samples):
            indices[:, step] = current[:, 0]
            # min_dist = min(min_dist, |p - p_current|^2), without allocating.
            torch.sub(x, x.gather(1, current), out=dist)
            dist.mul_(dist)
            torch.sub(y, y.gather(1, current), out=tmp)
            dist.addcmul_(tmp, tmp)
            torch.sub(z, z.gather(1, current), out=tmp)
            dist.addcmul_(tmp, tmp)
            torch.minimum(min_dist, dist, out=min_dist)
            current = min_dist.argmax(dim=1, keepdim=True)
    return indices


# ----------------------------------------------------------------------------------------------------------------
# Encoder and geometry decoder
# ----------------------------------------------------------------------------------------------------------------


class PointCrossAttentionEncoder(nn.Module):
    """Surface points -> `(B, L, W)` latent features.

    The last `pc_sharpedge_size` rows of the input are the sharp-edge pool, the others the uniform pool. Queries are
    split between the pools in proportion to `pc_size : pc_sharpedge_size`; for each pool, `n_queries *
    downsample_ratio` points (or the whole pool if it is smaller) are drawn at random to serve as keys/values, and
    the `n_queries` queries are their farthest point sample. Queries and data go through the same `input_proj`.
    """

    def __init__(
        self,
        fourier_embedder: FourierEmbedder,
        point_feats: int,
        width: int,
        heads: int,
        layers: int,
        pc_size: int,
        pc_sharpedge_size: int,
        downsample_ratio: int,
        qkv_bias: bool = False,
        qk_norm: bool = True,
        use_ln_post: bool = True,
    ):
        super().__init__()
        self.fourier_embedder = fourier_embedder
        self.pc_size = pc_size
        self.pc_sharpedge_size = pc_sharpedge_size
        self.downsample_ratio = downsample_ratio
        self.input_proj = nn.Linear(fourier_embedder.out_dim + point_feats, width)
        self.cross_attn = ResidualCrossAttentionBlock(width, heads, qkv_bias, qk_norm)
        self.self_attn = Transformer(width, layers, heads, qkv_bias, qk_norm)
        self.ln_post = nn.LayerNorm(width) if use_ln_post else None  # default eps 1e-5, as the official model

    def _embed(self, points: torch.Tensor) -> torch.Tensor:
        """Float32 points `(B, P, 3 + F)` -> `(B, P, W)` in the projection's dtype (Fourier features in float32)."""
        features = torch.cat([self.fourier_embedder(points[..., :3]), points[..., 3:].float()], dim=-1)
        return self.input_proj(features.to(self.input_proj.weight.dtype))

    def sample_queries(
        self, surface: torch.Tensor, num_latents: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`surface (B, P, C)` -> `(queries (B, num_latents, C), data (B, P', C))`, raw points (not embedded)."""
        num_sharp_pool = self.pc_sharpedge_size
        pools = [surface[:, : surface.shape[1] - num_sharp_pool], surface[:, surface.shape[1] - num_sharp_pool :]]
        num_sharp_queries = int(round(num_latents * self.pc_sharpedge_size / (self.pc_size + self.pc_sharpedge_size)))
        num_queries = [num_latents - num_sharp_queries, num_sharp_queries]

        queries, data = [], []
        for pool, count, name in zip(pools, num_queries, ("uniform", "sharp-edge")):
            if count == 0:
                continue
            pool_size = pool.shape[1]
            if pool_size < count:
                raise ValueError(
                    f"The {name} pool has {pool_size} points but {count} of the {num_latents} latent queries come "
                    f"from it; pass more surface points (pc_size={self.pc_size}, "
                    f"pc_sharpedge_size={self.pc_sharpedge_size}, downsample_ratio={self.downsample_ratio})."
                )
            # One random subset shared by the batch (as the official encoder), then FPS inside it.
            gen_device = generator.device if generator is not None else pool.device
            keep = torch.randperm(pool_size, generator=generator, device=gen_device).to(pool.device)
            subset = pool[:, keep[: min(pool_size, count * self.downsample_ratio)]]
            picked = farthest_point_sampling(subset[..., :3], count, generator=generator)  # (B, count)
            queries.append(torch.gather(subset, 1, picked[..., None].expand(-1, -1, subset.shape[-1])))
            data.append(subset)
        return torch.cat(queries, dim=1), torch.cat(data, dim=1)

    def forward(
        self, surface: torch.Tensor, num_latents: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        queries, data = self.sample_queries(surface, num_latents, generator)
        latents = self.cross_attn(self._embed(queries), self._embed(data))  # (B, L, W)
        latents = self.self_attn(latents)
        return self.ln_post(latents) if self.ln_post is not None else latents


class CrossAttentionDecoder(nn.Module):
    """Query xyz `(B, Q, 3)` + decoded features `(B, N, W)` -> field logits `(B, Q, 1)`, positive inside."""

    def __init__(
        self,
        fourier_embedder: FourierEmbedder,
        width: int,
        heads: int,
        mlp_expand_ratio: int = 4,
        qkv_bias: bool = False,
        qk_norm: bool = True,
        use_ln_post: bool = True,
    ):
        super().__init__()
        self.fourier_embedder = fourier_embedder
        self.query_proj = nn.Linear(fourier_embedder.out_dim, width)
        # The official decoder turns qk-norm off together with ln_post.
        self.cross_attn_decoder = ResidualCrossAttentionBlock(
            width, heads, qkv_bias, qk_norm and use_ln_post, mlp_expand_ratio
        )
        self.ln_post = nn.LayerNorm(width) if use_ln_post else None
        self.output_proj = nn.Linear(width, 1)

    def forward(self, queries: torch.Tensor, latents: torch.Tensor, latent_kv: torch.Tensor | None = None):
        """Queries `(B, Q, 3)`, latents `(B, M, width)` -> logits `(B, Q, 1)`; `latent_kv` =
        `cross_attn_decoder.project_data(latents)` when already computed."""
        # `queries` stay float32 up to the Fourier features (see `FourierEmbedder`).
        x = self.query_proj(self.fourier_embedder(queries).to(self.query_proj.weight.dtype))
        x = self.cross_attn_decoder(x, latents, kv=latent_kv)
        if self.ln_post is not None:
            x = self.ln_post(x)
        return self.output_proj(x)


# ----------------------------------------------------------------------------------------------------------------
# Posterior and outputs
# ----------------------------------------------------------------------------------------------------------------


class DiagonalGaussianDistribution:
    """Gaussian posterior over latents, from `moments (B, N, 2 * C)` = `[mean, logvar]` on the last dim."""

    def __init__(self, moments: torch.Tensor):
        self.parameters = moments
        self.mean, logvar = moments.chunk(2, dim=-1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """Per-sample KL divergence to `other` (default: the standard normal), **averaged** over the latent rows and
        channels -> `(B,)`. Averaging keeps `kl_weight` comparable across `num_latents`."""
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            kl = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            kl = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * kl.mean(dim=dims)


@dataclass
class ShapeVAELossOutput(BaseOutput):
    """Output of `ShapeVAE.compute_loss`.

    Args:
        loss: `recon_loss + kl_weight * kl_loss` (scalar).
        recon_loss: BCE-with-logits on occupancy (or MSE on an inside-positive SDF).
        kl_loss: mean KL of the posterior to N(0, I) (scalar).
        logits: predicted field at the query points, `(B, Q)`.
        latents: the (sampled) latents that were decoded, `(B, N, embed_dim)`.
    """

    loss: torch.Tensor
    recon_loss: torch.Tensor
    kl_loss: torch.Tensor
    logits: torch.Tensor | None = None
    latents: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------------------


#: Where `from_hunyuan3d` weights come from (their licence: Tencent Hunyuan 3D 2.1 Community License).
HUNYUAN3D_RELEASE = "tencent/Hunyuan3D-2.1"

_WEIGHT_FILES = ("model.fp16.safetensors", "model.safetensors", "model.fp16.ckpt", "model.ckpt")


def _reporting_field(field: Callable[[torch.Tensor], torch.Tensor], report: Callable[[int], object]):
    """`field` that also reports how many points each call evaluated."""

    def reporting(xyz: torch.Tensor) -> torch.Tensor:
        values = field(xyz)
        report(len(xyz))
        return values

    return reporting


class ShapeVAE(ModelMixin, ConfigMixin):
    r"""Hunyuan3D-2.1-compatible 3D shape VAE (vector-set latents, cross-attention encoder and field decoder).

    Defaults are the released `hunyuan3d-vae-v2-1` configuration (327.7M parameters). Every size is a config field,
    so tiny random models work the same way.

    Args:
        num_latents: default number of latent rows `N` (can be changed per `encode` call; the decoder has no
            positional embedding, so any N decodes).
        embed_dim: latent channels `C`.
        width, heads: transformer width and attention heads (head dim = width / heads).
        num_encoder_layers, num_decoder_layers: self-attention blocks after the encoder cross-attention and in the
            decoder `transformer`.
        num_freqs, include_pi: Fourier features of xyz.
        qkv_bias, qk_norm: bias of the fused q/kv/qkv projections; per-head LayerNorm on q and k.
        point_feats: input channels besides xyz (normal + sharp flag = 4; 3 for normals only).
        pc_size, pc_sharpedge_size: sizes of the uniform and sharp-edge point pools the encoder expects; they set
            how the latent queries are shared between the pools.
        downsample_ratio: surface points per latent query fed to the encoder cross-attention (20).
        geo_decoder_mlp_expand_ratio, geo_decoder_ln_post, use_ln_post: geometry decoder MLP ratio; final norms.
        with_encoder: False for decoder-only checkpoints (Hunyuan3D-2.0 `hunyuan3d-vae-v2-0`).
        scale_factor: multiply latents by it before diffusion, divide before decoding (not applied here).
        weights_source: Hub id of the release the weights come from (`from_hunyuan3d` sets `tencent/Hunyuan3D-2.1`);
            None for a VAE trained with this package. Model cards take the licence of a folder from it.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResidualAttentionBlock", "ResidualCrossAttentionBlock"]
    # The public methods (`encode`, `decode`, `query`, `latents_to_mesh`, ...) carry diffusers' `apply_forward_hook`,
    # so that a pipeline's `enable_model_cpu_offload()` moves the VAE to the accelerator when any of them is called,
    # not only `forward`.

    @register_to_config
    def __init__(
        self,
        num_latents: int = 4096,
        embed_dim: int = 64,
        width: int = 1024,
        heads: int = 16,
        num_encoder_layers: int = 8,
        num_decoder_layers: int = 16,
        num_freqs: int = 8,
        include_pi: bool = False,
        qkv_bias: bool = False,
        qk_norm: bool = True,
        point_feats: int = 4,
        pc_size: int = 81920,
        pc_sharpedge_size: int = 0,
        downsample_ratio: int = 20,
        geo_decoder_mlp_expand_ratio: int = 4,
        geo_decoder_ln_post: bool = True,
        use_ln_post: bool = True,
        with_encoder: bool = True,
        scale_factor: float = 1.0039506158752403,
        weights_source: str | None = None,
    ):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads}).")
        if min(num_latents, embed_dim, width, heads, downsample_ratio, pc_size) <= 0:
            raise ValueError("num_latents, embed_dim, width, heads, downsample_ratio and pc_size must be positive.")
        if pc_sharpedge_size < 0 or num_encoder_layers < 0 or num_decoder_layers < 0:
            raise ValueError("pc_sharpedge_size and the layer counts must be non-negative.")

        self.fourier_embedder = FourierEmbedder(num_freqs=num_freqs, include_pi=include_pi)
        self.encoder = (
            PointCrossAttentionEncoder(
                self.fourier_embedder,
                point_feats=point_feats,
                width=width,
                heads=heads,
                layers=num_encoder_layers,
                pc_size=pc_size,
                pc_sharpedge_size=pc_sharpedge_size,
                downsample_ratio=downsample_ratio,
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                use_ln_post=use_ln_post,
            )
            if with_encoder
            else None
        )
        self.pre_kl = nn.Linear(width, embed_dim * 2) if with_encoder else None
        self.post_kl = nn.Linear(embed_dim, width)
        self.transformer = Transformer(width, num_decoder_layers, heads, qkv_bias, qk_norm)
        self.geo_decoder = CrossAttentionDecoder(
            self.fourier_embedder,
            width=width,
            heads=heads,
            mlp_expand_ratio=geo_decoder_mlp_expand_ratio,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            use_ln_post=geo_decoder_ln_post,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_surface(self, surface: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Checks `(B, P, 3 + point_feats)`; a 6-channel input with `point_feats == 4` gets the sharp flag appended
        (1 on the last `pc_sharpedge_size` rows, the sharp pool; 0 elsewhere), as Hunyuan3D's data loader does."""
        surface = torch.as_tensor(surface)
        if surface.ndim == 2:
            surface = surface[None]
        expected = 3 + self.config.point_feats
        if surface.ndim != 3:
            raise ValueError(f"surface must be (B, P, {expected}), got shape {tuple(surface.shape)}.")
        if surface.shape[-1] == expected - 1 and self.config.point_feats == 4:
            flag = torch.zeros(*surface.shape[:2], 1, dtype=surface.dtype, device=surface.device)
            if self.config.pc_sharpedge_size > 0:
                flag[:, -self.config.pc_sharpedge_size :] = 1.0
            surface = torch.cat([surface, flag], dim=-1)
        if surface.shape[-1] != expected:
            raise ValueError(
                f"surface has {surface.shape[-1]} channels, expected {expected} (xyz + {self.config.point_feats} "
                "point features: normal and sharp-edge flag)."
            )
        if surface.shape[1] <= self.config.pc_sharpedge_size:
            raise ValueError(
                f"surface has {surface.shape[1]} points but pc_sharpedge_size={self.config.pc_sharpedge_size} of them "
                "are reserved for the sharp-edge pool; no uniform points are left."
            )
        # Float32 whatever the model dtype: the random subset, farthest point sampling and the Fourier features read
        # the coordinates; half precision would move the picked queries (bfloat16 steps are 2^-8 near 1).
        return surface.to(device=self.execution_device, dtype=torch.float32)

    @property
    def execution_device(self) -> torch.device:
        """The device the computation runs on: the parameters' device, or, under accelerate's sequential CPU offload
        (parameters on the `meta` device, loaded per submodule), the offload hooks' execution device."""
        device = self.device
        if device.type != "meta":
            return device
        for module in self.modules():
            hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if hook_device is not None:
                return torch.device(hook_device)
        return device

    @apply_forward_hook
    def encode(
        self,
        surface: torch.Tensor | np.ndarray,
        num_latents: int | None = None,
        generator: torch.Generator | None = None,
    ) -> DiagonalGaussianDistribution:
        """Surface point cloud -> posterior over latents.

        Args:
            surface: `(B, P, 7)` rows `[x, y, z, nx, ny, nz, sharp]` in the VAE cube (see `mesh_utils.sample_surface`;
                uniform points first, the last `pc_sharpedge_size` rows the sharp pool). `(B, P, 6)` is accepted.
            num_latents: latent rows `N`; defaults to `config.num_latents`. The encoder then attends to
                `N * downsample_ratio` random surface points per pool (or the whole pool, if smaller).
            generator: makes the random subset, the FPS start points and `posterior.sample(generator)` reproducible.

        Returns:
            `DiagonalGaussianDistribution`; `.sample(generator)` / `.mode()` are `(B, N, embed_dim)` latents.
        """
        if self.encoder is None:
            raise ValueError("This ShapeVAE has no encoder (with_encoder=False, e.g. a decoder-only checkpoint).")
        num_latents = int(self.config.num_latents if num_latents is None else num_latents)
        if num_latents <= 0:
            raise ValueError(f"num_latents must be positive, got {num_latents}.")
        surface = self._prepare_surface(surface)
        features = self.encoder(surface, num_latents, generator)  # (B, N, W)
        return DiagonalGaussianDistribution(self.pre_kl(features))  # moments (B, N, 2C)

    # ------------------------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------------------------

    @apply_forward_hook
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `(B, N, embed_dim)` (unscaled) -> decoder features `(B, N, width)`: `post_kl` + `transformer`."""
        if latents.ndim != 3 or latents.shape[-1] != self.config.embed_dim:
            raise ValueError(
                f"latents must be (B, N, {self.config.embed_dim}), got shape {tuple(latents.shape)}."
            )
        return self.transformer(self.post_kl(latents.to(device=self.execution_device, dtype=self.dtype)))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Same as `decode`, as in the official model."""
        return self.decode(latents)

    @apply_forward_hook
    def query(self, features: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """Field at query points: features `(B, N, width)` from `decode`, xyz `(B, Q, 3)` or `(Q, 3)` (shared by the
        batch) -> logits `(B, Q)`, positive inside the shape; the surface is the 0 level."""
        return self._query(features, xyz)

    def _query(self, features: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """`query` without the offload hook (called per chunk by `field_fn`, after a hooked entry point)."""
        xyz = torch.as_tensor(xyz, device=features.device)
        if xyz.ndim == 2:
            xyz = xyz[None].expand(features.shape[0], -1, -1)
        if xyz.ndim != 3 or xyz.shape[-1] != 3 or xyz.shape[0] != features.shape[0]:
            raise ValueError(
                f"xyz must be (Q, 3) or (B={features.shape[0]}, Q, 3), got shape {tuple(xyz.shape)}."
            )
        return self.geo_decoder(xyz.float(), features).squeeze(-1)

    def field_fn(self, features: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Returns `f(xyz (Q, 3)) -> (Q,)` for one object, features `(1, N, width)` or `(N, width)`, for
        `volume_decoding`. Runs without autograd."""
        if features.ndim == 2:
            features = features[None]
        if features.shape[0] != 1:
            raise ValueError(f"field_fn takes the features of one object, got batch size {features.shape[0]}.")

        decoder = self.geo_decoder
        with torch.no_grad():  # the latents' keys / values are the same for every chunk of queries: once per object
            latent_kv = decoder.cross_attn_decoder.project_data(features)

        @torch.no_grad()
        def field(xyz: torch.Tensor) -> torch.Tensor:
            xyz = torch.as_tensor(xyz, device=features.device)[None].float()
            return decoder(xyz, features, latent_kv=latent_kv)[0, :, 0].float().cpu()

        return field

    @staticmethod
    def check_mesh_settings(octree_resolution: int, method: str = "hierarchical") -> int:
        """Raises `ValueError` if `features_to_mesh` cannot run with these settings: an octree resolution that is not
        an integer of at least 1 (any integral type, e.g. `np.int64`, but not a bool), an unknown method, or a grid
        that cannot fit in the memory available now (`volume_decoding.check_grid_memory`). Returns the resolution as
        a plain `int`. Pipelines call it before denoising, so that a bad setting fails before the work, not after."""
        if (
            not isinstance(octree_resolution, numbers.Integral)
            or isinstance(octree_resolution, bool)
            or octree_resolution < 1
        ):
            raise ValueError(f"`octree_resolution` must be a positive integer, got {octree_resolution!r}.")
        octree_resolution = int(octree_resolution)
        grid_memory_bytes(octree_resolution, method)  # names an unknown method
        check_grid_memory(octree_resolution, method)
        return octree_resolution

    @torch.no_grad()
    @apply_forward_hook
    def latents_to_mesh(self, latents: torch.Tensor, **mesh_kwargs) -> list[trimesh.Trimesh]:
        """Latents `(B, N, embed_dim)` (unscaled: divide diffusion latents by `config.scale_factor` first) -> one
        `trimesh.Trimesh` per object, outward-facing, in the VAE cube: `features_to_mesh(decode(latents), ...)`,
        with the same keyword arguments (`octree_resolution`, `mc_level`, `band`, ...)."""
        return self.features_to_mesh(self.decode(latents), **mesh_kwargs)

    @torch.no_grad()
    @apply_forward_hook
    def features_to_mesh(
        self,
        features: torch.Tensor,
        octree_resolution: int = 256,
        mc_level: float = 0.0,
        band: float | None = 0.95,
        progress_callback: Callable[[int], object] | None = None,
        **field_kwargs,
    ) -> list[trimesh.Trimesh]:
        """Decoded features `(B, N, width)` (the output of `decode`) -> one `trimesh.Trimesh` per object.

        Args:
            octree_resolution: grid cells per axis R (the grid has R + 1 samples per axis).
            mc_level: iso-level of the positive-inside field.
            band: hierarchical decoding only: also refine coarse cells whose logit is within `band` of `mc_level`
                (FlashVDM's `|logit| < 0.95`), so that small parts no coarse grid point falls inside are not lost;
                `None` refines sign changes only (fewest queries).
            progress_callback: called with the number of points after every chunk of field queries (e.g. a tqdm
                bar's `update`).
            **field_kwargs: forwarded to `volume_decoding.field_to_mesh`: `bounds` (half size of the decoded box,
                Hunyuan3D's 1.01, or `(xmin, ymin, zmin, xmax, ymax, zmax)`), `num_chunks` (query points per
                geometry-decoder call, default 8000), `method` (`"hierarchical"`, the default: coarse-to-fine, only
                near-surface cells, same mesh as `"dense"`), `remove_floaters` (drop components below 0.5% of the
                faces, or below the given ratio), `max_faces` (decimate; needs `pip install fast-simplification`),
                `hunyuan_vertex_scale` (reproduce the official `/(R + 1)` vertex mapping quirk for bit-parity).
        """
        if field_kwargs.get("method", "hierarchical") == "hierarchical":
            field_kwargs["band"] = band
        meshes = []
        for index in range(features.shape[0]):
            field = self.field_fn(features[index : index + 1])
            if progress_callback is not None:
                field = _reporting_field(field, progress_callback)
            mesh = field_to_mesh(field, resolution=octree_resolution, level=mc_level, **field_kwargs)
            if len(mesh.faces) == 0:
                logger.warning(f"The field of object {index} never crosses mc_level={mc_level}; empty mesh returned.")
            meshes.append(mesh)
        return meshes

    # ------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------

    @apply_forward_hook
    def compute_loss(
        self,
        surface: torch.Tensor | np.ndarray,
        query_points: torch.Tensor | np.ndarray,
        query_labels: torch.Tensor | np.ndarray,
        kl_weight: float = 1e-3,
        num_latents: int | None = None,
        generator: torch.Generator | None = None,
        sample_posterior: bool = True,
        label_type: str = "occupancy",
        sdf_clamp: float | None = None,
        sdf_loss: str = "mse",
    ) -> ShapeVAELossOutput:
        """Reconstruction + KL loss for training or fine-tuning the VAE.

        Args:
            surface: `(B, P, 7)` encoder input (see `encode`).
            query_points: `(B, Q, 3)` supervision points, e.g. near-surface + uniform from
                `mesh_utils.sample_sdf_points`.
            query_labels: `(B, Q)`: occupancy in {0, 1} (1 inside) for `label_type="occupancy"`, or an
                inside-positive signed distance for `label_type="sdf"`.
            kl_weight: weight of the KL term (mean per latent element). Hunyuan did not publish theirs; 1e-3 is the
                3DShape2VecSet / Michelangelo value.
            num_latents, generator: as in `encode`.
            sample_posterior: decode a posterior sample (training) or its mean.
            label_type: `"occupancy"` -> binary cross-entropy on the logits (Hunyuan's `label_type="binary"`
                heritage); `"sdf"` -> regression of the field (Hunyuan3D-2.1's released data is SDF).
            sdf_clamp: `"sdf"` only: clamp prediction and label to `[-sdf_clamp, sdf_clamp]` before the loss
                (DeepSDF): far from the surface only the sign is supervised, so the capacity goes to the band that
                marching cubes reads. `None` regresses the raw field.
            sdf_loss: `"sdf"` only: `"mse"` or `"l1"` (DeepSDF's choice; it weighs the small errors near the
                surface, which decide where the 0 level lies, more than the squared error does).
        """
        if label_type not in ("occupancy", "sdf"):
            raise ValueError(f"label_type must be 'occupancy' or 'sdf', got {label_type!r}.")
        if sdf_loss not in ("mse", "l1"):
            raise ValueError(f"sdf_loss must be 'mse' or 'l1', got {sdf_loss!r}.")
        if sdf_clamp is not None and not sdf_clamp > 0:
            raise ValueError(f"sdf_clamp must be a positive distance or None, got {sdf_clamp}.")
        device = self.execution_device
        query_points = torch.as_tensor(query_points, device=device, dtype=torch.float32)
        query_labels = torch.as_tensor(query_labels, device=device, dtype=self.dtype)
        if query_points.ndim != 3 or query_points.shape[-1] != 3:
            raise ValueError(f"query_points must be (B, Q, 3), got shape {tuple(query_points.shape)}.")
        if query_labels.shape != query_points.shape[:2]:
            raise ValueError(
                f"query_labels must be (B, Q) = {tuple(query_points.shape[:2])}, got shape {tuple(query_labels.shape)}."
            )

        posterior = self.encode(surface, num_latents=num_latents, generator=generator)
        if posterior.mean.shape[0] != query_points.shape[0]:
            raise ValueError(
                f"surface has batch size {posterior.mean.shape[0]} but query_points has {query_points.shape[0]}."
            )
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        logits = self.query(self.decode(latents), query_points)  # (B, Q)
        if label_type == "occupancy":
            recon_loss = F.binary_cross_entropy_with_logits(logits.float(), query_labels.float())
        else:
            prediction, target = logits.float(), query_labels.float()
            if sdf_clamp is not None:
                prediction, target = prediction.clamp(-sdf_clamp, sdf_clamp), target.clamp(-sdf_clamp, sdf_clamp)
            recon_loss = (F.mse_loss if sdf_loss == "mse" else F.l1_loss)(prediction, target)
        kl_loss = posterior.kl().float().mean()
        loss = recon_loss + kl_weight * kl_loss
        return ShapeVAELossOutput(loss=loss, recon_loss=recon_loss, kl_loss=kl_loss, logits=logits, latents=latents)

    # ------------------------------------------------------------------------------------------------------------
    # Loading official Hunyuan3D checkpoints
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def read_hunyuan3d_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """Reads the VAE state dict from an official file: a flat `.ckpt` (`torch.save` of an OrderedDict, loaded
        with `weights_only=True`), a dict nested under `"state_dict"`, the `"vae"` entry of a DiT/pipeline `.ckpt`,
        or a `.safetensors` file, flat or with `vae.`-prefixed keys (other prefixes are ignored)."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
        if isinstance(state_dict, dict) and isinstance(state_dict.get("vae"), dict):
            state_dict = state_dict["vae"]
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path} does not contain a state dict (got {type(state_dict).__name__}).")
        if any(key.startswith("vae.") for key in state_dict):
            state_dict = {key[len("vae.") :]: value for key, value in state_dict.items() if key.startswith("vae.")}
        not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
        if not_tensors:
            raise ValueError(f"{path} has non-tensor entries where VAE weights were expected: {not_tensors[:10]}.")
        return state_dict

    @staticmethod
    def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
        """Config fields implied by the tensor shapes (width, embed_dim, layers, heads if qk-norm, Fourier size,
        point_feats, biases, norms, encoder presence). `num_latents`, `pc_size` etc. are not visible in weights."""
        def layer_count(prefix: str) -> int:
            ids = {int(key[len(prefix) :].split(".")[0]) for key in state_dict if key.startswith(prefix)}
            return max(ids) + 1 if ids else 0

        if "post_kl.weight" not in state_dict or "geo_decoder.query_proj.weight" not in state_dict:
            raise ValueError(
                "The state dict is not a Hunyuan3D ShapeVAE: 'post_kl.weight' or 'geo_decoder.query_proj.weight' is "
                f"missing (first keys: {sorted(state_dict)[:5]})."
            )
        width, embed_dim = state_dict["post_kl.weight"].shape
        fourier_dim = state_dict["geo_decoder.query_proj.weight"].shape[1]
        config = {
            "width": int(width),
            "embed_dim": int(embed_dim),
            "num_decoder_layers": layer_count("transformer.resblocks."),
            "num_freqs": int((fourier_dim // 3 - 1) // 2),
            "qk_norm": "geo_decoder.cross_attn_decoder.attn.attention.q_norm.weight" in state_dict
            or "transformer.resblocks.0.attn.attention.q_norm.weight" in state_dict,
            "qkv_bias": "geo_decoder.cross_attn_decoder.attn.c_q.bias" in state_dict,
            "geo_decoder_ln_post": "geo_decoder.ln_post.weight" in state_dict,
            "geo_decoder_mlp_expand_ratio": int(
                state_dict["geo_decoder.cross_attn_decoder.mlp.c_fc.weight"].shape[0] // width
            )
            if "geo_decoder.cross_attn_decoder.mlp.c_fc.weight" in state_dict
            else 4,
            "with_encoder": any(key.startswith("encoder.") for key in state_dict),
        }
        for key in (
            "transformer.resblocks.0.attn.attention.q_norm.weight",
            "geo_decoder.cross_attn_decoder.attn.attention.q_norm.weight",
            "encoder.cross_attn.attn.attention.q_norm.weight",
        ):
            if key in state_dict:
                config["heads"] = int(width // state_dict[key].shape[0])
                break
        if config["with_encoder"]:
            config["num_encoder_layers"] = layer_count("encoder.self_attn.resblocks.")
            config["use_ln_post"] = "encoder.ln_post.weight" in state_dict
            if "encoder.input_proj.weight" in state_dict:
                config["point_feats"] = int(state_dict["encoder.input_proj.weight"].shape[1] - fourier_dim)
        return config

    def load_state_dict_strict(
        self, state_dict: dict[str, torch.Tensor], source: str = "state dict", assign: bool = False
    ) -> None:
        """Loads with exact key and shape matching; raises `ValueError` listing every difference. `assign=True`
        adopts the given tensors (needed when the model was built on the meta device)."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        mismatched = sorted(
            f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
            for key in set(own) & set(state_dict)
            if state_dict[key].shape != own[key].shape
        )
        if missing or unexpected or mismatched:
            lines = [f"Cannot load {source} into ShapeVAE strictly:"]
            problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
            for title, items in problems:
                if items:
                    more = " ..." if len(items) > 20 else ""
                    lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20]) + more)
            raise ValueError("\n".join(lines))
        self.load_state_dict(state_dict, strict=True, assign=assign)

    @classmethod
    def from_hunyuan3d(
        cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None, **config_overrides
    ) -> ShapeVAE:
        """Builds a ShapeVAE from an official Hunyuan3D VAE checkpoint and loads it strictly.

        Args:
            path: a weight file (`model.fp16.ckpt`, `*.safetensors`, a DiT `model.fp16.ckpt` with a `"vae"` entry, a
                pipeline safetensors with `vae.` keys) or a folder holding `config.yaml` and `model[.fp16].{safetensors,
                ckpt}` (as `hunyuan3d-vae-v2-1/`).
            torch_dtype: dtype of the returned model (default float32; the released weights are fp16).
            config_overrides: config fields that win over everything else (e.g. `weights_source="tencent/Hunyuan3D-2"`
                for 2.0 weights; the default records `tencent/Hunyuan3D-2.1`).

        Config precedence: 2.1 defaults < `params` of a `config.yaml` next to the weights < shapes inferred from the
        tensors < `config_overrides`.
        """
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            found = [folder / name for name in _WEIGHT_FILES if (folder / name).is_file()]
            if not found:
                raise ValueError(f"No Hunyuan3D VAE weights in {folder} (looked for {', '.join(_WEIGHT_FILES)}).")
            path = found[0]
        elif not path.is_file():
            raise ValueError(f"Hunyuan3D checkpoint {path} does not exist.")

        config = {}
        yaml_path = folder / "config.yaml"
        if yaml_path.is_file():
            import yaml

            with open(yaml_path) as handle:
                params = (yaml.safe_load(handle) or {}).get("params", {}) or {}
            if int(params.get("geo_decoder_downsample_ratio", 1)) != 1:
                raise ValueError(f"{yaml_path}: geo_decoder_downsample_ratio != 1 is not supported.")
            known = set(cls._get_init_keys(cls)) - {"self"}
            config.update({key: value for key, value in params.items() if key in known})

        state_dict = cls.read_hunyuan3d_state_dict(path)
        config.update(cls.config_from_state_dict(state_dict))
        config["weights_source"] = HUNYUAN3D_RELEASE  # the licence of these weights goes with every copy
        config.update(config_overrides)
        try:  # skip the random init of ~330M parameters that the checkpoint overwrites anyway
            from accelerate import init_empty_weights
        except ImportError:
            model = cls(**config)
            model.load_state_dict_strict(state_dict, source=str(path))
        else:
            with init_empty_weights():  # parameters on "meta"; buffers (Fourier frequencies) stay real
                model = cls(**config)
            model.load_state_dict_strict(state_dict, source=str(path), assign=True)
        # nn.Module.to: ModelMixin.to warns about `_keep_in_fp32_modules` on every dtype cast, even with none.
        return nn.Module.to(model, torch_dtype or torch.float32)


__all__ = [
    "DiagonalGaussianDistribution",
    "FourierEmbedder",
    "ShapeVAE",
    "ShapeVAELossOutput",
    "farthest_point_sampling",
]
