"""The official image preprocessing: resize rule, pixel values, alpha, the JPEG round trip of image -> 3D."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from cgmllm import CGMLLMProcessor, train_bbpe_tokenizer
from cgmllm.image_processing_cgmllm import official_resize_size, patchify_qwen_vl


def _processor(image_preprocessing="official"):
    tokenizer = train_bbpe_tokenizer(["describe this image", "a red car"] * 4, vocab_size=300)
    # The Qwen3-VL image processor's patch geometry: 16-pixel patches, 2x2 merge, 2 frames.
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2)
    return CGMLLMProcessor(image_processor=image_processor, tokenizer=tokenizer, num_shape_tokens=4,
                           image_preprocessing=image_preprocessing)


@pytest.fixture(scope="module")
def processor():
    return _processor()


def _noise_image(width, height, seed=0, mode="RGB"):
    channels = 4 if mode == "RGBA" else 3
    array = np.random.RandomState(seed).randint(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array, mode)


# Hand-computed from the rule (long side <= 980, short side >= 224, sides rounded half-to-even to multiples of 32,
# area <= 1,806,336, a second shrink when the long side is over 980).
@pytest.mark.parametrize(
    "size, expected",
    [
        ((224, 224), (224, 224)),
        ((1024, 768), (992, 736)),     # scale 980/1024: 980 -> 992 (30.625 -> 31), 735 -> 736; shrink again: same
        ((768, 1024), (736, 992)),
        ((500, 400), (512, 384)),      # no scaling; 400 / 32 = 12.5 rounds half to even -> 12
        ((1, 1), (224, 224)),          # upsampled to the minimum short side
        ((100, 3000), (32, 992)),      # short side first to 224, then the long side back to 980 -> 32 x 992
        ((4000, 3000), (992, 736)),
    ],
)
def test_official_resize_sizes(size, expected):
    assert official_resize_size(*size, stride=32) == expected


@pytest.mark.parametrize("size, grid", [((224, 224), (1, 14, 14)), ((1024, 768), (1, 46, 62))])
def test_patch_grids_match_the_official_ones(processor, size, grid):
    """The issue's measured grids: 224x224 -> 14x14 and 1024x768 -> 46x62 officially."""
    out = processor.image_inputs([_noise_image(*size)])
    assert out["image_grid_thw"].tolist() == [list(grid)]
    assert out["pixel_values"].shape == (grid[1] * grid[2], 3 * 2 * 16 * 16)


def test_constant_colour_gives_the_normalised_value_exactly(processor):
    image = Image.new("RGB", (300, 200), (255, 0, 51))
    pixels = processor.image_inputs([image])["pixel_values"].view(-1, 3, 2, 16, 16)
    for channel, value in enumerate((1.0, -1.0, 51 / 255 / 0.5 - 1.0)):
        torch.testing.assert_close(pixels[:, channel], torch.full_like(pixels[:, channel], value), rtol=0, atol=1e-6)


def test_pixel_values_are_bicubic_pil_resize_then_half_mean_half_std(processor):
    """Values: PIL bicubic resize (what torchvision's resize does on a PIL image), x / 255, (x - 0.5) / 0.5; patch
    layout: the Qwen2-VL image processor's, checked by that processor on the already resized image."""
    image = _noise_image(1024, 768, seed=3)
    out = processor.image_inputs([image])
    resized = image.resize((992, 736), Image.Resampling.BICUBIC)
    reference = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, do_resize=False,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)(resized, return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"], reference["pixel_values"].float(), rtol=0, atol=1e-6)
    assert out["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist()
    # One value by hand: the first patch's first pixel is the resized image's top-left pixel, red channel.
    expected = np.asarray(resized)[0, 0, 0] / 255 / 0.5 - 1
    assert float(out["pixel_values"][0, 0]) == pytest.approx(expected, abs=1e-6)


def test_patchify_rejects_sizes_off_the_merge_grid():
    with pytest.raises(ValueError, match="multiples of 32"):
        patchify_qwen_vl(torch.zeros(3, 48, 64), 16, 2, 2)


def test_captioning_composites_transparency_onto_white(processor):
    rgba = np.zeros((224, 224, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere ...
    rgba[:, :112, 3] = 255  # ... opaque on the left half only
    out = processor.image_inputs([Image.fromarray(rgba, "RGBA")])["pixel_values"]
    image = _unpatchify(out, 14, 14)
    assert torch.allclose(image[:, :, :100], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1), atol=1e-6)  # red
    assert torch.allclose(image[:, :, 124:], torch.ones(3, 1, 1), atol=1e-6)  # white where transparent


def test_image_to_shape_drops_alpha_and_round_trips_through_jpeg_q85(processor):
    rgba = _noise_image(256, 192, seed=5, mode="RGBA")
    out = processor.image_inputs([rgba], image_to_shape=True)["pixel_values"]
    buffer = io.BytesIO()
    rgba.convert("RGB").save(buffer, format="JPEG", quality=85)
    jpeg = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    expected = processor.image_inputs([jpeg])["pixel_values"]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    without_jpeg = processor.image_inputs([rgba.convert("RGB")])["pixel_values"]
    assert (out - without_jpeg).abs().max() > 0.05


def test_tiny_image_is_upsampled_with_a_warning(processor):
    with pytest.warns(UserWarning, match=r"1x1 pixels.*224x224"):
        out = processor.image_inputs([Image.new("RGB", (1, 1), (10, 20, 30))])
    assert out["image_grid_thw"].tolist() == [[1, 14, 14]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor.image_inputs([_noise_image(224, 224)])


def test_processor_call_expands_one_image_token_per_merged_patch(processor):
    batch = processor(text=["<image>"], images=[_noise_image(1024, 768)])
    image_id = processor.token_id(processor.image_token)
    assert batch["pixel_values"].shape[0] == 46 * 62  # 16-pixel patches
    assert int((batch["input_ids"] == image_id).sum()) == 46 * 62 // 4  # one token per 2x2 merged window


def test_qwen3_vl_rule_stays_the_default_and_round_trips(tmp_path):
    default = _processor("qwen3_vl")
    assert CGMLLMProcessor(image_processor=default.image_processor, tokenizer=default.tokenizer).image_preprocessing \
        == "qwen3_vl"
    official = _processor("official")
    official.save_pretrained(tmp_path / "official")
    assert CGMLLMProcessor.from_pretrained(tmp_path / "official").image_preprocessing == "official"
    # A processor saved before the option existed (e.g. checkpoints/tiny-world) loads with the Qwen3-VL rule.
    default.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "processor_config.json"
    import json

    config = json.loads(config_path.read_text())
    config.pop("image_preprocessing", None)
    config_path.write_text(json.dumps(config))
    assert CGMLLMProcessor.from_pretrained(tmp_path / "old").image_preprocessing == "qwen3_vl"


def test_qwen3_vl_rule_uses_the_image_processor_bounds():
    processor = _processor("qwen3_vl")
    image = _noise_image(224, 224)
    ours = processor.image_inputs([image])
    theirs = processor.image_processor(image, return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])
    assert ours["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()


def test_unknown_image_preprocessing_is_a_clear_error():
    with pytest.raises(ValueError, match="image_preprocessing"):
        _processor("bilinear")


def _unpatchify(patches, grid_h, grid_w, patch=16, merge=2):
    """Inverse of the Qwen-VL patch layout, first frame only: `(grid_h * grid_w, 3*2*p*p)` -> `(3, H, W)`."""
    x = patches.view(grid_h // merge, grid_w // merge, merge, merge, 3, 2, patch, patch)[..., 0, :, :]
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, grid_h * patch, grid_w * patch)
    return x
