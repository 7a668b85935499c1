# Copyright 2026 The CG-MLLM Authors. Apache-2.0.
"""Image metrics on rendered views of generated meshes: CLIP score, CLIP-IQA+ and MUSIQ (optional extras).

* Views: `render_eval_views` renders 8 views (azimuth k * 45 degrees, elevation 30), the view set of the TRELLIS-style
  re-implementations, with the package's CPU renderer (`cgmllm.rendering`).
* CLIP score: torchmetrics' `CLIPScore` definition, `100 * max(cos(e_source, e_target), 0)` averaged over views,
  between a text prompt and each view, or between a reference image (e.g. the image-to-3D input, or the same view of
  the reference mesh) and each view; the paper's "CLIP" column (~84) is read as the image-image form. CLIP runs
  through transformers' `CLIPModel` from a local folder: torchmetrics 1.9's `CLIPScore` only accepts a fixed list of
  Hub names and reads `get_image_features` as a tensor, which transformers 5 returns as a `ModelOutput`.
* CLIP-IQA+ (`clipiqa+`, 0-1) and MUSIQ (`musiq`, KonIQ, ~0-100): pyiqa's metrics, the ones whose ranges match the
  paper's table. pyiqa is an optional dependency (PolyForm Noncommercial licence; its weights download at first use
  unless they are in its cache folder or `pretrained_model_path` points at a local file), imported only here. It
  needs a torchvision that imports with the installed torch; for the CPU-only torch 2.13 that is not on PyPI (its
  torchvision wheels are CUDA builds). The wrapper was run with pyiqa 0.1.16 beside PyPI's torch 2.14.1 /
  torchvision 0.29.1 (CUDA builds, on a CPU), on tiny random models (`tests/test_evaluation_iqa.py`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


#: 8 views, 45 degrees apart, 30 degrees above the horizon.
EVAL_AZIMUTHS = tuple(45.0 * k for k in range(8))
EVAL_ELEVATION = 30.0
#: pyiqa metric names of the paper's image-quality columns.
IQA_METRICS = ("clipiqa+", "musiq")


def render_eval_views(mesh, image_size: int = 224, azimuths: Sequence[float] = EVAL_AZIMUTHS,
                      elevation: float = EVAL_ELEVATION) -> list[Image.Image]:
    """The evaluation views of a mesh (path or trimesh), white background, one RGB image per azimuth."""
    from ..mesh_utils import load_mesh
    from ..rendering import render_views

    return render_views(load_mesh(mesh), list(azimuths), image_size, elevation=elevation)


class CLIPScorer:
    """CLIP embeddings from a local transformers CLIP folder (`CLIPModel` + `CLIPProcessor`), nothing downloaded."""

    def __init__(self, model_path: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        if not os.path.isdir(model_path):
            raise ValueError(f"CLIP model {model_path}: no such folder (a local CLIPModel + CLIPProcessor folder, "
                             "e.g. a snapshot of openai/clip-vit-base-patch32).")
        try:
            self.model = CLIPModel.from_pretrained(model_path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(model_path)
        except Exception as error:
            raise ValueError(f"CLIP model {model_path}: could not load a CLIPModel and CLIPProcessor "
                             f"({type(error).__name__}: {error}).") from error
        self.device = device

    @staticmethod
    def _embedding(output) -> torch.Tensor:
        # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor.
        embedding = output if isinstance(output, torch.Tensor) else output.pooler_output
        return embedding / embedding.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm embeddings `[len(images), projection_dim]`."""
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return self._embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings `[len(texts), projection_dim]` (truncated to CLIP's context)."""
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return self._embedding(self.model.get_text_features(**inputs))

    def score(self, views: Sequence[Image.Image], prompt: str | None = None,
              reference: Image.Image | Sequence[Image.Image] | None = None) -> float:
        """`100 * max(cos, 0)` averaged over `views`, against a text `prompt` or against `reference`: one image for
        every view, or one image per view (the same views of a reference mesh)."""
        if (prompt is None) == (reference is None):
            raise ValueError("CLIP score needs exactly one of a prompt or a reference image.")
        if not views:
            raise ValueError("CLIP score needs at least one view.")
        views_embedded = self.image_embeddings(views)
        if prompt is not None:
            target = self.text_embeddings([prompt])
        else:
            references = [reference] if isinstance(reference, Image.Image) else list(reference)
            if len(references) not in (1, len(views)):
                raise ValueError(f"{len(references)} reference images for {len(views)} views; give one, or one "
                                 "per view.")
            target = self.image_embeddings(references)
        cosine = (views_embedded * target).sum(-1)
        return float((100.0 * cosine.clamp(min=0)).mean())


def iqa_scores(images: Sequence[Image.Image], metric: str = "clipiqa+",
               pretrained_model_path: str | os.PathLike | None = None, device: str = "cpu", **metric_options
               ) -> list[float]:
    """No-reference image quality of each image (equal sizes) with pyiqa's `metric` (`"clipiqa+"` or `"musiq"`, or
    any pyiqa name), as pyiqa scores an RGB batch in [0, 1].

    `pretrained_model_path`: a local weights file. For MUSIQ (and other pyiqa architectures that take one) pyiqa
    loads it in place of its download. CLIP-IQA+ takes no weights path in pyiqa: its weights are the learned prompt
    context (`CLIP-IQA+_learned_prompts-*.pth`, a `[2, 16, width]` tensor) on top of OpenAI's CLIP RN50; the file
    given here is loaded into its prompt learner as pyiqa loads the downloaded one, and the CLIP backbone comes from
    `metric_options["backbone"]` (a local OpenAI CLIP file) or else pyiqa's cache folder. Without a path pyiqa takes
    its default weights from its cache folder (`<torch hub dir>/pyiqa`) and downloads them where they are missing.
    `metric_options` go to the pyiqa architecture (e.g. `pretrained=False`, `backbone=...`, sizes)."""
    kwargs, prompt_file = dict(metric_options), None
    if pretrained_model_path:
        path = os.fspath(pretrained_model_path)
        if not os.path.isfile(path):
            raise ValueError(f"{metric} weights {path}: no such file.")
        if metric == "clipiqa+":
            kwargs["pretrained"], prompt_file = False, path
        elif metric.startswith("clipiqa+"):
            # pyiqa's other CLIP-IQA+ variants ship a whole state dict under 'params', not a prompt tensor.
            raise ValueError(f"{metric}: a local weights file is only supported for 'clipiqa+' (its learned prompt "
                             "tensor); give no path to let pyiqa load this variant's own weights from its cache.")
        else:
            kwargs["pretrained_model_path"] = path
    try:
        import pyiqa
    except Exception as error:  # not only ImportError: a torchvision built for another torch fails at import
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(f"{metric} needs pyiqa, which could not be imported ({type(error).__name__}: {first_line}). "
                         "Install it (`pip install pyiqa`, PolyForm Noncommercial licence) beside a torchvision "
                         "built for the installed torch; see the README's Evaluation section.") from error
    try:
        scorer = pyiqa.create_metric(metric, device=torch.device(device), as_loss=False, **kwargs)
    except Exception as error:
        raise ValueError(f"pyiqa could not create {metric!r} ({type(error).__name__}: {error}); without network "
                         "access give local weights (--clipiqa-weights / --musiq-weights, and CLIP-IQA+'s RN50 in "
                         "pyiqa's cache folder).") from error
    if prompt_file is not None:
        _load_learned_prompts(scorer.net, prompt_file, metric)
    if not images:
        return []
    pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
                                        for image in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        return [float(value) for value in scorer(pixels.to(device)).reshape(-1)]


def _load_learned_prompts(network, path: str, metric: str) -> None:
    """CLIP-IQA+'s learned prompt context from a local file into pyiqa's prompt learner (`prompt_learner.ctx`)."""
    learner = getattr(network, "prompt_learner", None)
    if learner is None:
        raise ValueError(f"pyiqa's {metric!r} has no learned prompts to load {path} into.")
    try:
        context = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{metric} weights {path}: torch.load failed ({type(error).__name__}).") from error
    if not isinstance(context, torch.Tensor) or context.shape != learner.ctx.shape:
        found = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"{metric} weights {path}: expected CLIP-IQA+'s learned prompt context, a tensor of shape "
                         f"{tuple(learner.ctx.shape)} for this CLIP backbone; found {found}.")
    learner.ctx.data = context.to(learner.ctx)
