# Copyright 2026 The CG-MLLM Authors. Apache-2.0.
"""CGMLLMPipeline: text -> mesh, image -> mesh and captioning with one CG-MLLM.

Data flow (B objects, N latent rows of C channels, blocks of K rows, S steps):

    prompt / image ─ processor ─▶ [cond contexts ; uncond contexts]   one left-padded batch (2B, P)
                   ─ model prefill (TokenAR, causal) ──────────────▶ KV cache (2B, P)
    noise (B, N, C) ─▶ for block j in 0..N/K-1:
                           for t in scheduler.timesteps:                  S Euler steps
                               model(block j, x_t, t, cache read-only) ─▶ v (2B, K, C)  [cond ∥ uncond in one call]
                               CFG (t in the interval) + renorm ─▶ scheduler.step
                               (t outside the interval: the B conditional rows only ─▶ v (B, K, C))
                           model(block j, x_0, t = 0, update_cache)       clean copy appended to the cache (K < N)
    latents ─ vae.latents_to_mesh ─▶ list[trimesh.Trimesh]

CG-MLLM works on raw ShapeVAE latents (the official release decodes with z_scale_factor = 1.0, and the training
latent cache stores raw `encode` outputs), so no VAE scale factor is applied on either side.

This file imports nothing from the `cgmllm` package at module level: it is copied next to a saved pipeline and
loaded as remote code by `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)` where `cgmllm` is not
installed (the components then come from the files in their own folders).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList


logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from cgmllm.pipelines import CGMLLMPipeline

        >>> pipe = CGMLLMPipeline.from_pretrained("path/to/cgmllm-pipeline")
        >>> pipe("a red car", generator=torch.Generator().manual_seed(42)).mesh.export("car.glb")
        >>> pipe.caption(mesh="car.glb")
        ['a red car']
        ```
"""

# Remote-code layout written by `save_pretrained`: component -> (module file, class name, files to copy into the folder).
_REMOTE_COMPONENTS = {
    "model": ("modeling_cgmllm", "CGMLLMForConditionalGeneration"),
    "vae": ("shape_vae_remote", "ShapeVAE"),
    "processor": ("processing_cgmllm", "CGMLLMProcessor"),
    "point_encoder": ("modeling_pointbert", "PointBERTEncoder"),  # optional: the official 3D-captioning encoder
}
# The official 3D-captioning input: an 8192-point xyz + rgb cloud, and the question of the official inference.
POINT_CLOUD_SIZE = 8192
DEFAULT_POINT_QUESTION = "What does this collection of points represent?"
_VAE_FILES = ("modeling_shape_vae.py", "volume_decoding.py", "mesh_utils.py")
# The file every component folder of a saved pipeline holds; `from_pretrained` checks them all before loading any.
_COMPONENT_CONFIG_FILES = {
    "model": "config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
    "processor": "tokenizer_config.json",
}


@dataclass
class CGMLLMPipelineOutput(BaseOutput):
    """
    Output of [`CGMLLMPipeline`].

    Args:
        meshes (`list[trimesh.Trimesh]` or `None`): one mesh per generated object (None for `output_type="latent"`).
        latents (`torch.Tensor`): `(B, N, C)` final latents (raw ShapeVAE latents, what `vae.decode` takes).
    """

    meshes: list | None
    latents: torch.Tensor

    @property
    def mesh(self):
        """The first mesh, for `pipe(prompt).mesh.export("x.glb")`."""
        if not self.meshes:
            raise ValueError("No meshes were decoded (output_type='latent'); decode `latents` with the VAE.")
        return self.meshes[0]


def official_flow_sigmas(num_inference_steps: int) -> np.ndarray:
    """The official sampler's flow times, before the shift, for `num_inference_steps` Euler steps.

    The official loop (`inference.py`, `--num_timesteps T`) takes `t = linspace(1, 0, T)`, shifts every value with
    `s t / (1 + (s - 1) t)` and makes `T - 1` Euler steps `x <- x - v (t_i - t_{i+1})`, the last one ending at 0.
    `FlowMatchEulerDiscreteScheduler.set_timesteps(num_inference_steps, sigmas=...)` applies the same shift
    (`config.shift`) to the given values and appends the terminal 0, so passing `linspace(1, 0, S + 1)` without its
    final 0 gives exactly that grid with `S = T - 1` steps.

    Returns:
        `(num_inference_steps,)` float64 array `1, ..., 1 / num_inference_steps`.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
    return np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]


def _load_image(image, index: int):
    """PIL image, path or HWC uint8 array -> PIL image in its own mode (an alpha channel is kept: the processor
    decides how transparent pixels are handled); anything unreadable raises a ValueError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened.copy()
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"Could not read image {index} from {os.fspath(image)!r}: {error}") from error
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] in (3, 4):
        array = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).astype(np.uint8)
        return Image.fromarray(array)
    raise ValueError(
        f"Image {index} must be a PIL image, a file path or an (H, W, 3) array, got {type(image).__name__}"
        + (f" of shape {image.shape}" if hasattr(image, "shape") else "")
        + "."
    )


