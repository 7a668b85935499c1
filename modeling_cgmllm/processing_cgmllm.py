"""CGMLLMProcessor: Qwen3-VL tokenizer + image processor, plus 3D placeholders and the prompt formats.

All prompt layouts live here so that the pipeline (inference) and the training collator build the very same
sequences. They follow the official release (no chat template; each text piece is
`<|im_start|> text <|im_end|>`):

    text  -> 3D : <|im_start|>{prompt}<|im_end|>                      + <shape> (noisy query block)
    image -> 3D : <image>                                              + <shape>
    image -> txt: <|im_start|>{question}<|im_end|><image><|im_start|>  -> "{caption}<|im_end|>"
    3D    -> txt: <shape><|im_start|>{question}<|im_end|><|im_start|>  -> "{caption}<|im_end|>"

`<image>` expands to `<|vision_start|> <|image_pad|>×n <|vision_end|>` (n from the image grid) and `<shape>` to
`<|obj_start|> <|obj_pad|>×N <|obj_end|>`.
"""

import re

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


IMAGE_PLACEHOLDER = "<image>"
SHAPE_PLACEHOLDER = "<shape>"
DEFAULT_SHAPE_QUESTION = "Describe this 3D object."
DEFAULT_IMAGE_QUESTION = "Describe this image."


