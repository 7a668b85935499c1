# Copyright 2026 The CG-MLLM Authors. Apache-2.0.
"""The paper's evaluation metrics, computed the way the papers compute them.

* 3D generation: p-FID / p-KID (`compute_pfid_pkid`: Point-E's PointNet++ features of surface point clouds);
  CLIP score, CLIP-IQA+ and MUSIQ on rendered views (`image_metrics`, optional extras, weights from local folders).
* 3D captioning: BLEU-1..4, ROUGE-1/2/L, METEOR (x100) as PointLLM's `traditional_evaluator.py`, optionally
  Sentence-BERT and SimCSE similarity (`caption_metrics`).

The command `cgmllm-eval` (`cgmllm.evaluation.cli`) runs both on folders and files.
"""

from .caption_metrics import caption_metrics, load_wordnet
from .modeling_pointnet2 import PointNet2ClassifierSSG
from .point_cloud_metrics import (
    compute_pfid_pkid,
    frechet_distance,
    kernel_distance,
    load_pointnet,
    normalize_point_clouds,
    pointnet_features,
    sample_point_clouds,
    tiny_world_pointnet_path,
)


__all__ = [
    "PointNet2ClassifierSSG",
    "caption_metrics",
    "compute_pfid_pkid",
    "frechet_distance",
    "kernel_distance",
    "load_pointnet",
    "load_wordnet",
    "normalize_point_clouds",
    "pointnet_features",
    "sample_point_clouds",
    "tiny_world_pointnet_path",
]
