"""The official CG-MLLM image preprocessing (what the released weights were trained and evaluated with).

The official release (`data/transforms.py`, `data/data_utils.py`, `inference.py`, `inferencer.py` at 052d733) feeds
Qwen3-VL's ViT with its own resize rule instead of the Qwen3-VL processor's pixel bounds:

1. colour: captioning composites transparent pixels onto white; image -> 3D instead converts to RGB (the stored colour
   of transparent pixels is kept) and round-trips the image through JPEG quality 85 first;
2. size: scale so that the long side is at most 980 and the short side at least 224, round each side to a multiple
   of `patch_size * merge_size` (32), shrink again if over 1,806,336 pixels or over 980; the official code applies
   this resize twice (once before and once inside its ViT transform), which is a no-op for all but a few sizes;
3. bicubic resampling with antialiasing (PIL), `[0, 1]` tensor, mean = std = 0.5;
4. Qwen-VL patches: the frame duplicated to `temporal_patch_size`, `(grid_h * grid_w, C * T * p * p)` in 2x2 merge
   order, `grid_thw = (1, H / p, W / p)`.

Everything here is plain PIL / torch and is called by [`CGMLLMProcessor`] when `image_preprocessing="official"`.
"""

import io
import warnings

import numpy as np
import torch


OFFICIAL_MAX_IMAGE_SIZE = 980
OFFICIAL_MIN_IMAGE_SIZE = 224
OFFICIAL_MAX_PIXELS = 14 * 14 * 9 * 1024  # 1,806,336
OFFICIAL_IMAGE_MEAN = 0.5
OFFICIAL_IMAGE_STD = 0.5
OFFICIAL_JPEG_QUALITY = 85
# Upsampling beyond this factor on a side draws a warning: the image then holds almost no information.
_TINY_IMAGE_UPSCALE = 4.0


def _round_to_stride(value: float, stride: int) -> int:
    # Python's round (half to even), as the official code uses it.
    return max(stride, int(round(value / stride) * stride))


