# Copyright 2026 The CG-MLLM Authors. Apache-2.0.
"""PointNet++ (single-scale grouping) classifier in the layout of Point-E's p-FID feature extractor.

Point-E (openai/point-e, `point_e/evals/pointnet2_cls_ssg.py`, itself adapted from yanx27/Pointnet_Pointnet2_pytorch)
computes p-FID on the features of a ModelNet40 PointNet++ built as `get_model(num_class=40, normal_channel=False,
width_mult=2)`. This module rebuilds that network with the same sub-module and parameter names, so that Point-E's
`pointnet.pt` loads into it unchanged (`torch.load(path)["model_state_dict"]`, 79 state-dict keys), and with the same
floating-point forms where they decide which neighbours fall inside a ball (see `pairwise_squared_distance`).

    xyz [B, 3, N] ─ sa1: FPS 512 centres, ball r=0.2, 32 neighbours, MLP 64w-64w-128w ─▶ [B, 128w, 512]
                  ─ sa2: FPS 128 centres, ball r=0.4, 64 neighbours, MLP 128w-128w-256w ─▶ [B, 256w, 128]
                  ─ sa3: all points, MLP 256w-512w-1024w, max-pool ─▶ [B, 1024w]
                  ─ fc1 / bn1 / relu / drop1 ─▶ [B, 512w] ─ fc2 / bn2 ─▶ features [B, 256w] ─ relu / drop2 / fc3 ─▶ logits

With w = width_mult = 2 the feature vector (`bn2(fc2(x))`, before the ReLU) is 512-d. Point-E's
`PointNetClassifier.feature_dim` says 256; that property is stale, the tensor it returns has 256 * width_mult columns.

Farthest point sampling in eval mode starts cloud b of a batch at point index b (Point-E: `torch.arange(0, B)`), so
a cloud's features depend on its position in its batch; `forward(..., fps_start=...)` takes those start indices
explicitly so that callers can reproduce Point-E's batches of 64 while computing in smaller chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pairwise_squared_distance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distances `[B, N, M]` between `source [B, N, 3]` and `target [B, M, 3]`.

    Uses the expanded form `-2 s.t + |s|^2 + |t|^2`, accumulated in that order, as Point-E does: ball membership is
    decided by comparing these values with r^2, and the exact form `sum((s - t)^2)` moves points across the radius.
    """
    distance = -2 * torch.matmul(source, target.transpose(1, 2))
    distance += source.pow(2).sum(-1).unsqueeze(-1)
    distance += target.pow(2).sum(-1).unsqueeze(-2)
    return distance


