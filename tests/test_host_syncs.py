"""A denoising step reads nothing on the host: the whole forward (embedding bookkeeping, input checks, mask, decoder,
velocity head) traces into one graph with `fullgraph=True`, and its input checks become device-side asserts there.
The sync-free rewrites of the embedding code give the same values as the indexing rules they replace.

`torch.cuda.set_sync_debug_mode` needs CUDA; on CPU, a host read (`.item()`, `bool(tensor)`, `nonzero`) inside the
traced forward is a graph break, which `fullgraph=True` turns into an error.
"""

import pytest
import torch
import torch._dynamo
from conftest import OBJ_END, OBJ_PAD, OBJ_START, shape_span
from transformers.cache_utils import DynamicCache, StaticCache

from cgmllm.modeling_cgmllm import CGMLLMModel, masked_row_indices


PROMPT = torch.tensor([[0, 21, 22, 23, 24], [31, 32, 33, 34, 35]])  # row 0 left-padded, as the pipeline's batches
BLOCK = torch.tensor([shape_span(6)] * 2)


def _denoising_step(model, cache, latents, sigma, block=BLOCK):
    mask = torch.cat([(PROMPT != 0).long(), torch.ones(2, block.shape[1], dtype=torch.long)], 1)
    rope = torch.full((3, 2, block.shape[1]), PROMPT.shape[1])
    return model(input_ids=block, cache=cache, update_cache=False, attention_mask=mask, position_ids=rope,
                 shape_block_ids=torch.zeros_like(block), shape_latents=latents, shape_timesteps=sigma,
                 logits_to_keep=1).velocity


def _prefilled(model, cache_type="dynamic"):
    if cache_type == "dynamic":
        cache = DynamicCache(config=model.config.text_config)
    else:  # its length is a device tensor: traced steps take it from the attention mask's width instead
        cache = StaticCache(config=model.config.text_config, max_cache_len=24)
    with torch.no_grad():
        model(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("implementation, cache_type", [("sdpa", "dynamic"), ("eager", "dynamic"), ("sdpa", "static")])
def test_denoising_step_traces_into_one_graph(tiny_model, implementation, cache_type):
    tiny_model.set_attn_implementation({"text_config": implementation, "vision_config": "sdpa"})
    latents = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    sigmas = [torch.full((1,), s) for s in (0.9, 0.5)]
    cache = _prefilled(tiny_model, cache_type)
    with torch.no_grad():
        expected = [_denoising_step(tiny_model, cache, latents, s) for s in sigmas]
    torch._dynamo.reset()
    # Dynamo tracing only (`backend="eager"`: no code generation); any host read would be a graph break -> error.
    compiled = torch.compile(_denoising_step, fullgraph=True, backend="eager", dynamic=False)
    try:
        with torch.no_grad():
            for sigma, reference in zip(sigmas, expected):
                torch.testing.assert_close(compiled(tiny_model, cache, latents, sigma), reference, rtol=1e-5,
                                           atol=1e-6)
        assert int(cache.get_seq_length()) == PROMPT.shape[1]
        explanation = torch._dynamo.explain(_denoising_step)(tiny_model, cache, latents, sigmas[0])
    finally:
        torch._dynamo.reset()
        tiny_model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def test_compiled_step_still_checks_its_inputs(tiny_model):
    # In the graph the row-count check is a device-side assert: a wrong number of latent rows still fails.
    cache = _prefilled(tiny_model)
    torch._dynamo.reset()
    compiled = torch.compile(_denoising_step, fullgraph=True, backend="eager", dynamic=False)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="number of `<\\|obj_pad\\|>` tokens must equal"):
            # 11 `<|obj_pad|>` tokens (6 + 5) for 12 latent rows.
            block = torch.tensor([shape_span(6), [OBJ_START] + [OBJ_PAD] * 5 + [11, OBJ_END]])
            compiled(tiny_model, cache, torch.randn(12, 8), torch.full((1,), 0.5), block)
    finally:
        torch._dynamo.reset()


def test_masked_row_indices_equal_nonzero():
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        mask = torch.rand(3, 17, generator=generator) < 0.4
        expected = mask.reshape(-1).nonzero().reshape(-1)
        assert torch.equal(masked_row_indices(mask, int(mask.sum())), expected)


def _noisy_token_mask_by_loops(shape_row_mask, shape_block_ids, shape_timesteps):
    """The rule written out: every token of a block that holds a latent row with t > 0."""
    noisy = torch.zeros_like(shape_row_mask)
    rows = shape_row_mask.nonzero().tolist()
    for (b, l), t in zip(rows, shape_timesteps.tolist()):
        if t > 0:
            noisy[b] |= shape_block_ids[b] == shape_block_ids[b, l]
    return noisy


def test_noisy_token_mask_equals_the_rule():
    # A clean block, a noisy block, a mixed one (clean rows inside a noisy block), another clean one, a row without
    # blocks.
    input_ids = torch.tensor([
        [11] + shape_span(3) + [12] + shape_span(2) + [13, 14],
        shape_span(4) + [15] + shape_span(2) + [17, 18],
        [16] * 13,
    ])
    is_start, is_end = input_ids == OBJ_START, input_ids == OBJ_END
    depth = is_start.long().cumsum(-1) - (is_end.long().cumsum(-1) - is_end.long())
    block_ids = torch.where(depth == 1, is_start.long().cumsum(-1) - 1, torch.full_like(depth, -1))
    row_mask = input_ids == OBJ_PAD
    count = int(row_mask.sum())
    for timesteps in (torch.zeros(count), torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 0.7, 0.0, 0.2, 0.0, 0.0, 0.0])):
        actual = CGMLLMModel._noisy_token_mask(masked_row_indices(row_mask, count), block_ids, timesteps)
        assert torch.equal(actual, _noisy_token_mask_by_loops(row_mask, block_ids, timesteps))


def test_drawn_timesteps_follow_their_blocks(tiny_model):
    # Training draws one t per (row, block); every latent row of a block gets its block's t, clean rows 0.
    input_ids = torch.tensor([[11] + shape_span(3) + shape_span(2), shape_span(2) + [12] + shape_span(3)])
    loss_mask = torch.tensor([True] * 3 + [False] * 2 + [True] * 5)
    out = tiny_model.model(input_ids=input_ids, shape_latents=torch.randn(10, 8), shape_loss_mask=loss_mask,
                           generator=torch.Generator().manual_seed(3))
    logits = torch.randn(2, input_ids.shape[1], generator=torch.Generator().manual_seed(3))
    config = tiny_model.config
    block_t = torch.sigmoid(config.timestep_logit_mean + config.timestep_logit_std * logits)
    block_t = config.timestep_shift * block_t / (1 + (config.timestep_shift - 1) * block_t)
    expected = torch.tensor([block_t[0, 0]] * 3 + [0.0] * 2 + [block_t[1, 0]] * 2 + [block_t[1, 1]] * 3)
    torch.testing.assert_close(out.shape_timesteps, expected)