class CGMLLMProcessor(ProcessorMixin):
    r"""
    Wraps a Qwen3-VL tokenizer and image processor, and adds CG-MLLM's 3D tokens.

    Args:
        image_processor: a Qwen2-VL / Qwen3-VL image processor.
        tokenizer: a tokenizer that knows `<|im_start|>`, `<|im_end|>`, the vision tokens and the 3D tokens
            (`<|obj_start|>`, `<|obj_end|>`, `<|obj_pad|>`; see [`CGMLLMProcessor.add_shape_tokens`]).
        num_shape_tokens (`int`, defaults to 4096): latent rows a `<shape>` expands to when no count is given.
        image_preprocessing (`str`, defaults to `"qwen3_vl"`): how images become pixel values.
            `"qwen3_vl"`: the image processor's own resize bounds and normalisation (what checkpoints trained with
            this package's processor, e.g. the tiny world, expect); transparent pixels are composited onto white.
            `"official"`: the official CG-MLLM rule (`image_processing_cgmllm`: long side <= 980, short side >= 224,
            multiples of 32, bicubic, mean = std = 0.5, and a JPEG q85 round trip for image -> 3D), which the
            released weights expect; `cgmllm-convert-official` writes it. Only the image processor's
            `patch_size`, `merge_size` and `temporal_patch_size` are used then.
    """

    IMAGE_PREPROCESSING = ("qwen3_vl", "official")

    image_token = "<|image_pad|>"
    vision_start_token = "<|vision_start|>"
    vision_end_token = "<|vision_end|>"
    obj_start_token = "<|obj_start|>"
    obj_end_token = "<|obj_end|>"
    obj_pad_token = "<|obj_pad|>"
    text_start_token = "<|im_start|>"
    text_end_token = "<|im_end|>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_shape_tokens: int = 4096,
                 image_preprocessing: str = "qwen3_vl", **kwargs):
        if image_preprocessing not in self.IMAGE_PREPROCESSING:
            raise ValueError(
                f"`image_preprocessing` must be one of {self.IMAGE_PREPROCESSING}, got {image_preprocessing!r}."
            )
        self.num_shape_tokens = num_shape_tokens
        self.image_preprocessing = image_preprocessing
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        missing = [
            token
            for token in (self.obj_start_token, self.obj_end_token, self.obj_pad_token, self.text_start_token,
                          self.text_end_token, self.image_token, self.vision_start_token, self.vision_end_token)
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id)
        ]
        if missing:
            raise ValueError(
                f"The tokenizer lacks the special tokens {missing}. Call `CGMLLMProcessor.add_shape_tokens(tokenizer)` "
                "for the 3D tokens; the others come with every Qwen3-VL tokenizer."
            )

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def add_shape_tokens(tokenizer) -> list[int]:
        """Add `<|obj_start|>`, `<|obj_end|>`, `<|obj_pad|>` (in this order) to a tokenizer; returns their ids."""
        from .configuration_cgmllm import SHAPE_SPECIAL_TOKENS

        tokenizer.add_tokens(list(SHAPE_SPECIAL_TOKENS), special_tokens=True)
        return tokenizer.convert_tokens_to_ids(list(SHAPE_SPECIAL_TOKENS))

    @classmethod
    def from_qwen3_vl(cls, pretrained_model_name_or_path, num_shape_tokens: int = 4096,
                      image_preprocessing: str = "qwen3_vl", **kwargs):
        """A CG-MLLM processor from a local Qwen3-VL folder: its tokenizer (+ 3D tokens) and image processor."""
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        cls.add_shape_tokens(tokenizer)
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer, num_shape_tokens=num_shape_tokens,
                   image_preprocessing=image_preprocessing)

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    @property
    def special_token_ids(self) -> dict:
        """The ids a [`CGMLLMConfig`] must carry for this tokenizer."""
        return {
            "obj_start_token_id": self.token_id(self.obj_start_token),
            "obj_end_token_id": self.token_id(self.obj_end_token),
            "obj_pad_token_id": self.token_id(self.obj_pad_token),
            "image_token_id": self.token_id(self.image_token),
            "vision_start_token_id": self.token_id(self.vision_start_token),
            "vision_end_token_id": self.token_id(self.vision_end_token),
        }

    # ------------------------------------------------------------------------------------------------------------
    # Prompt formats (used by the pipeline and the training collator alike)
    # ------------------------------------------------------------------------------------------------------------
    def text_piece(self, text: str) -> str:
        return f"{self.text_start_token}{text}{self.text_end_token}"

    def text_to_shape_prompt(self, prompt: str | None) -> str:
        """Context of text -> 3D; `None` or "" gives the empty (unconditional) context."""
        return self.text_piece(prompt) if prompt else ""

    def image_to_shape_prompt(self, prompt: str | None = None) -> str:
        """Context of image -> 3D (optionally with text before the image)."""
        return (self.text_piece(prompt) if prompt else "") + IMAGE_PLACEHOLDER

    def image_caption_prompt(self, question: str = DEFAULT_IMAGE_QUESTION) -> str:
        return f"{self.text_piece(question)}{IMAGE_PLACEHOLDER}{self.text_start_token}"

    def shape_caption_prompt(self, question: str = DEFAULT_SHAPE_QUESTION) -> str:
        return f"{SHAPE_PLACEHOLDER}{self.text_piece(question)}{self.text_start_token}"

    def caption_target(self, caption: str) -> str:
        """What the model learns to write after a caption prompt."""
        return f"{caption}{self.text_end_token}"

    def shape_block(self, num_rows: int, with_start: bool = True, with_end: bool = True) -> str:
        return (
            (self.obj_start_token if with_start else "")
            + self.obj_pad_token * num_rows
            + (self.obj_end_token if with_end else "")
        )

    def blockwise_shape_layout(self, num_rows: int, block_size: int) -> dict:
        """Training layout of one object generated as `K = num_rows // block_size` sequential blocks.

        The sequence is `ñ_1 c_1 ñ_2 c_2 … ñ_K`: the noisy copy of block j (a generation target) followed by its
        clean copy (context for the blocks after it), as in BD3-LM / ACDiT. `ñ_1`/`c_1` carry `<|obj_start|>`
        and `ñ_K` carries `<|obj_end|>`. Under the model's hybrid mask this gives exactly block-causal generation:
        `ñ_j` sees the prompt and `c_<j` (earlier noisy copies are invisible), `c_j` sees `c_≤j`. With
        `block_size == num_rows` it reduces to the single-block layout `<|obj_start|> rows <|obj_end|>`.

        Returns a dict of lists:
            `input_ids` (tokens of the layout), `shape_block_ids` (block id per token, 0-based within the object),
            `latent_index` (for each `<|obj_pad|>`, which of the object's `num_rows` latents it holds) and
            `shape_loss_mask` (for each `<|obj_pad|>`, True on the noisy copies).
        """
        if block_size <= 0 or num_rows % block_size != 0:
            raise ValueError(f"`block_size` must be a positive divisor of {num_rows}, got {block_size}.")
        start, end, pad = (self.token_id(t) for t in (self.obj_start_token, self.obj_end_token, self.obj_pad_token))
        num_blocks = num_rows // block_size
        layout = {"input_ids": [], "shape_block_ids": [], "latent_index": [], "shape_loss_mask": []}
        block_id = 0
        for j in range(num_blocks):
            rows = list(range(j * block_size, (j + 1) * block_size))
            copies = [True] if j == num_blocks - 1 else [True, False]  # the last clean copy would serve nobody
            for noisy in copies:
                tokens = ([start] if j == 0 else []) + [pad] * block_size + ([end] if j == num_blocks - 1 else [])
                layout["input_ids"] += tokens
                layout["shape_block_ids"] += [block_id] * len(tokens)
                layout["latent_index"] += rows
                layout["shape_loss_mask"] += [noisy] * block_size
                block_id += 1
        return layout

    # ------------------------------------------------------------------------------------------------------------
    def expand_placeholders(self, text: str, image_grid_thw=None, image_index: int = 0,
                            num_shape_tokens: int | None = None) -> tuple[str, int]:
        """Expand `<image>` / `<shape>` in one string. Returns the string and the next image index."""
        num_shape_tokens = num_shape_tokens or self.num_shape_tokens
        pieces = re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(SHAPE_PLACEHOLDER)})", text)
        out = []
        for piece in pieces:
            if piece == SHAPE_PLACEHOLDER:
                out.append(self.shape_block(num_shape_tokens))
            elif piece == IMAGE_PLACEHOLDER:
                if image_grid_thw is None or image_index >= len(image_grid_thw):
                    raise ValueError(
                        f"The text holds more {IMAGE_PLACEHOLDER!r} placeholders than images were given."
                    )
                merge = self.image_processor.merge_size
                count = int(torch.as_tensor(image_grid_thw[image_index]).prod()) // (merge * merge)
                out.append(self.vision_start_token + self.image_token * count + self.vision_end_token)
                image_index += 1
            else:
                out.append(piece)
        return "".join(out), image_index

    def __call__(self, text=None, images=None, num_shape_tokens: int | None = None, padding: bool | str = True,
                 padding_side: str = "left", return_tensors: str | None = "pt", image_to_shape: bool = False,
                 **kwargs) -> BatchFeature:
        """Tokenize prompts with `<image>` / `<shape>` placeholders.

        Args:
            text: a string or a list of strings.
            images: PIL images / arrays, one per `<image>` placeholder, in order over the whole batch.
            num_shape_tokens: latent rows per `<shape>` (defaults to `self.num_shape_tokens`).
            padding_side: "left" for generation (the default), "right" for training.
            image_to_shape: the images condition image -> 3D (with `image_preprocessing="official"`: the official
                JPEG q85 round trip, alpha dropped, instead of compositing onto white).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, and `pixel_values` / `image_grid_thw` for images.
        """
        if text is None:
            raise ValueError("`text` is required (use '' for an empty context).")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        image_inputs = {}
        grid = None
        if images:
            image_inputs = self.image_inputs(list(images), image_to_shape=image_to_shape)
            grid = image_inputs["image_grid_thw"]
        num_placeholders = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
        if num_placeholders != (len(images) if images else 0):
            raise ValueError(
                f"Got {len(images) if images else 0} images for {num_placeholders} {IMAGE_PLACEHOLDER!r} placeholders."
            )
        expanded, image_index = [], 0
        for t in texts:
            t, image_index = self.expand_placeholders(t, grid, image_index, num_shape_tokens)
            expanded.append(t)
        encoding = self.tokenizer(
            expanded,
            add_special_tokens=False,
            padding=padding,
            padding_side=padding_side,
            return_tensors=return_tensors,
            **kwargs,
        )
        data = dict(encoding)
        data.update(image_inputs)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def image_inputs(self, images: list, image_to_shape: bool = False) -> dict:
        """Images -> `{"pixel_values": (patches, C*T*p*p), "image_grid_thw": (num_images, 3)}` by
        `self.image_preprocessing` (see the class docstring)."""
        from PIL import Image

        from .image_processing_cgmllm import official_image_inputs, rgb_on_white

        if self.image_preprocessing == "official":
            pil = [Image.fromarray(im) if isinstance(im, np.ndarray) and im.dtype == np.uint8 else im for im in images]
            bad = [i for i, im in enumerate(pil) if not isinstance(im, Image.Image)]
            if bad:
                raise ValueError(f"Images {bad} are neither PIL images nor uint8 arrays; the official preprocessing "
                                 "needs one of those.")
            ip = self.image_processor
            return official_image_inputs(pil, ip.patch_size, ip.temporal_patch_size, ip.merge_size,
                                         image_to_shape=image_to_shape)
        pil = [rgb_on_white(im) if isinstance(im, Image.Image) else im for im in images]
        return dict(self.image_processor(images=pil, return_tensors="pt"))

    # ------------------------------------------------------------------------------------------------------------
    def decode_captions(self, generated_ids) -> list[str]:
        """Decode generated continuations, cut at the first `<|im_end|>`."""
        end_id = self.token_id(self.text_end_token)
        captions = []
        for row in generated_ids:
            row = [int(i) for i in row]
            if end_id in row:
                row = row[: row.index(end_id)]
            captions.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return captions

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    def prepare_surfaces(self, meshes, vae_config, seed: int = 0, num_points: int | None = None,
                         num_sharp_points: int | None = None) -> torch.Tensor:
        """Meshes (paths, bytes, `trimesh.Trimesh`) or point clouds -> `(B, P, 7)` surfaces for `ShapeVAE.encode`.

        Each item is drawn by `mesh_utils.sample_vae_surface` with `vae_config` (`pc_size` uniform +
        `pc_sharpedge_size` sharp points), item `i` with seed `seed + i`: the same helper and counts as the training
        latent cache, so captioning feeds the encoder the kind of cloud it was trained on.
        """
        from .mesh_utils import sample_vae_surface

        if not isinstance(meshes, (list, tuple)):
            meshes = [meshes]
        return torch.stack([
            sample_vae_surface(item, vae_config, seed=seed + index, num_points=num_points,
                               num_sharp_points=num_sharp_points)
            for index, item in enumerate(meshes)
        ])

    def prepare_point_clouds(self, items, num_points: int = 8192, seed: int = 0,
                             default_color: float = 0.4) -> torch.Tensor:
        """Meshes or PointLLM clouds -> `(B, P, 6)` normalised xyz + rgb clouds, the official PointBERT input.

        * a mesh (path, bytes, `trimesh.Trimesh`): `num_points` area-uniform surface points (trimesh's sampler,
          seeded with `seed + index`) with the mesh's colours (vertex, face or texture colours, rgb in [0, 1]); a
          mesh without colours gets constant grey `default_color` (0.4, the official code's value for colourless
          clouds; the official PointBERT path itself only reads PointLLM files, which always carry colours);
        * a PointLLM cloud (`.npy` path or array of shape `(P, 6)`, xyz + rgb in [0, 1]): used as it is (the
          official path does not resample); all clouds of one call must have the same P.

        Then PointLLM's `pc_norm`: xyz minus its mean, divided by the largest distance to it; rgb untouched.
        """
        import os

        from .mesh_utils import sample_colored_points
        from .modeling_pointbert import normalize_point_cloud

        clouds = []
        for index, item in enumerate(items if isinstance(items, (list, tuple)) else [items]):
            if isinstance(item, (str, os.PathLike)) and os.fspath(item).endswith(".npy"):
                try:
                    item = np.load(os.fspath(item), allow_pickle=False)
                except (OSError, ValueError) as error:
                    raise ValueError(f"Could not read the point cloud {os.fspath(item)!r}: {error}") from error
            if isinstance(item, (np.ndarray, torch.Tensor)):
                cloud = torch.as_tensor(np.asarray(item, dtype=np.float32))
                if cloud.ndim != 2 or cloud.shape[1] != 6:
                    raise ValueError(
                        f"A PointLLM point cloud must have shape (P, 6) (xyz + rgb in [0, 1]); item {index} has shape "
                        f"{tuple(cloud.shape)}."
                    )
            else:
                points, _ = sample_colored_points(item, num_points, seed=seed + index, default_color=default_color)
                cloud = torch.from_numpy(points)
            clouds.append(cloud)
        sizes = sorted({cloud.shape[0] for cloud in clouds})
        if len(sizes) > 1:
            raise ValueError(f"The point clouds of one call must have the same number of points, got sizes {sizes}.")
        return normalize_point_cloud(torch.stack(clouds))


__all__ = [
    "CGMLLMProcessor",
    "DEFAULT_IMAGE_QUESTION",
    "DEFAULT_SHAPE_QUESTION",
    "IMAGE_PLACEHOLDER",
    "SHAPE_PLACEHOLDER",
]
