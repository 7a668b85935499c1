"""The generic machinery of transformers works on CG-MLLM as on Qwen3-VL: padding-free packing
(`DataCollatorWithFlattening`), `generate(**processor_outputs)`, the output flags, `return_dict`, `inputs_embeds`."""

import pytest
import torch
from conftest import IMAGE, VISION_END, VISION_START, shape_span
from transformers import DataCollatorWithFlattening


PAD = 0


def _pixels(num_images, seed=0):
    """Pixel patches for `num_images` images of grid (1, 2, 2) (4 image tokens each with the tiny vision config)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4 * num_images, 3 * 2 * 16 * 16, generator=generator), torch.tensor([[1, 2, 2]] * num_images)


def _padded(samples):
    """Right-padded batch (the reference a packed row must reproduce)."""
    length = max(len(s) for s in samples)
    input_ids = torch.tensor([s + [PAD] * (length - len(s)) for s in samples])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in samples])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


# Padding-free packing ------------------------------------------------------------------------------------------------
def test_padding_free_packing_equals_the_padded_batch(tiny_model):
    """`DataCollatorWithFlattening` rows (no mask, position ids restarting at 0) on text, image and 3D samples."""
    text = [11, 12, 13, 14, 15]
    image = [21, VISION_START] + [IMAGE] * 4 + [VISION_END, 22, 23]
    shape = [31, 32] + shape_span(6) + [33]
    clean_shape = shape_span(6) + [41, 42]
    samples = [text, image, shape, clean_shape, [51, 52, 53]]
    pixel_values, grid = _pixels(1)
    latents = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([0.7] * 6 + [0.0] * 6)
    extra = dict(pixel_values=pixel_values, image_grid_thw=grid, shape_latents=latents, shape_timesteps=timesteps)

    flat = DataCollatorWithFlattening()([{"input_ids": s} for s in samples])
    assert set(flat) == {"input_ids", "labels", "position_ids"}
    input_ids, attention_mask, labels = _padded(samples)
    with torch.no_grad():
        packed = tiny_model(**flat, **extra)
        padded = tiny_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)

    # With labels the logits are those of the labelled rows only, in row-major order: the same rows in both layouts.
    assert packed.logits.shape == padded.logits.shape == (sum(len(s) - 1 for s in samples), 99)
    torch.testing.assert_close(packed.logits, padded.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.velocity, padded.velocity, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)


def test_packed_position_ids_may_start_anywhere_and_match_packed_sample_ids(tiny_model):
    """Restarts, not zeros, separate the samples (`position_ids_start`); `packed_sample_ids` gives the same row."""
    samples = [[11, 12] + shape_span(6) + [13], [21, VISION_START] + [IMAGE] * 4 + [VISION_END, 22]]
    pixel_values, grid = _pixels(1)
    latents = torch.randn(6, 8)
    extra = dict(pixel_values=pixel_values, image_grid_thw=grid, shape_latents=latents,
                 shape_timesteps=torch.full((6,), 0.4))
    flat = DataCollatorWithFlattening(position_ids_start=5)([{"input_ids": s} for s in samples])
    sample_ids = torch.tensor([[0] * len(samples[0]) + [1] * len(samples[1])])
    with torch.no_grad():
        from_positions = tiny_model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], **extra)
        from_ids = tiny_model(input_ids=flat["input_ids"], packed_sample_ids=sample_ids, **extra)
    torch.testing.assert_close(from_positions.logits, from_ids.logits, rtol=1e-5, atol=1e-5)
    # The mRoPE ids are the model's own (one id per 3D block, image grids), shifted to the given start.
    torch.testing.assert_close(from_positions.position_ids, from_ids.position_ids + 5)
    block = from_positions.position_ids[:, 0, 2:10]
    assert bool((block == block[0, 0]).all())
