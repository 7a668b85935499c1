"""Denoising steps through the standard cache API (update, then crop back) with DynamicCache and StaticCache, and
the attention paths a step can take on CPU (no mask -> sdpa's unmasked kernel, dense masks, flex block masks)."""

import pytest
import torch
from conftest import shape_span
from transformers.cache_utils import Cache, DynamicCache, StaticCache, StaticSlidingWindowLayer

from cgmllm.masking_cgmllm import create_hybrid_attention_mask


PROMPT = torch.tensor([[21, 22, 23, 24, 25]])
BLOCK = torch.tensor([shape_span(6)])


def _step(model, cache, latents, timesteps, attention_mask=None):
    rope = torch.full((3, 1, BLOCK.shape[1]), PROMPT.shape[1])
    return model(input_ids=BLOCK, cache=cache, update_cache=False, position_ids=rope, attention_mask=attention_mask,
                 shape_latents=latents, shape_timesteps=timesteps).velocity


@pytest.mark.parametrize("cache_type", ["dynamic", "static"])
def test_denoising_step_updates_then_crops_the_cache(tiny_model, cache_type):
    latents, timesteps = torch.randn(6, 8), torch.full((6,), 0.8)
    with torch.no_grad():
        full = tiny_model(input_ids=torch.cat([PROMPT, BLOCK], 1), shape_latents=latents, shape_timesteps=timesteps)
        if cache_type == "dynamic":
            cache = DynamicCache(config=tiny_model.config.text_config)
        else:
            cache = StaticCache(config=tiny_model.config.text_config, max_cache_len=32)
        tiny_model(input_ids=PROMPT, cache=cache, use_cache=True)
        prompt_keys = cache.layers[0].keys[:, :, : PROMPT.shape[1]].clone()
        for _ in range(3):  # every step sees the prompt only: the previous step's rows were cropped off
            velocity = _step(tiny_model, cache, latents, timesteps)
            assert int(cache.get_seq_length()) == PROMPT.shape[1]
            torch.testing.assert_close(velocity, full.velocity, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache.layers[0].keys[:, :, : PROMPT.shape[1]], prompt_keys, rtol=0, atol=0)


def test_a_cache_that_cannot_be_cropped_is_refused(tiny_model):
    # A static sliding window longer than its window cannot restore cropped states.
    layers = [StaticSlidingWindowLayer(max_cache_len=32, sliding_window=4) for _ in range(2)]
    cache = Cache(layers=layers)
    with torch.no_grad():
        tiny_model(input_ids=PROMPT, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="cannot be cropped"):
            _step(tiny_model, cache, torch.randn(6, 8), torch.full((6,), 0.5))


def test_unpadded_denoising_step_needs_no_mask_and_every_kernel_agrees(tiny_model):
    latents, timesteps = torch.randn(6, 8), torch.full((6,), 0.6)
    config = tiny_model.config.text_config
    embeds = torch.zeros(1, BLOCK.shape[1], 4)
    block_ids, noisy = torch.zeros_like(BLOCK), torch.ones_like(BLOCK, dtype=torch.bool)
    # Unpadded prompt: no mask at all (sdpa runs unmasked, non-causal: its flash path on a GPU).
    assert create_hybrid_attention_mask(config, embeds, None, PROMPT.shape[1], block_ids, noisy) is None
    # A padded prompt keeps the padding mask, broadcast over the queries.
    padded = torch.tensor([[0] + [1] * (PROMPT.shape[1] - 1) + [1] * BLOCK.shape[1]])
    mask = create_hybrid_attention_mask(config, embeds, padded, PROMPT.shape[1], block_ids, noisy)
    assert mask.shape == (1, 1, 1, PROMPT.shape[1] + BLOCK.shape[1]) and not bool(mask[0, 0, 0, 0])

    results, padded_results = {}, {}
    padded_prompt = torch.cat([torch.zeros(1, 1, dtype=torch.long), PROMPT], 1)
    padded_mask = torch.ones(1, padded_prompt.shape[1] + BLOCK.shape[1], dtype=torch.long)
    padded_mask[0, 0] = 0
    rope = torch.full((3, 1, BLOCK.shape[1]), PROMPT.shape[1])
    with torch.no_grad():
        full = tiny_model(input_ids=torch.cat([PROMPT, BLOCK], 1), shape_latents=latents, shape_timesteps=timesteps)
        for implementation in ("sdpa", "eager", "flex_attention"):
            tiny_model.set_attn_implementation({"text_config": implementation, "vision_config": "sdpa"})
            cache = DynamicCache(config=config)
            tiny_model(input_ids=PROMPT, cache=cache, use_cache=True)
            results[implementation] = _step(tiny_model, cache, latents, timesteps)
            # A left-padded prompt: the padding mask path (dense for sdpa / eager, a BlockMask for flex).
            cache = DynamicCache(config=config)
            tiny_model(input_ids=padded_prompt, attention_mask=padded_mask[:, : padded_prompt.shape[1]], cache=cache,
                       use_cache=True)
            padded_results[implementation] = tiny_model(
                input_ids=BLOCK, cache=cache, update_cache=False, position_ids=rope, attention_mask=padded_mask,
                shape_latents=latents, shape_timesteps=timesteps).velocity
        tiny_model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    for implementation in results:
        torch.testing.assert_close(results[implementation], full.velocity, rtol=1e-4, atol=1e-5, msg=implementation)
        torch.testing.assert_close(padded_results[implementation], full.velocity, rtol=1e-4, atol=1e-5,
                                   msg=implementation)