class StopOnImmediateRepeat(StoppingCriteria):
    """Ends a caption row as soon as its generated tokens end with a span of at least `min_span` tokens written
    twice in a row ("pyramid lying pyramid lying"). A model shown something unlike its training data can loop like
    this up to the token budget without ever emitting its end token, and repetition penalties or n-gram bans only
    make it loop with variations; no trained caption holds such a repeat (on the tiny world: none of 7,005
    captions repeats a span of 2 tokens or more back to back, while single tokens do, e.g. "ll" in "hollow")."""

    def __init__(self, prompt_length: int, min_span: int = 2):
        self.prompt_length = prompt_length
        self.min_span = min_span

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length :]
        length = generated.shape[1]
        done = torch.zeros(generated.shape[0], dtype=torch.bool, device=input_ids.device)
        for span in range(self.min_span, length // 2 + 1):
            done |= (generated[:, length - span :] == generated[:, length - 2 * span : length - span]).all(-1)
        return done


def cut_immediate_repeat(tokens: list[int], end_ids: set[int], min_span: int = 2) -> list[int]:
    """`tokens` up to their first end token, without the second copy of the first span (>= `min_span` tokens) that
    is repeated back to back: what remains of a row that `StopOnImmediateRepeat` stopped."""
    for length in range(1, len(tokens) + 1):
        if tokens[length - 1] in end_ids:
            return tokens[: length - 1]
        for span in range(min_span, length // 2 + 1):
            if tokens[length - span : length] == tokens[length - 2 * span : length - span]:
                return tokens[: length - span]
    return tokens


class CGMLLMPipeline(DiffusionPipeline):
    r"""
    Text-to-mesh and image-to-mesh generation with CG-MLLM (arXiv 2601.21798), plus image and mesh captioning.

    Args:
        model ([`CGMLLMForConditionalGeneration`]): the MoT multimodal LLM (TokenAR for text/images, BlockAR for the
            3D latent rows, velocity head `llm2obj`).
        vae ([`ShapeVAE`]): the frozen 3D VAE (latents <-> field -> mesh).
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): flow-matching Euler sampler; sigma is the model's flow time
            t (x_t = (1 - t) x0 + t eps, t = 1 pure noise). With `shift=3.0` (the official value) and the default
            grid of `__call__` ([`official_flow_sigmas`]) it walks exactly the official sampler's timesteps.
        processor ([`CGMLLMProcessor`]): tokenizer, image processor and the prompt formats.
        point_encoder ([`PointBERTEncoder`], *optional*): the official 3D-captioning encoder. With it,
            `caption(mesh=...)` encodes coloured point clouds with PointBERT and feeds the features through the
            model's `obj_und_connector` (the released weights' path); without it meshes are captioned from ShapeVAE
            latents.
    """

    _optional_components = ["point_encoder"]

    # Generation runs the model, then the VAE (decoding). Captioning a mesh runs them the other way round: `caption`
    # hands the VAE back to the CPU itself before the model starts (see `_offload_now`).
    model_cpu_offload_seq = "model->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, model, vae, scheduler: FlowMatchEulerDiscreteScheduler, processor, point_encoder=None):
        super().__init__()
        self.register_modules(model=model, vae=vae, scheduler=scheduler, processor=processor,
                              point_encoder=point_encoder)

    # ------------------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------------------
    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def latent_channels(self) -> int:
        return self.model.config.shape_latent_channels

    @property
    def max_shape_tokens(self) -> int:
        """Largest `num_shape_tokens`: the resolution the model was trained up to (`model.config.num_shape_tokens`)."""
        return int(self.model.config.num_shape_tokens)

    # ------------------------------------------------------------------------------------------------------------
    # 1. Inputs
    # ------------------------------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        image,
        negative_prompt,
        num_inference_steps,
        guidance_scale,
        guidance_interval,
        num_shape_tokens,
        shape_block_size,
        num_meshes_per_prompt,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
    ):
        """Validate everything before any work starts; every error names the offending value."""
        if prompt is None and image is None:
            raise ValueError("Provide a `prompt` (text -> mesh) or an `image` (image -> mesh); both are None.")
        if prompt is not None and image is not None:
            raise ValueError("Provide either `prompt` or `image`, not both (the official model conditions on one).")
        if prompt is not None:
            if not isinstance(prompt, (str, list, tuple)):
                raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if len(prompts) == 0:
                raise ValueError("`prompt` is an empty list.")
            bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
            if bad:
                raise ValueError(f"Every prompt must be a non-empty string, got {bad!r}.")
        if image is not None and isinstance(image, (list, tuple)) and len(image) == 0:
            raise ValueError("`image` is an empty list.")
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            batch = len(self._as_list(prompt if prompt is not None else image))
            if len(negatives) not in (1, batch):
                raise ValueError(
                    f"`negative_prompt` has {len(negatives)} entries; expected 1 or one per prompt/image ({batch})."
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {guidance_scale!r}.")
        if guidance_interval is not None:
            low, high = guidance_interval
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"`guidance_interval` must be (low, high) with 0 <= low <= high <= 1, got {guidance_interval!r}.")
        if not isinstance(num_shape_tokens, int) or not 1 <= num_shape_tokens <= self.max_shape_tokens:
            raise ValueError(
                f"`num_shape_tokens` must be an integer in [1, {self.max_shape_tokens}] (model.config.num_shape_tokens, "
                f"the largest resolution the model was trained on), got {num_shape_tokens!r}."
            )
        if not isinstance(shape_block_size, int) or shape_block_size <= 0 or num_shape_tokens % shape_block_size:
            raise ValueError(
                f"`shape_block_size` must be a positive divisor of num_shape_tokens={num_shape_tokens}, got "
                f"{shape_block_size!r}."
            )
        if not isinstance(num_meshes_per_prompt, int) or num_meshes_per_prompt <= 0:
            raise ValueError(f"`num_meshes_per_prompt` must be a positive integer, got {num_meshes_per_prompt!r}.")
        if latents is not None:
            batch = len(self._as_list(prompt if prompt is not None else image)) * num_meshes_per_prompt
            expected = (batch, num_shape_tokens, self.latent_channels)
            if tuple(latents.shape) != expected:
                raise ValueError(f"`latents` must have shape {expected}, got {tuple(latents.shape)}.")
        if output_type not in ("trimesh", "latent"):
            raise ValueError(f"`output_type` must be 'trimesh' or 'latent', got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )

    @staticmethod
    def _as_list(value) -> list:
        return list(value) if isinstance(value, (list, tuple)) else [value]

    # ------------------------------------------------------------------------------------------------------------
    # 2. Prompt -> KV cache
    # ------------------------------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: list[str] | None = None,
        images: list | None = None,
        negative_prompt: list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        device: torch.device | None = None,
    ) -> dict[str, Any]:
        """Tokenise and prefill the conditional (and unconditional) contexts in ONE left-padded batch.

        Args:
            prompt: B prompts (text -> mesh), or None.
            images: B PIL images (image -> mesh), or None.
            negative_prompt: B texts for the unconditional branch; None gives the empty context (official).

        Returns:
            dict with `cache` (KV cache of 2B rows when guiding: cond rows first, uncond rows after; else B),
            `attention_mask` `(rows, P)` and `rope_start` `(rows,)`, the rope id of the first 3D block per row
            (max prompt position + 1; 0 for an empty context).
        """
        device = device or self._execution_device
        processor = self.processor
        if prompt is not None:
            texts = [processor.text_to_shape_prompt(p) for p in prompt]
            batch_images = []
        else:
            texts = [processor.image_to_shape_prompt() for _ in images]
            batch_images = list(images)
        if do_classifier_free_guidance:
            negatives = negative_prompt if negative_prompt is not None else [None] * len(texts)
            texts = texts + [processor.text_to_shape_prompt(n) for n in negatives]
        inputs = processor(text=texts, images=batch_images or None, padding_side="left",
                           image_to_shape=bool(batch_images)).to(device)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if prompt is not None:
            self._warn_long_prompts(prompt, attention_mask[: len(prompt)].sum(-1).tolist())
        if input_ids.shape[1] == 0:  # every context empty: a one-token padding column keeps shapes valid
            pad = self.model.config.text_config.pad_token_id or 0
            input_ids = torch.full((len(texts), 1), pad, dtype=torch.long, device=device)
            attention_mask = torch.zeros_like(input_ids)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            use_cache=True,
            logits_to_keep=1,
            return_dict=True,  # whatever the model's config says: the fields are read by name
        )
        # Rope id of the 3D block: one past the largest real position of each row (padding positions excluded).
        positions = out.position_ids.amax(0).masked_fill(attention_mask == 0, -1)
        rope_start = positions.amax(-1) + 1
        return {"cache": out.cache, "attention_mask": attention_mask, "rope_start": rope_start}

    def _warn_long_prompts(self, prompts: list[str], lengths: list[int]) -> None:
        """Warn (once per call) for prompts longer than any the model was trained on: they are accepted, but the
        model has never seen such a context and tends to ignore or garble it."""
        config = self.model.config
        trained = getattr(config, "max_prompt_tokens", None)
        limit = min(x for x in (trained, config.text_config.max_position_embeddings) if x is not None)
        long = [(p, n) for p, n in zip(prompts, lengths) if n > limit]
        if long:
            prompt, length = max(long, key=lambda item: item[1])
            logger.warning(
                f"{len(long)} prompt(s) longer than the longest context the model was trained on ({limit} tokens): "
                f"the longest has {length} tokens ({prompt[:60]!r}...). The model may ignore or garble it; shorter "
                "prompts like the training captions work best."
            )

    # ------------------------------------------------------------------------------------------------------------
    # 3. Latents
    # ------------------------------------------------------------------------------------------------------------
    def prepare_latents(self, batch_size, num_shape_tokens, dtype, device, generator, latents=None):
        """Initial noise `(B, N, C)` from `randn_tensor` (a list of generators seeds each object)."""
        shape = (batch_size, num_shape_tokens, self.latent_channels)
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------------------------
    # 4. One model call on a 3D block against the cache
    # ------------------------------------------------------------------------------------------------------------
    def _block_input_ids(self, rows: int, block_index: int, num_blocks: int, block_size: int, device):
        """`(rows, L)` ids of block j: `<|obj_start|>` on the first block, `<|obj_end|>` on the last."""
        config = self.model.config
        ids = [config.obj_pad_token_id] * block_size
        if block_index == 0:
            ids = [config.obj_start_token_id] + ids
        if block_index == num_blocks - 1:
            ids = ids + [config.obj_end_token_id]
        return torch.tensor(ids, device=device).expand(rows, -1)

    def _block_forward(self, context, block_ids, latents, sigma, block_index, update_cache):
        """Run the block (all context rows at once) and return the velocity `(rows, K, C)`.

        `latents` `(rows, K, C)` are x_t at flow time `sigma`; `sigma = 0` marks a clean block (context for later
        blocks). The block's mask is built from explicit block ids (markers may be absent on inner blocks) and its
        rope id is `rope_start + block_index` on every token.
        """
        rows, length = block_ids.shape
        cache = context["cache"]
        past = cache.get_seq_length()
        prompt_mask = context["attention_mask"]
        ones = prompt_mask.new_ones(rows, past - prompt_mask.shape[1] + length)
        position_ids = (context["rope_start"] + block_index).view(1, rows, 1).expand(3, rows, length)
        out = self.model(
            input_ids=block_ids,
            attention_mask=torch.cat([prompt_mask, ones], dim=1),
            position_ids=position_ids,
            cache=cache,
            update_cache=update_cache,
            shape_block_ids=torch.zeros_like(block_ids),
            shape_latents=latents.reshape(-1, latents.shape[-1]),
            shape_timesteps=torch.full((1,), float(sigma), device=latents.device),  # one t: embedded once
            logits_to_keep=1,
            return_dict=True,
        )
        return out.velocity.view(rows, -1, latents.shape[-1])

    def _denoising_progress_bar(self, total: int):
        """diffusers' step bar (`set_progress_bar_config` applies), labelled."""
        config = dict(getattr(self, "_progress_bar_config", {}))
        config.setdefault("desc", "denoising")
        return tqdm(total=total, unit=" steps", **config)

    def _meshing_progress_bar(self):
        """A tqdm bar counting field queries (None when progress bars are disabled), as a context manager."""
        config = dict(getattr(self, "_progress_bar_config", {}))
        if config.get("disable"):
            return contextlib.nullcontext()
        config.setdefault("desc", "meshing")
        return tqdm(total=None, unit=" points", unit_scale=True, **config)

    @staticmethod
    def _conditional_rows(context: dict[str, Any], batch_size: int) -> dict[str, Any]:
        """The first `batch_size` rows (the conditional branch) of a prefilled `[cond ; uncond]` context: steps
        outside the guidance interval run only these rows instead of computing the unconditional ones and discarding
        them. The KV cache is copied once per block (its rows are not contiguous per layer otherwise)."""
        cache = context["cache"]
        layers = [(layer.keys[:batch_size], layer.values[:batch_size]) for layer in cache.layers]
        rows = type(cache)(ddp_cache_data=layers)
        return {"cache": rows, "attention_mask": context["attention_mask"][:batch_size],
                "rope_start": context["rope_start"][:batch_size]}

    @staticmethod
    def apply_guidance(v_cond, v_uncond, guidance_scale: float, renorm: bool):
        """`v = v_u + s (v_c - v_u)`, then the official global renorm `v *= clamp(|v_c| / |v|, max=1)` per object
        (Frobenius norms over the block's `(K, C)` values; it can only shrink the update)."""
        guided = v_uncond + guidance_scale * (v_cond - v_uncond)
        if renorm:
            norm_cond = v_cond.flatten(1).norm(dim=1)
            norm = guided.flatten(1).norm(dim=1)
            scale = (norm_cond / (norm + 1e-8)).clamp(max=1.0)
            guided = guided * scale.view(-1, *([1] * (guided.ndim - 1)))
        return guided

    # ------------------------------------------------------------------------------------------------------------
    # 5. Generation
    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 49,
        guidance_scale: float = 7.5,
        guidance_interval: tuple[float, float] | None = (0.4, 1.0),
        guidance_renorm: bool = True,
        num_shape_tokens: int | None = None,
        shape_block_size: int | None = None,
        num_meshes_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        sigmas: list[float] | None = None,
        output_type: str = "trimesh",
        num_images_per_prompt: int | None = None,
        octree_resolution: int = 128,
        mc_level: float = 0.0,
        mesh_kwargs: dict | None = None,
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""
        Generate meshes from text prompts or images.

        Args:
            prompt: text prompt(s) (text -> mesh).
            image: image(s) (PIL, path or `(H, W, 3)` array) (image -> mesh).
            negative_prompt: context of the unconditional branch; None = empty context (the official convention).
            num_inference_steps: Euler steps per block. `S` steps are the official sampler's `--num_timesteps S + 1`
                (its `T` timesteps include the final t = 0, so it makes `T - 1` steps): the default 49 is the
                official default of 50.
            guidance_scale: CFG scale `s`; `<= 1` disables guidance (and the unconditional branch).
            guidance_interval: `(low, high)`: CFG (and renorm) only when `low < t <= high` (official (0.4, 1.0]);
                None = every step.
            guidance_renorm: official global renorm of the guided velocity.
            num_shape_tokens: latent rows N per object, in `[1, model.config.num_shape_tokens]`; defaults to
                `model.config.num_shape_tokens`.
            shape_block_size: rows K per block; must divide N. None: `model.config.shape_block_size`, the block size
                the model was trained with, or the whole object in one block when that is None (official). K = N: one
                block. K < N: N / K blocks generated one after the other, block j conditioned on the clean blocks < j
                through the KV cache; K = 1 is token-by-token generation.
            num_meshes_per_prompt: objects per prompt / image.
            num_images_per_prompt: the name diffusers' pipelines (Shap-E included) and their tooling use for the
                same count; an alias of `num_meshes_per_prompt` (giving both with different values is an error).
            generator: `torch.Generator` (or one per object) for the initial noise.
            latents: initial noise `(B, N, C)` instead of drawing it.
            sigmas: unshifted flow times, one per step, passed to `scheduler.set_timesteps` (which applies its shift
                and appends the terminal 0). None = the official grid `linspace(1, 0, S + 1)[:-1]`
                ([`official_flow_sigmas`]); pass e.g. the scheduler's own spacing explicitly to sample differently.
            output_type: `"trimesh"` (decode with the VAE) or `"latent"`.
            octree_resolution, mc_level, mesh_kwargs: forwarded to `vae.latents_to_mesh` (128 cells per axis by
                default, as the `cgmllm generate` command line: ample for N <= 1024 latents; the official release
                meshes at 512).
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict` after every step.

        Returns:
            [`CGMLLMPipelineOutput`] with `meshes` (list of `trimesh.Trimesh`, one per object; None for
            `output_type="latent"`) and `latents` `(B, N, C)`. With `return_dict=False`, the output's fields that are
            not None as a tuple (diffusers' `BaseOutput.to_tuple`): `(meshes, latents)`, or `(latents,)` for
            `output_type="latent"`, so that `output[0]` and `tuple_output[0]` are the same object.
        """
        if num_images_per_prompt is not None:
            if num_meshes_per_prompt not in (1, num_images_per_prompt):
                raise ValueError(
                    f"`num_images_per_prompt` ({num_images_per_prompt!r}) is an alias of `num_meshes_per_prompt` "
                    f"({num_meshes_per_prompt!r}); give one of them."
                )
            num_meshes_per_prompt = num_images_per_prompt
        num_shape_tokens = self.max_shape_tokens if num_shape_tokens is None else num_shape_tokens
        if shape_block_size is None:
            # The block size the model was trained with; the whole object in one block when it has none (official).
            trained_block_size = getattr(self.model.config, "shape_block_size", None)
            divides = not isinstance(num_shape_tokens, int) or num_shape_tokens % (trained_block_size or 1) == 0
            if not divides:
                raise ValueError(
                    f"The model generates in blocks of model.config.shape_block_size={trained_block_size} rows, which "
                    f"does not divide num_shape_tokens={num_shape_tokens}; pass a multiple of {trained_block_size} or "
                    "an explicit `shape_block_size`."
                )
            shape_block_size = trained_block_size or num_shape_tokens
        if callback_on_step_end is not None and hasattr(callback_on_step_end, "tensor_inputs"):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 1. Check inputs (raises before any work).
        self.check_inputs(
            prompt, image, negative_prompt, num_inference_steps, guidance_scale, guidance_interval,
            num_shape_tokens, shape_block_size, num_meshes_per_prompt, latents, output_type,
            callback_on_step_end_tensor_inputs,
        )
        if output_type == "trimesh":  # the mesh settings too: a grid too large for the memory fails now, not after
            octree_resolution = self.vae.check_mesh_settings(
                octree_resolution, (mesh_kwargs or {}).get("method", "hierarchical")
            )
        self._guidance_scale = guidance_scale
        self._interrupt = False

        # 2. Call parameters: every prompt / image repeated `num_meshes_per_prompt` times, objects in prompt order.
        device = self._execution_device
        prompts = images = None
        if prompt is not None:
            prompts = [p for p in self._as_list(prompt) for _ in range(num_meshes_per_prompt)]
            num_conditions = len(self._as_list(prompt))
        else:
            loaded = [_load_image(im, i) for i, im in enumerate(self._as_list(image))]
            images = [im for im in loaded for _ in range(num_meshes_per_prompt)]
            num_conditions = len(loaded)
        batch_size = num_conditions * num_meshes_per_prompt
        negatives = None
        if negative_prompt is not None:
            negatives = self._as_list(negative_prompt)
            negatives = negatives * num_conditions if len(negatives) == 1 else negatives
            negatives = [n for n in negatives for _ in range(num_meshes_per_prompt)]

        # 3. Prefill the contexts: [cond ; uncond] in one batch.
        context = self.encode_prompt(prompts, images, negatives, self.do_classifier_free_guidance, device)
        branches = 2 if self.do_classifier_free_guidance else 1

        # 4. Initial noise (B, N, C).
        latents = self.prepare_latents(batch_size, num_shape_tokens, torch.float32, device, generator, latents)

        # 5. Blocks x timesteps.
        num_blocks = num_shape_tokens // shape_block_size
        if sigmas is None:
            sigmas = official_flow_sigmas(num_inference_steps)
        self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        low, high = guidance_interval if guidance_interval is not None else (-1.0, 1.0)
        blocks = []
        with self._denoising_progress_bar(num_blocks * len(timesteps)) as progress_bar:
            for j in range(num_blocks):
                block_ids = self._block_input_ids(branches * batch_size, j, num_blocks, shape_block_size, device)
                x = latents[:, j * shape_block_size : (j + 1) * shape_block_size]
                # The scheduler keeps a step index: restart it for every block.
                self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
                cond_context = None  # the conditional rows alone, built at the first step outside the interval
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    sigma = self.scheduler.sigmas[i]
                    if self.do_classifier_free_guidance and low < float(sigma) <= high:
                        velocity = self._block_forward(context, block_ids, x.repeat(2, 1, 1), sigma, j, False)
                        v_cond, v_uncond = velocity.chunk(2)
                        velocity = self.apply_guidance(v_cond, v_uncond, guidance_scale, guidance_renorm)
                    elif branches == 1:
                        velocity = self._block_forward(context, block_ids, x, sigma, j, False)
                    else:  # no guidance at this t: the unconditional branch would be discarded, so skip it
                        if cond_context is None:
                            cond_context = self._conditional_rows(context, batch_size)
                        velocity = self._block_forward(cond_context, block_ids[:batch_size], x, sigma, j, False)
                    x = self.scheduler.step(velocity, t, x, return_dict=False)[0]

                    if callback_on_step_end is not None:
                        callback_kwargs = {"latents": torch.cat(blocks + [x], dim=1) if blocks else x}
                        callback_outputs = callback_on_step_end(self, j * len(timesteps) + i, t, callback_kwargs)
                        if "latents" in callback_outputs:
                            x = callback_outputs["latents"][:, -x.shape[1]:]
                    progress_bar.update()
                blocks.append(x)
                if j < num_blocks - 1:
                    # Write the clean block into the cache (both branches) so later blocks attend to it.
                    self._block_forward(context, block_ids, x.repeat(branches, 1, 1), 0.0, j, update_cache=True)
        latents = torch.cat(blocks, dim=1)

        # 6. Decode.
        meshes = None
        if output_type == "trimesh":
            # Field queries of the volume decoding: the total is not known in advance (coarse-to-fine extraction
            # queries only near the surface), so the bar counts points.
            with self._meshing_progress_bar() as meshing_bar:
                meshes = self.vae.latents_to_mesh(
                    latents.to(self.vae.dtype), octree_resolution=octree_resolution, mc_level=mc_level,
                    **({"progress_callback": meshing_bar.update} if meshing_bar is not None else {}),
                    **(mesh_kwargs or {}),
                )
        self.maybe_free_model_hooks()
        output = CGMLLMPipelineOutput(meshes=meshes, latents=latents)
        if not return_dict:
            return output.to_tuple()
        return output

    # ------------------------------------------------------------------------------------------------------------
    # Captioning
    # ------------------------------------------------------------------------------------------------------------
    def encode_mesh(self, mesh, num_shape_tokens: int | None = None, seed: int = 0) -> torch.Tensor:
        """Mesh(es) (path, bytes, `trimesh.Trimesh` or `(P, 6|7)` point cloud) -> clean raw latents `(B, N, C)`.

        The surface is drawn as the training latent cache draws it (`processor.prepare_surfaces` with the VAE config:
        `pc_size` uniform + `pc_sharpedge_size` sharp points), then encoded with `vae.encode(...).mode()` (the
        cache holds posterior samples of the same distribution)."""
        num_shape_tokens = num_shape_tokens or self.max_shape_tokens
        meshes = self._as_list(mesh)
        try:
            surfaces = self.processor.prepare_surfaces(meshes, self.vae.config, seed=seed)
        except ValueError:
            raise
        except Exception as error:  # trimesh / IO errors of unreadable files
            raise ValueError(f"Could not read the mesh(es) {meshes!r:.200}: {error}") from error
        generator = torch.Generator(device="cpu").manual_seed(seed)
        posterior = self.vae.encode(surfaces, num_latents=num_shape_tokens, generator=generator)
        return posterior.mode().float()

    @torch.no_grad()
    def encode_points(self, mesh, num_points: int = POINT_CLOUD_SIZE, seed: int = 0) -> torch.Tensor:
        """Mesh(es) or PointLLM clouds -> PointBERT features `(B, 1 + num_group, trans_dim)` (cls row first).

        Meshes are sampled with `num_points` area-uniform surface points coloured from the mesh (constant grey 0.4
        where it has no colours), PointLLM `.npy` files / `(P, 6)` arrays are used as they are; every cloud is then
        normalised as PointLLM's `pc_norm` (see [`CGMLLMProcessor.prepare_point_clouds`]).
        """
        if getattr(self, "point_encoder", None) is None:
            raise ValueError("This pipeline has no `point_encoder` (PointBERT); see `cgmllm-convert-official "
                             "--point-bert`.")
        try:
            clouds = self.processor.prepare_point_clouds(self._as_list(mesh), num_points=num_points, seed=seed)
        except ValueError:
            raise
        except Exception as error:  # trimesh / IO errors of unreadable files
            raise ValueError(f"Could not read the mesh(es) {mesh!r:.200}: {error}") from error
        encoder = self.point_encoder
        return encoder(clouds.to(device=encoder.device, dtype=encoder.dtype)).float()

    @torch.no_grad()
    def caption(
        self,
        image=None,
        mesh=None,
        prompt: str | None = None,
        max_new_tokens: int = 64,
        num_shape_tokens: int | None = None,
        stop_on_repetition: bool = True,
        **generate_kwargs,
    ) -> list[str]:
        """Describe images (TokenAR, as Qwen3-VL) or meshes in text.

        Meshes go through the official path when the pipeline has a `point_encoder`: an 8192-point coloured cloud
        (grey 0.4 for meshes without colours), PointBERT, `obj_und_connector`, the block before the question
        ([`encode_points`]). Otherwise they are encoded by the ShapeVAE and the clean latents form the block.

        Args:
            image: image(s) to describe.
            mesh: mesh(es) to describe: paths, `trimesh.Trimesh` or point clouds (with a `point_encoder`: PointLLM
                `(P, 6)` xyz + rgb clouds or `.npy` files of them; without: `(P, 6|7)` xyz + normal surfaces).
            prompt: the question; defaults to "Describe this image." / "Describe this 3D object." (VAE path) /
                the official "What does this collection of points represent?" (PointBERT path).
            max_new_tokens: generation budget; greedy decoding unless `generate_kwargs` say otherwise.
            stop_on_repetition: end a caption where it starts repeating a span of 2+ tokens back to back, and drop
                the repeated copy ([`StopOnImmediateRepeat`]), instead of looping up to `max_new_tokens`.

        Returns:
            One caption per input.
        """
        if (image is None) == (mesh is None):
            raise ValueError("Pass exactly one of `image` or `mesh` to caption.")
        if max_new_tokens <= 0:
            raise ValueError(f"`max_new_tokens` must be positive, got {max_new_tokens!r}.")
        processor, device = self.processor, self._execution_device
        question = {} if prompt is None else {"question": prompt}
        generate_kwargs.setdefault("do_sample", False)
        if image is not None:
            images = [_load_image(im, i) for i, im in enumerate(self._as_list(image))]
            texts = [processor.image_caption_prompt(**question)] * len(images)
            inputs = processor(text=texts, images=images, padding_side="left").to(device)
            extra = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
        elif getattr(self, "point_encoder", None) is not None:
            # The official path: PointBERT features of a coloured cloud through the model's obj_und_connector.
            features = self.encode_points(mesh)
            question = question or {"question": DEFAULT_POINT_QUESTION}
            texts = [processor.shape_caption_prompt(**question)] * features.shape[0]
            inputs = processor(text=texts, num_shape_tokens=features.shape[1], padding_side="left").to(device)
            extra = {"point_features": features.reshape(-1, features.shape[-1]).to(device)}
        else:
            num_shape_tokens = num_shape_tokens or self.max_shape_tokens
            if not 1 <= num_shape_tokens <= self.max_shape_tokens:
                raise ValueError(f"`num_shape_tokens` must be in [1, {self.max_shape_tokens}], got {num_shape_tokens}.")
            latents = self.encode_mesh(mesh, num_shape_tokens)
            self._offload_now(self.vae)
            texts = [processor.shape_caption_prompt(**question)] * latents.shape[0]
            inputs = processor(text=texts, num_shape_tokens=num_shape_tokens, padding_side="left").to(device)
            extra = {"shape_latents": latents.reshape(-1, latents.shape[-1]).to(device)}
        prompt_length = inputs["input_ids"].shape[1]
        if stop_on_repetition:
            criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
            criteria.append(StopOnImmediateRepeat(prompt_length))
            generate_kwargs["stopping_criteria"] = criteria
        generated = self.model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens,
            pad_token_id=processor.tokenizer.pad_token_id, **extra, **generate_kwargs,
        )
        self.maybe_free_model_hooks()
        rows = generated[:, prompt_length:].tolist()
        if stop_on_repetition:
            end_ids = {processor.token_id(processor.text_end_token), processor.tokenizer.pad_token_id}
            rows = [cut_immediate_repeat(row, end_ids) for row in rows]
        return processor.decode_captions(rows)

    def _offload_now(self, component) -> None:
        """Under `enable_model_cpu_offload()`, move `component` back to the CPU at once. diffusers' hook chain
        (`model_cpu_offload_seq`) offloads a component only when the *next* one in the sequence starts, which is
        right for generation (model -> VAE) but would leave the VAE on the accelerator next to the model while a mesh
        caption is generated (VAE -> model). A no-op without model offloading."""
        for hook in getattr(self, "_all_hooks", None) or []:
            if getattr(hook, "model", None) is component:
                hook.offload()

    # ------------------------------------------------------------------------------------------------------------
    # Saving / loading
    # ------------------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Save the components and make the folder loadable without the `cgmllm` package:

        * `model_index.json` names the pipeline `["pipeline_cgmllm", "CGMLLMPipeline"]` and each custom component
          `[<module file>, <class>]`, the form diffusers resolves from files in the component folders;
        * this file goes to the root, the VAE's modeling files into `vae/` (the model and processor copy theirs).

        `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)` then works anywhere, and
        `CGMLLMPipeline.from_pretrained(path)` uses the installed classes.

        With `push_to_hub=True` (and diffusers' `repo_id`, `token`, `private`, `create_pr`, `commit_message`) the
        folder is uploaded once every file above is written, with a model card (`README.md`, from
        `cgmllm.training.hub` when the folder has none) whose licence follows the VAE weights it holds.
        """
        push = {key: kwargs.pop(key) for key in ("repo_id", "token", "private", "create_pr", "commit_message")
                if key in kwargs}
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        root = Path(save_directory)
        shutil.copyfile(__file__, root / "pipeline_cgmllm.py")
        vae_source = Path(sys.modules[type(self.vae).__module__].__file__)
        for name in _VAE_FILES:
            if (vae_source.parent / name).is_file():
                shutil.copyfile(vae_source.parent / name, root / "vae" / name)
        # diffusers copies only the *direct* relative imports of a remote-code entry file (not their imports), so
        # the VAE's entry file imports every VAE module itself.
        imports = "".join(
            f"from .{Path(name).stem} import *  # noqa: F401,F403\n" for name in reversed(_VAE_FILES)
            if (root / "vae" / name).is_file()
        )
        (root / "vae" / "shape_vae_remote.py").write_text(
            '"""Remote-code entry of the ShapeVAE component (written by CGMLLMPipeline.save_pretrained)."""\n\n'
            + imports + "from .modeling_shape_vae import ShapeVAE  # noqa: F401\n"
        )
        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = ["pipeline_cgmllm", type(self).__name__]
        present = {name: entry for name, entry in _REMOTE_COMPONENTS.items() if getattr(self, name, None) is not None}
        for component, entry in present.items():
            index[component] = list(entry)
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for component, (module_file, _) in present.items():
            if not (root / component / f"{module_file}.py").is_file():
                raise ValueError(
                    f"Saving {component}: {module_file}.py was not written to {root / component}; the folder would not "
                    "load as remote code."
                )
        if push_to_hub:
            self._push_saved_folder(root, **push)

    @staticmethod
    def _push_saved_folder(root: Path, repo_id: str | None = None, token=None, private: bool | None = None,
                           create_pr: bool = False, commit_message: str | None = None) -> str:
        """Upload a folder written by `save_pretrained` (all files in place); returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id or root.name, private=private, exist_ok=True).repo_id
        if not (root / "README.md").is_file():
            try:  # by name: an import statement would make diffusers ask remote-code users to install the package
                render_model_card = importlib.import_module("cgmllm.training.hub").render_model_card
            except ImportError:  # remote-code copy without the package: no card template at hand
                logger.warning(f"No README.md in {root}: the Hub repo {repo_id} gets no model card.")
            else:
                render_model_card(repo_id, folder=root).save(root / "README.md")
        return api.upload_folder(repo_id=repo_id, folder_path=str(root), create_pr=create_pr,
                                 commit_message=commit_message or "Upload CG-MLLM pipeline")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved pipeline. With the `cgmllm` package installed and a local folder, the components are
        built from the installed classes (no remote code needed); otherwise diffusers' loader is used (pass
        `trust_remote_code=True` for the files in the folder).

        The local loader honours `DiffusionPipeline.from_pretrained`'s loading keywords the way diffusers does:

        * `variant` (e.g. `"fp16"`): every component whose folder holds weights of that variant
          (`model.fp16.safetensors`, `diffusion_pytorch_model.fp16.safetensors`) loads them, the others load their
          regular weights; a variant that no component has raises a `ValueError`.
        * `dtype` (or `torch_dtype`): one `torch.dtype` for every component, or a dict by component name with an
          optional `"default"` entry (float32 when absent), e.g. `{"model": torch.bfloat16, "default": torch.float16}`.
        * `use_safetensors`, and components passed as objects (`model=...`), which are used as they are.
        * `cache_dir`, `revision`, `token`, `force_download`, `local_files_only`, `proxies`: Hub download options,
          without effect on a local folder.

        Any other keyword (`device_map`, `quantization_config`, ...) hands the whole load to
        `DiffusionPipeline.from_pretrained`, which then builds the components from the folder's own code files
        (`trust_remote_code=True`).

        A Hub repo id is first downloaded with `huggingface_hub.snapshot_download` (`revision`, `token`, `cache_dir`,
        `force_download`, `local_files_only`), then loaded the same way: with the package installed no remote code
        runs, so `trust_remote_code` is not needed. Without the package, `DiffusionPipeline.from_pretrained(...,
        trust_remote_code=True)` runs the code shipped in the folder.
        """
        path = Path(pretrained_model_name_or_path)
        try:
            # Looked up by name, not with an import statement: diffusers scans a remote-code file's import lines and
            # would tell users of the folder to `pip install cgmllm`, which they need not (and which is not even the
            # distribution's name, `cg-mllm`).
            cgmllm = importlib.import_module("cgmllm")
            ShapeVAE = importlib.import_module("cgmllm.modeling_shape_vae").ShapeVAE
        except ImportError:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        unhandled = set(kwargs) - set(_LOCAL_LOAD_KWARGS) - set(_REMOTE_COMPONENTS) - {"scheduler"}
        if not path.exists() and not unhandled:
            # A Hub repo id: download it, then build it from the installed classes like a local folder.
            download = {key: kwargs[key] for key in ("revision", "token", "cache_dir", "force_download",
                                                     "local_files_only") if key in kwargs}
            hub = importlib.import_module("huggingface_hub")
            path = Path(hub.snapshot_download(os.fspath(pretrained_model_name_or_path), **download))
        if not (path / "model_index.json").is_file() or unhandled:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        CGMLLMForConditionalGeneration, CGMLLMProcessor = cgmllm.CGMLLMForConditionalGeneration, cgmllm.CGMLLMProcessor
        missing = [
            f"{name}/{file}" for name, file in _COMPONENT_CONFIG_FILES.items()
            if name not in kwargs and not (path / name / file).is_file()
        ]
        if missing:  # before anything is built: a model without its config would be built at the default size
            raise OSError(
                f"{path} is not a complete CGMLLMPipeline folder: {', '.join(missing)} missing. Save one with "
                "`CGMLLMPipeline.save_pretrained`, or pass the missing components as arguments."
            )

        dtype = kwargs.pop("dtype", None)
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        if dtype is not None and not isinstance(dtype, (dict, torch.dtype)):
            raise ValueError(f"`dtype` must be a torch.dtype or a dict of them by component name, got {dtype!r}.")
        variant = kwargs.pop("variant", None)
        use_safetensors = kwargs.pop("use_safetensors", None)
        model_variants = {
            name: variant for name in ("model", "vae", "point_encoder") if _has_variant(path / name, variant)
        }
        if variant is not None and not model_variants:
            raise ValueError(
                f"You are trying to load the model files of the `variant={variant}`, but no such modeling files are "
                f"available in {path} (e.g. `model/model.{variant}.safetensors`)."
            )

        def component_dtype(name):
            if isinstance(dtype, dict):
                return dtype.get(name, dtype.get("default", torch.float32))
            return dtype

        weights = {"use_safetensors": use_safetensors} if use_safetensors is not None else {}
        loaders = {
            "model": lambda p: CGMLLMForConditionalGeneration.from_pretrained(
                p, dtype=component_dtype("model"), variant=model_variants.get("model"), **weights
            ),
            "vae": lambda p: ShapeVAE.from_pretrained(
                p, torch_dtype=component_dtype("vae"), variant=model_variants.get("vae"), **weights
            ),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained,
            "processor": CGMLLMProcessor.from_pretrained,
        }
        components = {name: kwargs.pop(name) if name in kwargs else load(path / name) for name, load in loaders.items()}
        if "point_encoder" in kwargs:
            components["point_encoder"] = kwargs.pop("point_encoder")
        elif (path / "point_encoder" / "config.json").is_file():
            components["point_encoder"] = cgmllm.PointBERTEncoder.from_pretrained(
                path / "point_encoder", dtype=component_dtype("point_encoder"),
                variant=model_variants.get("point_encoder"), **weights,
            )
        check_component_agreement(components, path)
        return cls(**components)


def check_component_agreement(components: dict, where="the pipeline") -> None:
    """Raise a `ValueError` listing every way the processor / point encoder and the model disagree (a folder whose
    parts come from different checkpoints would otherwise give garbage or a deep shape error)."""
    model, processor = components.get("model"), components.get("processor")
    problems = []
    if model is not None and processor is not None:
        config = model.config
        for name, token_id in processor.special_token_ids.items():
            if getattr(config, name, token_id) != token_id:
                problems.append(f"{name}: processor {token_id} vs model {getattr(config, name)}")
        rows = model.get_input_embeddings().weight.shape[0]
        if len(processor.tokenizer) > rows:
            problems.append(f"the tokenizer has {len(processor.tokenizer)} tokens but the model only {rows} "
                            "embedding rows")
        image_processor, vision = processor.image_processor, config.vision_config
        for ours, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                             ("temporal_patch_size", "temporal_patch_size")):
            if getattr(image_processor, ours, None) not in (None, getattr(vision, theirs)):
                problems.append(f"image processor {ours}={getattr(image_processor, ours)} vs vision "
                                f"{theirs}={getattr(vision, theirs)}")
    point_encoder = components.get("point_encoder")
    if point_encoder is not None and model is not None:
        width = getattr(model.config, "point_feature_dim", None)
        if width is None:
            problems.append("a point_encoder is present but the model has no obj_und_connector (point_feature_dim)")
        elif point_encoder.config.trans_dim != width:
            problems.append(f"point_encoder features are {point_encoder.config.trans_dim}-d but the model's "
                            f"obj_und_connector takes {width}-d")
    if problems:
        raise ValueError(f"The components of {where} do not belong together: " + "; ".join(problems) + ".")


# Keywords of `DiffusionPipeline.from_pretrained` that `CGMLLMPipeline.from_pretrained` honours on a local folder.
_LOCAL_LOAD_KWARGS = (
    "variant", "dtype", "torch_dtype", "use_safetensors", "trust_remote_code",
    "cache_dir", "revision", "token", "force_download", "local_files_only", "proxies",
)


def _has_variant(folder: Path, variant: str | None) -> bool:
    """Whether a component folder holds weights of `variant` (`<name>.<variant>[-shard].<ext>`, diffusers' rule)."""
    if variant is None or not folder.is_dir():
        return False
    return any(len(f.split(".")) > 2 and f.split(".")[1].startswith(variant) for f in os.listdir(folder))


__all__ = [
    "CGMLLMPipeline",
    "CGMLLMPipelineOutput",
    "StopOnImmediateRepeat",
    "check_component_agreement",
    "cut_immediate_repeat",
    "official_flow_sigmas",
]
