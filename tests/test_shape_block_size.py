"""`config.shape_block_size`: a model trained block-wise is sampled block-wise unless the caller says otherwise."""

import numpy as np
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


def test_training_batches_lay_generation_out_in_the_configured_blocks():
    from cgmllm.training.collator import CGMLLMDataCollator
    from cgmllm.training.testing import tiny_model, tiny_processor

    processor = tiny_processor()
    model = tiny_model(processor)
    rng = np.random.default_rng(0)
    examples = [{"uid": f"u{i}", "caption": "a box", "latents": rng.normal(size=(8, 8)).astype(np.float32)}
                for i in range(3)]
    settings = dict(task_weights={"text_to_shape": 1.0, "shape_caption": 1.0}, condition_dropout=0.3, seed=2)
    collator = CGMLLMDataCollator(processor, 8, shape_block_size=4, **settings)
    samples = [collator.build_sample(example) for example in examples]
    assert {sample["task"] for sample in samples} == {"text_to_shape", "shape_caption"}  # both kinds in the batch
    batch = collator(examples)

    pad = processor.special_token_ids["obj_pad_token_id"]
    rows, offset = batch["shape_latents"].split([int(n) for n in (batch["input_ids"] == pad).sum(-1)]), 0
    for sample, example, latents in zip(samples, examples, rows):
        source = torch.from_numpy(example["latents"])
        if sample["task"] == "text_to_shape":
            # noisy block 0, its clean copy, noisy block 1: 12 rows, the flow loss on the noisy copies only
            torch.testing.assert_close(latents, torch.cat([source[:4], source[:4], source[4:]]))
            flags = batch["shape_loss_mask"][offset:offset + 12]
            assert flags.tolist() == [True] * 4 + [False] * 4 + [True] * 4
        else:  # captioning reads the object as one clean block, whatever the generation block size
            torch.testing.assert_close(latents, source)
            assert not bool(batch["shape_loss_mask"][offset:offset + 8].any())
        offset += len(latents)
    for row, sample in zip(batch["shape_block_ids"], samples):
        blocks = row[row >= 0].unique().tolist()
        assert blocks == ([0, 1, 2] if sample["task"] == "text_to_shape" else [0])

    # The layout is the one the model's block-causal mask and the pipeline's block-by-block sampling expect: the
    # packed batch gives the unpacked batch's velocities, and a training step has both losses.
    packed = CGMLLMDataCollator(processor, 8, shape_block_size=4, max_tokens=200, **settings)(examples)
    timesteps = torch.where(batch["shape_loss_mask"], 0.5, 0.0)
    with torch.no_grad():
        a = model(**batch, shape_timesteps=timesteps).velocity
        b = model(**packed, shape_timesteps=timesteps).velocity
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    out = model(**batch)
    assert torch.isfinite(out.flow_loss) and torch.isfinite(out.lm_loss)

    assert "shape_block_ids" not in CGMLLMDataCollator(processor, 8, **settings)(examples)  # one block: unchanged
    with pytest.raises(ValueError, match="shape_block_size=3"):
        CGMLLMDataCollator(processor, 8, shape_block_size=3)
