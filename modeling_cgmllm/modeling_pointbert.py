"""PointBERT: the point-cloud encoder of the official CG-MLLM 3D-understanding path (PointLLM's `point_bert_v1.1.pt`).

    (B, P, 3 + extra) normalised points
      ─ farthest point sampling: num_group centres (deterministic, first centre = point 0)
      ─ k nearest neighbours: (B, G, group_size) groups, xyz relative to the centre, extra channels (rgb) as they are
      ─ mini-PointNet per group (conv-BN-ReLU-conv, max, concat, conv-BN-ReLU-conv, max) ─▶ (B, G, encoder_dims)
      ─ reduce_dim ─▶ (B, G, trans_dim); cls token prepended; position MLP of the centres (+ learned cls position)
      ─ depth x pre-norm transformer blocks, positions added before every block ─▶ final LayerNorm
    ─▶ (B, 1 + G, trans_dim), cls token first.

Module names follow PointLLM's `PointTransformer` so that its checkpoint loads key for key
([`PointBERTEncoder.from_pointllm`]). Pure torch: no CUDA ops. PointLLM's own pure-torch farthest point sampling
starts at a random point and the CUDA op at point 0; this encoder starts at `config.fps_start_index` (0), so the
same cloud always gives the same features.

This file imports nothing from the package: it is copied next to a saved pipeline as remote code.
"""

import os
import pickle
import re

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init


# PointLLM YAML names (`PointTransformer_base_8192point.yaml`) accepted by `from_pointllm`, with CG-MLLM's values.
POINTLLM_CONFIG_NAMES = ("trans_dim", "depth", "num_heads", "group_size", "num_group", "encoder_dims", "point_dims")
POINTLLM_STATE_DICT_PREFIX = "module.point_encoder."