def gather_points(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`points [B, N, C]` gathered at `index [B, ...]` -> `[B, ..., C]`."""
    batch = torch.arange(points.shape[0], device=points.device).view(-1, *([1] * (index.dim() - 1)))
    return points[batch, index]


def farthest_point_sample(xyz: torch.Tensor, num_samples: int, start: torch.Tensor) -> torch.Tensor:
    """Indices `[B, num_samples]` of iterative farthest point sampling of `xyz [B, N, 3]` from `start [B]`.

    Each step picks the point farthest (squared Euclidean) from all picked so far; ties go to the lowest index.
    """
    batch, num_points, _ = xyz.shape
    selected = torch.zeros(batch, num_samples, dtype=torch.long, device=xyz.device)
    nearest = torch.full((batch, num_points), 1e10, dtype=xyz.dtype, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    farthest = start.to(device=xyz.device, dtype=torch.long)
    for i in range(num_samples):
        selected[:, i] = farthest
        centre = xyz[rows, farthest].unsqueeze(1)  # [B, 1, 3]
        nearest = torch.minimum(nearest, ((xyz - centre) ** 2).sum(-1))
        farthest = nearest.max(-1)[1]
    return selected


def ball_query(radius: float, num_neighbours: int, xyz: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Indices `[B, S, num_neighbours]` of the first `num_neighbours` points (in index order) of `xyz [B, N, 3]`
    within `radius` of each of `centres [B, S, 3]`; short groups are padded with their first member (a centre is
    one of the points, so every group has one)."""
    num_points = xyz.shape[1]
    outside = pairwise_squared_distance(centres, xyz) > radius**2  # [B, S, N]
    index = torch.arange(num_points, device=xyz.device).expand_as(outside).masked_fill(outside, num_points)
    # The smallest `num_neighbours` indices, ascending; out-of-ball points carry index N and sort last.
    group = index.topk(min(num_neighbours, num_points), dim=-1, largest=False, sorted=True)[0]
    first = group[..., :1].expand_as(group)
    return torch.where(group == num_points, first, group)


class PointNetSetAbstraction(nn.Module):
    """One PointNet++ set-abstraction level: sample centres, group neighbours, shared MLP (1x1 Conv2d + BN + ReLU),
    max-pool over each group. `group_all=True` makes one group of all points around the origin.

    Parameter names (`mlp_convs.{i}`, `mlp_bns.{i}`) are Point-E's.
    """

    def __init__(self, num_centres: int | None, radius: float | None, num_neighbours: int | None, in_channels: int,
                 mlp: list[int], group_all: bool):
        super().__init__()
        self.num_centres = num_centres
        self.radius = radius
        self.num_neighbours = num_neighbours
        self.group_all = group_all
        self.mlp_convs = nn.ModuleList()
        self.mlp_bns = nn.ModuleList()
        channels = in_channels
        for out_channels in mlp:
            self.mlp_convs.append(nn.Conv2d(channels, out_channels, 1))
            self.mlp_bns.append(nn.BatchNorm2d(out_channels))
            channels = out_channels

    def forward(self, xyz: torch.Tensor, features: torch.Tensor | None, fps_start: torch.Tensor | None = None):
        """`xyz [B, 3, N]`, `features [B, D, N]` or None -> `(centres [B, 3, S], pooled [B, D', S])`."""
        xyz = xyz.transpose(1, 2)  # [B, N, 3]
        features = None if features is None else features.transpose(1, 2)  # [B, N, D]
        batch = xyz.shape[0]
        if self.group_all:
            centres = xyz.new_zeros(batch, 1, 3)
            grouped = xyz.unsqueeze(1)  # [B, 1, N, 3]: positions relative to the origin
            if features is not None:
                grouped = torch.cat([grouped, features.unsqueeze(1)], dim=-1)
        else:
            if fps_start is None:
                # Point-E: deterministic start b for row b in eval mode, a random point while training.
                fps_start = (torch.arange(batch, device=xyz.device) if not self.training
                             else torch.randint(0, xyz.shape[1], (batch,), device=xyz.device))
            centres = gather_points(xyz, farthest_point_sample(xyz, self.num_centres, fps_start))  # [B, S, 3]
            neighbours = ball_query(self.radius, self.num_neighbours, xyz, centres)  # [B, S, K]
            grouped = gather_points(xyz, neighbours) - centres.unsqueeze(2)  # [B, S, K, 3]
            if features is not None:
                grouped = torch.cat([grouped, gather_points(features, neighbours)], dim=-1)
        hidden = grouped.permute(0, 3, 2, 1)  # [B, 3 + D, K, S]
        for conv, norm in zip(self.mlp_convs, self.mlp_bns):
            hidden = F.relu(norm(conv(hidden)))
        return centres.transpose(1, 2), hidden.max(dim=2)[0]


class PointNet2ClassifierSSG(nn.Module):
    """Point-E's p-FID classifier: `PointNet2ClassifierSSG(num_classes=40, width_mult=2)` has the parameter names
    and shapes of `point_e.evals.pointnet2_cls_ssg.get_model(num_class=40, normal_channel=False, width_mult=2)`.

    Input: xyz only (Point-E's evaluator uses no normals), `[B, 3, N]` with N >= 512.
    """

    def __init__(self, num_classes: int = 40, width_mult: int = 2):
        super().__init__()
        w = width_mult
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.sa1 = PointNetSetAbstraction(512, 0.2, 32, 3, [64 * w, 64 * w, 128 * w], group_all=False)
        self.sa2 = PointNetSetAbstraction(128, 0.4, 64, 128 * w + 3, [128 * w, 128 * w, 256 * w], group_all=False)
        self.sa3 = PointNetSetAbstraction(None, None, None, 256 * w + 3, [256 * w, 512 * w, 1024 * w], group_all=True)
        self.fc1 = nn.Linear(1024 * w, 512 * w)
        self.bn1 = nn.BatchNorm1d(512 * w)
        self.drop1 = nn.Dropout(0.4)
        self.fc2 = nn.Linear(512 * w, 256 * w)
        self.bn2 = nn.BatchNorm1d(256 * w)
        self.drop2 = nn.Dropout(0.4)
        self.fc3 = nn.Linear(256 * w, num_classes)

    @property
    def feature_dim(self) -> int:
        """Width of the p-FID features: 256 * width_mult (512 for Point-E's checkpoint)."""
        return 256 * self.width_mult

    def encode(self, xyz: torch.Tensor, fps_start: torch.Tensor | None = None) -> torch.Tensor:
        """The three set-abstraction levels: `xyz [B, 3, N]` -> max-pooled global features `[B, 1024 * width_mult]`.

        `fps_start [B]`: the point index where farthest point sampling starts for each cloud (both levels); default
        as Point-E: `arange(B)` in eval mode, random in training mode.
        """
        l1_xyz, l1_features = self.sa1(xyz, None, fps_start)
        l2_xyz, l2_features = self.sa2(l1_xyz, l1_features, fps_start)
        _, l3_features = self.sa3(l2_xyz, l2_features)
        return l3_features.view(xyz.shape[0], -1)

    def classify(self, global_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fully connected head: `[B, 1024 * width_mult]` -> `(log_probs [B, num_classes], features
        [B, 256 * width_mult])`, the features being `bn2(fc2(.))` (before the ReLU)."""
        hidden = self.drop1(F.relu(self.bn1(self.fc1(global_features))))
        features = self.bn2(self.fc2(hidden))
        logits = self.fc3(self.drop2(F.relu(features)))
        return F.log_softmax(logits, -1), features

    def forward(self, xyz: torch.Tensor, fps_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`xyz [B, 3, N]` -> `(log_probs [B, num_classes], features [B, 256 * width_mult])`: `classify(encode(xyz))`.

        `fps_start [B]`: see `encode`.
        """
        return self.classify(self.encode(xyz, fps_start))
