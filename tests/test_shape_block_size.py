"""`config.shape_block_size`: a model trained block-wise is sampled block-wise unless the caller says otherwise."""

import pytest
import torch
from test_pipeline import N, PROMPTS, STEPS, _tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return _tiny_pipeline()


def _latents(pipe, **kwargs):
    noise = torch.randn(1, N, pipe.latent_channels, generator=torch.Generator().manual_seed(0))
    return pipe(PROMPTS[0], latents=noise, num_inference_steps=STEPS, guidance_scale=3.0, output_type="latent",
                **kwargs).latents


def test_pipeline_samples_with_the_trained_block_size(pipe):
    whole = _latents(pipe)
    assert pipe.model.config.shape_block_size is None
    pipe.model.config.shape_block_size = 4
    try:
        by_default = _latents(pipe)
        torch.testing.assert_close(by_default, _latents(pipe, shape_block_size=4), rtol=0, atol=0)
        assert not torch.allclose(by_default, whole, atol=1e-4)  # block-wise differs from one block
        torch.testing.assert_close(_latents(pipe, shape_block_size=N), whole, rtol=0, atol=0)
        with pytest.raises(ValueError, match="shape_block_size=4"):
            _latents(pipe, num_shape_tokens=6)
    finally:
        pipe.model.config.shape_block_size = None