def test_denoising_steps_trace_with_torch_compile_without_recompiling(tiny_model):
    # Dynamo tracing only (`backend="eager"`: no code generation, seconds on CPU); the inductor speed-up is measured
    # by benchmarks/bench_denoise_compile.py. Graphs for the prefill, the first step and the steps on the cropped
    # cache; later steps reuse them.
    import torch._dynamo

    torch._dynamo.reset()
    latents, timesteps = torch.randn(6, 8), torch.full((6,), 0.3)
    with torch.no_grad():
        cache = DynamicCache(config=tiny_model.config.text_config)
        tiny_model(input_ids=PROMPT, cache=cache, use_cache=True)
        expected = _step(tiny_model, cache, latents, timesteps)
        decoder = tiny_model.model.language_model
        compiled = torch.compile(decoder, backend="eager", dynamic=False)
        tiny_model.model.language_model = compiled
        try:
            cache = DynamicCache(config=tiny_model.config.text_config)
            tiny_model(input_ids=PROMPT, cache=cache, use_cache=True)
            graphs = []
            for _ in range(4):
                torch.testing.assert_close(_step(tiny_model, cache, latents, timesteps), expected, rtol=1e-5,
                                           atol=1e-6)
                graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        finally:
            tiny_model.model.language_model = decoder
    assert graphs[1] == graphs[2] == graphs[3]  # after the first two steps, nothing is compiled again


def test_packed_training_row_flex_block_mask_matches_dense_masks(tiny_model):
    # A padding-free packed row (position ids restart per sample) with a noisy and a clean 3D block: flex attention
    # gets a BlockMask built from the same rule, sdpa / eager a dense mask; all three agree (forward only: flex
    # attention has no backward on CPU).
    from torch.nn.attention.flex_attention import BlockMask
    from transformers import DataCollatorWithFlattening

    samples = [[31, 32] + shape_span(6) + [33, 34], shape_span(6) + [41, 42, 43], [51, 52, 53]]
    flat = DataCollatorWithFlattening()([{"input_ids": s} for s in samples])
    latents = torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([0.7] * 6 + [0.0] * 6)
    seen_masks, results = {}, {}
    original = tiny_model.model.language_model.forward
    for implementation in ("sdpa", "eager", "flex_attention"):
        tiny_model.set_attn_implementation({"text_config": implementation, "vision_config": "sdpa"})

        def spy(*args, _name=implementation, **kwargs):
            seen_masks[_name] = kwargs.get("attention_mask")
            return original(*args, **kwargs)

        tiny_model.model.language_model.forward = spy
        with torch.no_grad():  # flex attention has no backward on CPU
            out = tiny_model(**flat, shape_latents=latents, shape_timesteps=timesteps)
        results[implementation] = (out.loss, out.velocity, out.logits)
    tiny_model.model.language_model.forward = original
    tiny_model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    # Drop the compiled flex kernels: on CPU, recompiling them in the same process for another test's shapes can
    # fail inside inductor's C++ build (seen with torch 2.13), a state leak between tests, not a model problem.
    torch._dynamo.reset()
    assert isinstance(seen_masks["flex_attention"], BlockMask)
    assert isinstance(seen_masks["sdpa"], torch.Tensor) and seen_masks["sdpa"].dtype == torch.bool
    for implementation in ("eager", "flex_attention"):
        for actual, expected in zip(results[implementation], results["sdpa"]):
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=implementation)