def _scaled_size(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _round_to_stride(round(width * scale), stride), _round_to_stride(round(height * scale), stride)


def official_resize_size(width: int, height: int, stride: int = 32, max_size: int = OFFICIAL_MAX_IMAGE_SIZE,
                         min_size: int = OFFICIAL_MIN_IMAGE_SIZE,
                         max_pixels: int = OFFICIAL_MAX_PIXELS) -> tuple[int, int]:
    """`(width, height)` -> the official `(new_width, new_height)`, both multiples of `stride`.

    Scale by `min(max_size / long side, 1)`, then at least `min_size / short side`; round each side to the stride;
    shrink again when the area exceeds `max_pixels` or the long side exceeds `max_size` (the result can still be
    slightly over `max_size` after rounding, e.g. 1024x768 -> 992x736, as in the official code).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"An image must have a positive size, got {width}x{height}.")
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    new_width, new_height = _scaled_size(width, height, scale, stride)
    if new_width * new_height > max_pixels:
        new_width, new_height = _scaled_size(new_width, new_height, max_pixels / (new_width * new_height), stride)
    if max(new_width, new_height) > max_size:
        new_width, new_height = _scaled_size(new_width, new_height, max_size / max(new_width, new_height), stride)
    return new_width, new_height


def rgb_on_white(image):
    """PIL image -> RGB; transparent pixels of an RGBA image (or of one with a `transparency` entry, e.g. a palette
    PNG) become white, as the official `pil_img2rgb`; other modes are converted with `Image.convert("RGB")`."""
    from PIL import Image

    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


def jpeg_round_trip(image, quality: int = OFFICIAL_JPEG_QUALITY):
    """The official image -> 3D conditioning image: RGBA / palette images converted to RGB (alpha dropped, not
    composited: the official `inference.py` does `convert("RGB")` before saving; grey images stay grey), encoded as
    JPEG at `quality`, decoded again and converted to RGB."""
    from PIL import Image

    if image.mode not in ("RGB", "L"):  # RGBA / P as the official code; other modes JPEG cannot store either
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def official_resize(image, stride: int, index: int = 0):
    """Resize an RGB PIL image by the official rule (applied twice, as the official inference does), bicubic."""
    from PIL import Image

    width, height = image.size
    for _ in range(2):
        size = official_resize_size(*image.size, stride=stride)
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
    upscale = max(image.size[0] / width, image.size[1] / height)
    if upscale > _TINY_IMAGE_UPSCALE:
        warnings.warn(
            f"Image {index} is only {width}x{height} pixels; the official rule (short side >= "
            f"{OFFICIAL_MIN_IMAGE_SIZE}) upsamples it {upscale:.0f}x to {image.size[0]}x{image.size[1]}, so it carries "
            "little information for the model.",
            UserWarning,
            stacklevel=3,
        )
    return image


def to_normalized_tensor(image) -> torch.Tensor:
    """RGB PIL image -> `(3, H, W)` float32, `(x / 255 - 0.5) / 0.5` (the official ToTensor + Normalize)."""
    array = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    return array.float().div(255).sub(OFFICIAL_IMAGE_MEAN).div(OFFICIAL_IMAGE_STD)


def patchify_qwen_vl(pixels: torch.Tensor, patch_size: int, temporal_patch_size: int,
                     merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(C, H, W)` -> `(grid_h * grid_w, C * T * p * p)` patches in the order Qwen-VL's ViT reads them, and
    `grid_thw` `(3,)` = `(1, H / p, W / p)`.

    The frame is repeated `temporal_patch_size` times; patches of one `merge_size x merge_size` window are
    consecutive (the merger concatenates them); each patch is flattened as `(C, T, p, p)`, the Conv3d layout.
    """
    channels, height, width = pixels.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(
            f"An image of {width}x{height} cannot be split into {patch_size}-pixel patches merged {merge_size}x"
            f"{merge_size}; both sides must be multiples of {patch_size * merge_size}."
        )
    frames = pixels.unsqueeze(0).expand(temporal_patch_size, -1, -1, -1)
    patches = frames.reshape(
        1, temporal_patch_size, channels,
        grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
    )
    # -> (t, h-window, w-window, h-in-window, w-in-window, C, T, p, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return flat.contiguous(), torch.tensor([1, grid_h, grid_w])


def official_image_inputs(images, patch_size: int, temporal_patch_size: int, merge_size: int,
                          image_to_shape: bool = False) -> dict:
    """PIL images -> `{"pixel_values": (sum_i n_i, C*T*p*p), "image_grid_thw": (num_images, 3)}`, the official way.

    Args:
        image_to_shape: the conditioning images of image -> 3D (alpha dropped and a JPEG q85 round trip first);
            otherwise (captioning) transparent pixels are composited onto white.
    """
    pixel_values, grids = [], []
    for index, image in enumerate(images):
        image = jpeg_round_trip(image) if image_to_shape else rgb_on_white(image)
        image = official_resize(image, stride=patch_size * merge_size, index=index)
        patches, grid = patchify_qwen_vl(to_normalized_tensor(image), patch_size, temporal_patch_size, merge_size)
        pixel_values.append(patches)
        grids.append(grid)
    return {"pixel_values": torch.cat(pixel_values), "image_grid_thw": torch.stack(grids)}


__all__ = [
    "OFFICIAL_JPEG_QUALITY",
    "OFFICIAL_MAX_IMAGE_SIZE",
    "OFFICIAL_MAX_PIXELS",
    "OFFICIAL_MIN_IMAGE_SIZE",
    "jpeg_round_trip",
    "official_image_inputs",
    "official_resize",
    "official_resize_size",
    "patchify_qwen_vl",
    "rgb_on_white",
    "to_normalized_tensor",
]
