"""CLIP-IQA+ and MUSIQ through pyiqa (`image_metrics.iqa_scores`), on tiny random models written in pyiqa's layouts.

pyiqa imports only beside a torchvision built for the installed torch. With the CPU torch 2.13 that CI installs there
is none on PyPI (its torchvision wheels are CUDA builds), so these tests skip there and say why; the clear error for
that case is tested everywhere.
"""

import re
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cgmllm.evaluation.image_metrics import iqa_scores


def _images(count=2, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(count)]


def _pyiqa():
    try:
        import pyiqa
    except Exception as error:  # a CUDA torchvision beside a CPU torch fails with RuntimeError, not ImportError
        pytest.skip(f"pyiqa cannot be imported here ({type(error).__name__}: {str(error).splitlines()[0]}); it is the "
                    "optional `iqa` extra and imports only beside a torchvision built for the installed torch")
    return pyiqa


def test_pyiqa_that_cannot_be_imported_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # what Python does for a module that failed to import
    with pytest.raises(ValueError, match="musiq needs pyiqa, which could not be imported"):
        iqa_scores(_images(1), "musiq")


def test_a_local_file_for_another_clipiqa_plus_variant_is_refused_before_pyiqa_is_needed(tmp_path):
    # pyiqa's clipiqa+_rn50_512 / clipiqa+_vitL14_512 weights are a whole state dict under 'params', not the prompt
    # tensor that a 'clipiqa+' file is loaded as; refused without importing pyiqa (runs where it cannot import).
    weights = tmp_path / "CLIPIQA+_RN50_512.pth"
    torch.save({"params": {"prompt_learner.ctx": torch.zeros(2, 16, 512)}}, weights)
    for metric in ("clipiqa+_rn50_512", "clipiqa+_vitL14_512"):
        expected = re.escape(f"{metric}: a local weights file is only supported for 'clipiqa+'")
        with pytest.raises(ValueError, match=expected):
            iqa_scores(_images(1), metric, weights)
    with pytest.raises(ValueError, match="no such file"):
        iqa_scores(_images(1), "clipiqa+", tmp_path / "missing.pth")


#: A MUSIQ small enough for a test: one transformer layer of width 32 (pyiqa's default: 14 layers of 384).
TINY_MUSIQ = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1)


def test_musiq_from_a_local_weights_file(tmp_path):
    pyiqa = _pyiqa()
    from pyiqa.archs.musiq_arch import MUSIQ

    torch.manual_seed(0)
    network = MUSIQ(pretrained=False, **TINY_MUSIQ).eval()
    path = tmp_path / "musiq_tiny.pth"
    torch.save(network.state_dict(), path)

    images = _images(3)
    scores = iqa_scores(images, "musiq", path, **TINY_MUSIQ)
    assert len(scores) == 3 and np.isfinite(scores).all()
    # The file's weights, and the images as pyiqa's own RGB [0, 1] batch.
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]) / 255.0).float().permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = network(pixels).reshape(-1)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-5)
    # Greyscale and RGBA views score as their RGB conversion.
    assert iqa_scores([images[0].convert("L")], "musiq", path, **TINY_MUSIQ) == iqa_scores(
        [images[0].convert("L").convert("RGB")], "musiq", path, **TINY_MUSIQ)
    assert iqa_scores([images[0].convert("RGBA")], "musiq", path, **TINY_MUSIQ) == iqa_scores(
        [images[0].convert("RGBA").convert("RGB")], "musiq", path, **TINY_MUSIQ)
    assert pyiqa.create_metric  # the package itself, not a stand-in

    with pytest.raises(ValueError, match="no such file"):
        iqa_scores(images, "musiq", tmp_path / "missing.pth", **TINY_MUSIQ)
    with pytest.raises(ValueError, match="pyiqa could not create 'musiq'"):
        iqa_scores(images, "musiq", path, hidden_size=48, mlp_dim=64, num_heads=2, num_layers=1)  # other shapes


def _tiny_clip_file(tmp_path, width=64):
    """A random CLIP in OpenAI's layout (modified-ResNet vision tower, CLIP's 49408-token vocabulary), saved as OpenAI
    ships RN50.pt: a TorchScript archive, which pyiqa's `clip_model.load` rebuilds from its tensor shapes (heads =
    width / 64 there, so the text width is 64)."""
    from pyiqa.archs.clip_model import CLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=32, vision_patch_size=None,
                 context_length=77, vocab_size=49408, transformer_width=width, transformer_heads=width // 64,
                 transformer_layers=1).eval()
    example = (torch.randn(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long))
    path = tmp_path / "clip_tiny.pt"
    with warnings.catch_warnings():  # tracing CLIP's attention warns about shape checks it freezes: irrelevant here
        warnings.simplefilter("ignore")
        torch.jit.trace(model, example, check_trace=False).save(str(path))
    return path


def test_clipiqa_plus_with_local_learned_prompts(tmp_path):
    _pyiqa()
    backbone = _tiny_clip_file(tmp_path)
    images = _images(2)
    # pyiqa's CLIP-IQA+ with the tiny backbone and its initial prompts (nothing downloaded).
    initial = iqa_scores(images, "clipiqa+", backbone=str(backbone), pretrained=False)
    assert len(initial) == 2 and all(0.0 <= value <= 1.0 for value in initial)

    # A learned-prompt file in pyiqa's layout ([2 prompts, 16 context tokens, text width 64]) is what scores.
    prompts = tmp_path / "learned_prompts.pth"
    torch.save(torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)), prompts)
    learned = iqa_scores(images, "clipiqa+", prompts, backbone=str(backbone))
    assert all(0.0 <= value <= 1.0 for value in learned)
    assert not np.allclose(learned, initial)
    assert iqa_scores(images, "clipiqa+", prompts, backbone=str(backbone)) == learned  # deterministic

    torch.save(torch.randn(2, 8, 64), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"learned prompt context, a tensor of shape \(2, 16, 64\)"):
        iqa_scores(images, "clipiqa+", tmp_path / "wrong.pth", backbone=str(backbone))