@strict
class PointBERTConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PointBERTEncoder`]. The defaults are PointLLM's `PointTransformer_base_8192point.yaml` with
    the 6 input channels (xyz + rgb) CG-MLLM uses.

    Args:
        trans_dim (`int`, defaults to 1152): transformer width (and output feature size).
        depth (`int`, defaults to 12): transformer blocks.
        num_heads (`int`, defaults to 12): attention heads.
        group_size (`int`, defaults to 48): points per group (k nearest neighbours of a centre).
        num_group (`int`, defaults to 512): groups (farthest-point-sampled centres) = output tokens after the cls.
        encoder_dims (`int`, defaults to 512): width of the per-group PointNet feature.
        point_dims (`int`, defaults to 6): input channels per point, xyz first.
        mlp_ratio (`float`, defaults to 4.0): MLP width / trans_dim.
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        fps_start_index (`int`, defaults to 0): the first farthest-point-sampling centre.
        initializer_range (`float`, defaults to 0.02): std of the random init (weights are normally loaded).
    """

    model_type = "cgmllm_pointbert"

    trans_dim: int = 1152
    depth: int = 12
    num_heads: int = 12
    group_size: int = 48
    num_group: int = 512
    encoder_dims: int = 512
    point_dims: int = 6
    mlp_ratio: float | int = 4.0
    layer_norm_eps: float = 1e-5
    fps_start_index: int = 0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.trans_dim % self.num_heads != 0:
            raise ValueError(f"`trans_dim` ({self.trans_dim}) must be divisible by `num_heads` ({self.num_heads}).")
        if self.point_dims < 3:
            raise ValueError(f"`point_dims` must be at least 3 (xyz first), got {self.point_dims}.")
        for name in ("depth", "group_size", "num_group", "encoder_dims"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")


def farthest_point_sample(xyz: torch.Tensor, num_samples: int, start_index: int = 0) -> torch.LongTensor:
    """`(B, P, 3)` -> `(B, num_samples)` indices: start at `start_index`, then repeatedly take the point farthest
    (squared Euclidean) from all points taken so far; ties go to the lowest index."""
    batch_size, num_points, _ = xyz.shape
    batch = torch.arange(batch_size, device=xyz.device)
    indices = torch.empty(batch_size, num_samples, dtype=torch.long, device=xyz.device)
    distance = torch.full((batch_size, num_points), float("inf"), dtype=xyz.dtype, device=xyz.device)
    farthest = torch.full((batch_size,), start_index, dtype=torch.long, device=xyz.device)
    for i in range(num_samples):
        indices[:, i] = farthest
        centre = xyz[batch, farthest].unsqueeze(1)
        distance = torch.minimum(distance, (xyz - centre).pow(2).sum(-1))
        farthest = distance.argmax(-1)
    return indices


def group_points(points: torch.Tensor, num_group: int, group_size: int,
                 start_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, P, C)` points (xyz first) -> neighbourhoods `(B, G, group_size, C)` and centres `(B, G, 3)`.

    Centres by farthest point sampling; each group holds the `group_size` points nearest to its centre (itself
    included), xyz relative to the centre, the other channels unchanged. The order inside a group is unspecified
    (the encoder max-pools over it).
    """
    xyz = points[..., :3]
    batch = torch.arange(points.shape[0], device=points.device)[:, None]
    centres = xyz[batch, farthest_point_sample(xyz, num_group, start_index)]
    # |c|^2 + |x|^2 - 2 c.x, the squared distance as PointLLM's kNN computes it (ties resolve the same way).
    sq_dist = (
        centres.pow(2).sum(-1, keepdim=True) + xyz.pow(2).sum(-1).unsqueeze(1) - 2 * centres @ xyz.transpose(1, 2)
    )
    neighbours = sq_dist.topk(group_size, dim=-1, largest=False, sorted=False).indices  # (B, G, k)
    groups = points[batch[..., None], neighbours]  # (B, G, k, C)
    groups = torch.cat([groups[..., :3] - centres.unsqueeze(2), groups[..., 3:]], dim=-1)
    return groups, centres


class PointBERTGroupEncoder(nn.Module):
    """Mini-PointNet over one group: `(B, G, k, C)` -> `(B, G, encoder_dims)` (PointLLM's `Encoder`)."""

    def __init__(self, encoder_dims: int, point_dims: int):
        super().__init__()
        self.encoder_dims = encoder_dims
        self.first_conv = nn.Sequential(
            nn.Conv1d(point_dims, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, encoder_dims, 1)
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        batch_size, num_group, group_size, channels = groups.shape
        x = groups.reshape(batch_size * num_group, group_size, channels).transpose(1, 2)  # (BG, C, k)
        x = self.first_conv(x)  # (BG, 256, k)
        pooled = x.max(dim=2, keepdim=True).values
        x = self.second_conv(torch.cat([pooled.expand(-1, -1, group_size), x], dim=1))  # (BG, encoder_dims, k)
        return x.max(dim=2).values.reshape(batch_size, num_group, self.encoder_dims)


class PointBERTAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch_size, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, no mask
        return self.proj(x.transpose(1, 2).reshape(batch_size, length, dim))


class PointBERTMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PointBERTBlock(nn.Module):
    def __init__(self, config: PointBERTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.trans_dim, eps=config.layer_norm_eps)
        self.attn = PointBERTAttention(config.trans_dim, config.num_heads)
        self.norm2 = nn.LayerNorm(config.trans_dim, eps=config.layer_norm_eps)
        self.mlp = PointBERTMLP(config.trans_dim, int(config.trans_dim * config.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PointBERTTransformer(nn.Module):
    """The block stack; the position embedding is added to the input of every block (PointLLM's
    `TransformerEncoder`, whose `blocks` attribute gives the checkpoint its `blocks.blocks.{i}` names)."""

    def __init__(self, config: PointBERTConfig):
        super().__init__()
        self.blocks = nn.ModuleList([PointBERTBlock(config) for _ in range(config.depth)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointBERTEncoder(PreTrainedModel):
    r"""
    PointBERT features of point clouds, as the official CG-MLLM 3D-understanding path uses them.

    Call it on `(B, P, point_dims)` points normalised as PointLLM's `pc_norm` does (xyz minus its mean, divided by
    the largest radius; rgb in [0, 1] untouched) and get `(B, 1 + num_group, trans_dim)` features, cls token first:
    the last block's output after the final LayerNorm. Load the released encoder with
    [`PointBERTEncoder.from_pointllm`].
    """

    config_class = PointBERTConfig
    config: PointBERTConfig
    base_model_prefix = "point_bert"
    main_input_name = "points"
    _no_split_modules = ["PointBERTBlock"]

    def __init__(self, config: PointBERTConfig):
        super().__init__(config)
        self.encoder = PointBERTGroupEncoder(config.encoder_dims, config.point_dims)
        self.reduce_dim = nn.Linear(config.encoder_dims, config.trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.trans_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, config.trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, config.trans_dim))
        self.blocks = PointBERTTransformer(config)
        self.norm = nn.LayerNorm(config.trans_dim, eps=config.layer_norm_eps)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, PointBERTEncoder):
            init.zeros_(module.cls_token)
            init.normal_(module.cls_pos, std=std)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """`(B, P, point_dims)` normalised points -> `(B, 1 + num_group, trans_dim)` features (cls first)."""
        config = self.config
        if points.ndim != 3 or points.shape[-1] != config.point_dims:
            raise ValueError(
                f"PointBERT expects points of shape (batch, num_points, {config.point_dims}) (xyz first"
                f"{' + rgb' if config.point_dims == 6 else ''}), got {tuple(points.shape)}."
            )
        if points.shape[1] < max(config.num_group, config.group_size):
            raise ValueError(
                f"PointBERT needs at least {max(config.num_group, config.group_size)} points per cloud "
                f"(num_group={config.num_group}, group_size={config.group_size}), got {points.shape[1]}."
            )
        # Sampling and neighbours in float32 (bf16 distances would reorder near ties), the network in its own dtype.
        groups, centres = group_points(points.float(), config.num_group, config.group_size, config.fps_start_index)
        dtype = self.reduce_dim.weight.dtype
        groups, centres = groups.to(dtype), centres.to(dtype)
        tokens = self.reduce_dim(self.encoder(groups))  # (B, G, trans_dim)
        batch_size = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch_size, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch_size, -1, -1), self.pos_embed(centres)], dim=1)
        return self.norm(self.blocks(x, pos))

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pointllm(cls, path: str | os.PathLike, **config_overrides) -> "PointBERTEncoder":
        """Load a PointLLM / ULIP PointBERT checkpoint (e.g. `point_bert_v1.1.pt`).

        The file is a `torch.save` dict whose `state_dict` holds the encoder under `module.point_encoder.`; every
        other key (a ULIP projection, `logit_scale`, ...) is dropped, and the encoder keys must match this module
        exactly (strict). It is read with `torch.load(weights_only=True)`: a file that pickles other objects is
        refused with the name of the object (add it with `torch.serialization.add_safe_globals` if you trust it).

        Args:
            path: the checkpoint file.
            config_overrides: PointLLM YAML names (`trans_dim`, `depth`, `num_heads`, `group_size`, `num_group`,
                `encoder_dims`, `point_dims`) overriding CG-MLLM's values (1152, 12, 12, 48, 512, 512, 6).
        """
        unknown = sorted(set(config_overrides) - set(POINTLLM_CONFIG_NAMES))
        if unknown:
            raise ValueError(f"Unknown PointBERT settings {unknown}; expected PointLLM names {POINTLLM_CONFIG_NAMES}.")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"No PointBERT checkpoint at {path!r}.")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
            if isinstance(error, pickle.UnpicklingError) and refused:
                raise ValueError(
                    f"{path!r} pickles a `{refused.group(1)}` object, which safe loading (torch.load(weights_only="
                    f"True)) refuses. If you trust the file, allow it with "
                    f"`torch.serialization.add_safe_globals([{refused.group(1)}])` and load again."
                ) from error
            raise ValueError(
                f"{path!r} is not a PointLLM PointBERT checkpoint (torch.load failed: {str(error).splitlines()[0]})."
            ) from error
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise ValueError(
                f"{path!r} is not a PointLLM PointBERT checkpoint: expected a dict with a 'state_dict' entry, found "
                f"{found}."
            )
        state_dict = {
            key[len(POINTLLM_STATE_DICT_PREFIX):]: value
            for key, value in checkpoint["state_dict"].items()
            if key.startswith(POINTLLM_STATE_DICT_PREFIX)
        }
        if not state_dict:
            raise ValueError(
                f"{path!r} has no key starting with {POINTLLM_STATE_DICT_PREFIX!r} (its keys start with "
                f"{sorted({k.split('.')[0] for k in checkpoint['state_dict']})[:10]}); it is not a PointLLM PointBERT."
            )
        model = cls(PointBERTConfig(**config_overrides))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        mismatched = [
            f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
            for key, value in state_dict.items()
            if key in expected and tuple(value.shape) != tuple(expected[key].shape)
        ]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{path!r} does not match PointBERT{config_overrides or ''}: missing {missing[:10]}, unexpected "
                f"{unexpected[:10]}, shape mismatches {mismatched[:10]} (pass the PointLLM YAML sizes as "
                "keyword arguments if the file is a different PointBERT)."
            )
        model.load_state_dict(state_dict, strict=True)
        return model.eval()


def normalize_point_cloud(points: torch.Tensor) -> torch.Tensor:
    """PointLLM's `pc_norm` on `(..., P, C)`: xyz minus its mean, divided by the largest distance to that mean;
    other channels unchanged."""
    xyz = points[..., :3] - points[..., :3].mean(dim=-2, keepdim=True)
    radius = xyz.norm(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    return torch.cat([xyz / radius.clamp_min(torch.finfo(xyz.dtype).tiny), points[..., 3:]], dim=-1)


__all__ = [
    "POINTLLM_CONFIG_NAMES",
    "PointBERTConfig",
    "PointBERTEncoder",
    "farthest_point_sample",
    "group_points",
    "normalize_point_cloud",
]
