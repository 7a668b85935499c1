"""The flash-attn 2 path: which forwards run on flash-attn, which fall back (and to what), and the varlen bookkeeping
(unpadding, `cu_seqlens`, padding back), against the sdpa path.

flash-attn cannot run here (no CUDA GPU, no CUDA wheel): the kernels transformers calls are replaced by
`flash_attn_standin` (plain SDPA per sequence, with flash-attn's documented semantics). Everything around the kernel
is the real code: transformers' flash integration (`_flash_attention_forward`, its unpad / pad helpers) and
CG-MLLM's dispatch (`prepare_attention`). The kernel itself is compared on a GPU by `benchmarks/gpu_checks.sh`.
"""

import flash_attn_standin as standin
import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils
from conftest import IMAGE, OBJ_END, OBJ_PAD, OBJ_START, VISION_END, VISION_START, shape_span
from torch.nn.attention.flex_attention import BlockMask
from transformers import DataCollatorWithFlattening
from transformers.cache_utils import DynamicCache, StaticCache

import cgmllm.masking_cgmllm as masking
from cgmllm.masking_cgmllm import packed_cu_seqlens, prepare_attention


@pytest.fixture
def flash_standin(monkeypatch):
    """Make transformers' flash-attn 2 integration call the stand-in kernels (and treat flash-attn as installed)."""
    monkeypatch.setattr(masking, "is_flash_attn_2_available", lambda: True)

    def lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        return (standin.flash_attn_func, standin.flash_attn_varlen_func, None, flash_utils._pad_input,
                flash_utils._unpad_input)

    monkeypatch.setattr(flash_utils, "_lazy_imports", lazy_imports)
    # transformers caches the loaded kernels in module globals: start empty, restore whatever was there afterwards.
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        monkeypatch.setattr(flash_utils, name, None)
    standin.CALLS.update(varlen=0, dense=0)
    return standin.CALLS


def _use(model, implementation):
    model.config.text_config._attn_implementation = implementation


def _run_both(model, call):
    """`call()` under sdpa, then under flash_attention_2 (the stand-in); returns both results."""
    _use(model, "sdpa")
    with torch.no_grad():
        reference = call()
    _use(model, "flash_attention_2")
    try:
        with torch.no_grad():
            result = call()
    finally:
        _use(model, "sdpa")
    return reference, result


# Dispatch (no kernel runs) --------------------------------------------------------------------------------------------
def _setup(tiny_config, input_ids, attention_mask=None, past=0, noisy=None, packed=None, cache=None):
    config = tiny_config.text_config
    config._attn_implementation = "flash_attention_2"
    block_ids = torch.tensor(input_ids)
    block_ids = torch.where((block_ids == OBJ_START) | (block_ids == OBJ_PAD) | (block_ids == OBJ_END), 0, -1)
    noisy = torch.zeros_like(block_ids, dtype=torch.bool) if noisy is None else torch.tensor(noisy)
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    embeds = torch.zeros(*block_ids.shape, 32)
    return prepare_attention(config, embeds, mask, past, block_ids, noisy,
                             None if packed is None else torch.tensor(packed), cache=cache)


def test_flash_dispatch_rule(tiny_config, flash_standin):
    # Causal prefill, unpadded: flash-attn with no mask at all.
    setup = _setup(tiny_config, [[11, 12, 13, 14]])
    assert (setup.implementation, setup.mask, setup.kwargs) == ("flash_attention_2", None, {"is_causal": True})
    # Left-padded prefill: the 2D padding mask, which transformers unpads into the varlen layout.
    setup = _setup(tiny_config, [[0, 12, 13], [11, 12, 13]], [[0, 1, 1], [1, 1, 1]])
    assert setup.implementation == "flash_attention_2" and setup.kwargs == {"is_causal": True}
    assert torch.equal(setup.mask, torch.tensor([[False, True, True], [True, True, True]]))
    # A denoising step (one noisy block after 5 cached tokens): not causal; padded prompt -> padding mask.
    block = [shape_span(3)] * 2
    setup = _setup(tiny_config, block, past=5, noisy=[[True] * 5] * 2)
    assert (setup.implementation, setup.mask, setup.kwargs) == ("flash_attention_2", None, {"is_causal": False})
    padded = [[0] + [1] * 9, [1] * 10]
    setup = _setup(tiny_config, block, padded, past=5, noisy=[[True] * 5] * 2)
    assert setup.kwargs == {"is_causal": False} and torch.equal(setup.mask, torch.tensor(padded).bool())
    # A StaticCache hands the kernel all its slots: the mask of the real columns cuts the keys to them.
    cache = StaticCache(config=tiny_config.text_config, max_cache_len=16)
    cache.update(torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), 0)
    setup = _setup(tiny_config, [shape_span(3)], past=5, noisy=[[True] * 5], cache=cache)
    assert setup.implementation == "flash_attention_2" and torch.equal(setup.mask, torch.ones(1, 10, dtype=torch.bool))
    # Padding-free packed text: causal varlen over the samples, boundaries from the packed-sample ids.
    setup = _setup(tiny_config, [[11, 12, 13, 21, 22, 31]], packed=[[0, 0, 0, 1, 1, 2]])
    assert setup.implementation == "flash_attention_2" and setup.mask is None and setup.kwargs["is_causal"]
    assert setup.kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and setup.kwargs["max_length_q"] == 3
    assert setup.kwargs["cu_seq_lens_q"].dtype == torch.int32


@pytest.mark.parametrize("past", [0, 5])
def test_wrong_shaped_attention_mask_is_refused_like_sdpa(tiny_config, flash_standin, past):
    # An all-ones mask of the wrong length must not be dropped as "no padding" before its shape is checked.
    ids = [[11, 12, 13, 14]] if past == 0 else [shape_span(3)]
    noisy = None if past == 0 else [[True] * 5]
    message = r"`attention_mask` must have shape \(batch, cached \+ new tokens\) = \(1, %d\), got \(1, 3\)" % (
        past + len(ids[0])
    )
    for implementation in ("flash_attention_2", "sdpa"):
        tiny_config.text_config._attn_implementation = implementation
        block_ids = torch.tensor(ids)
        block_ids = torch.where((block_ids == OBJ_START) | (block_ids == OBJ_PAD) | (block_ids == OBJ_END), 0, -1)
        noisy_mask = torch.zeros_like(block_ids, dtype=torch.bool) if noisy is None else torch.tensor(noisy)
        with pytest.raises(ValueError, match=message):
            prepare_attention(tiny_config.text_config, torch.zeros(1, len(ids[0]), 32),
                              torch.ones(1, 3, dtype=torch.long), past, block_ids, noisy_mask)
    tiny_config.text_config._attn_implementation = "sdpa"


def test_hybrid_masks_fall_back_to_sdpa_or_flex(tiny_config, flash_standin):
    # A training row: caption, then a noisy block (bidirectional inside a causal sequence) -> sdpa, dense mask.
    ids = [[11, 12] + shape_span(3)]
    setup = _setup(tiny_config, ids, noisy=[[False] * 2 + [True] * 5])
    assert setup.implementation == "sdpa" and setup.mask.dtype == torch.bool and setup.mask.shape == (1, 1, 7, 7)
    # A captioning prompt holding a clean block: also needs the hybrid mask.
    setup = _setup(tiny_config, [shape_span(3) + [11, 12]])
    assert setup.implementation == "sdpa" and setup.mask.shape == (1, 1, 7, 7)
    # Padding-free packed rows with 3D blocks -> flex attention's sparse block mask.
    setup = _setup(tiny_config, [shape_span(3) + [11] + shape_span(3)], packed=[[0] * 6 + [1] * 5])
    assert setup.implementation == "flex_attention" and isinstance(setup.mask, BlockMask)
    # Packed and padded text: no varlen layout covers both -> flex.
    setup = _setup(tiny_config, [[11, 12, 21, 0]], [[1, 1, 1, 0]], packed=[[0, 0, 1, 1]])
    assert setup.implementation == "flex_attention"


def test_packed_cu_seqlens_across_rows():
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    cu_seqlens, longest = packed_cu_seqlens(ids)
    assert cu_seqlens.tolist() == [0, 2, 5, 6, 10] and longest == 4


# Equivalence with sdpa (the stand-in kernel) --------------------------------------------------------------------------
def test_padded_prefill_then_denoising_steps_equal_sdpa(tiny_model, flash_standin):
    # The pipeline's shapes: a left-padded prompt batch prefilled into a cache, then denoising steps on one block,
    # then the clean block written into the cache and the next block's step.
    prompt = torch.tensor([[0, 0, 21, 22, 23], [31, 32, 33, 34, 35]])
    prompt_mask = (prompt != 0).long()
    block = torch.tensor([[OBJ_START] + [OBJ_PAD] * 3] * 2)
    next_block = torch.tensor([[OBJ_PAD] * 3 + [OBJ_END]] * 2)
    latents = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))

    def run():
        cache = DynamicCache(config=tiny_model.config.text_config)
        prefill = tiny_model(input_ids=prompt, attention_mask=prompt_mask, cache=cache, use_cache=True)
        rope = torch.full((3, 2, 4), 6)
        mask = torch.cat([prompt_mask, torch.ones(2, 4, dtype=torch.long)], 1)
        step = dict(cache=cache, position_ids=rope, shape_block_ids=torch.zeros_like(block))
        noisy = tiny_model(input_ids=block, attention_mask=mask, update_cache=False, shape_latents=latents,
                           shape_timesteps=torch.full((1,), 0.7), **step).velocity
        tiny_model(input_ids=block, attention_mask=mask, shape_latents=latents, shape_timesteps=torch.zeros(1),
                   **step)
        mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
        step.update(position_ids=rope + 1)
        second = tiny_model(input_ids=next_block, attention_mask=mask, update_cache=False, shape_latents=latents,
                            shape_timesteps=torch.full((1,), 0.4), **step).velocity
        keys = cache.layers[-1].keys  # the prompt and the clean block; row 0's two padding columns are never read
        return prefill.logits[:, -1], noisy, second, keys[0, :, 2:], keys[1]

    reference, result = _run_both(tiny_model, run)
    assert flash_standin["varlen"] > 0  # padded: unpadded into the varlen layout
    for actual, expected in zip(result, reference):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_unpadded_prefill_and_step_use_the_plain_kernel(tiny_model, flash_standin):
    prompt = torch.tensor([[21, 22, 23, 24, 25]])
    block = torch.tensor([shape_span(6)])
    latents = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))

    def run():
        cache = DynamicCache(config=tiny_model.config.text_config)
        logits = tiny_model(input_ids=prompt, cache=cache, use_cache=True).logits
        velocity = tiny_model(input_ids=block, cache=cache, update_cache=False, position_ids=torch.full((3, 1, 8), 5),
                              shape_latents=latents, shape_timesteps=torch.full((1,), 0.5)).velocity
        return logits, velocity

    reference, result = _run_both(tiny_model, run)
    assert flash_standin == {"varlen": 0, "dense": 2 * tiny_model.config.text_config.num_hidden_layers}
    for actual, expected in zip(result, reference):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_static_cache_step_equals_sdpa(tiny_model, flash_standin):
    prompt = torch.tensor([[21, 22, 23, 24, 25]])
    block = torch.tensor([shape_span(6)])
    latents = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))

    def run():
        cache = StaticCache(config=tiny_model.config.text_config, max_cache_len=32)
        tiny_model(input_ids=prompt, cache=cache, use_cache=True)
        return tiny_model(input_ids=block, cache=cache, update_cache=False, position_ids=torch.full((3, 1, 8), 5),
                          shape_latents=latents, shape_timesteps=torch.full((1,), 0.5)).velocity

    reference, result = _run_both(tiny_model, run)
    # Both forwards ran on the flash stand-in (with the padding mask of the real columns, hence varlen), not on the
    # sdpa fallback.
    assert flash_standin["varlen"] == 2 * tiny_model.config.text_config.num_hidden_layers
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-5)


def test_packed_text_rows_use_varlen_and_equal_sdpa(tiny_model, flash_standin):
    samples = [[11, 12, 13, 14], [21, 22], [31, 32, 33]]
    flat = DataCollatorWithFlattening()([{"input_ids": s} for s in samples])
    reference, result = _run_both(tiny_model, lambda: tiny_model(**flat))
    assert flash_standin["varlen"] == tiny_model.config.text_config.num_hidden_layers
    assert result.loss is not None
    torch.testing.assert_close(result.logits, reference.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.loss, reference.loss, rtol=1e-4, atol=1e-5)


def test_training_batch_with_a_noisy_block_falls_back_to_sdpa(tiny_model, flash_standin):
    input_ids = torch.tensor([[11, 12] + shape_span(6) + [13], [0, 0, 21] + shape_span(6)])
    attention_mask = (input_ids != 0).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    latents = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([0.3] * 6 + [0.8] * 6)
    reference, result = _run_both(tiny_model, lambda: tiny_model(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, shape_latents=latents,
        shape_timesteps=timesteps))
    assert flash_standin == {"varlen": 0, "dense": 0}  # no forward here can run on flash-attn
    torch.testing.assert_close(result.loss, reference.loss, rtol=0, atol=0)


def test_generate_on_a_padded_batch_equals_sdpa(tiny_model, flash_standin):
    # Captioning-style decoding: a left-padded prefill, then one token at a time against the cache (query length 1).
    input_ids = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24]])
    attention_mask = (input_ids != 0).long()
    reference, result = _run_both(tiny_model, lambda: tiny_model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False))
    assert flash_standin["varlen"] > 0
    torch.testing.assert_close(result, reference)


def test_image_prompt_with_both_towers_on_flash_equals_sdpa(tiny_model, flash_standin):
    # `attn_implementation="flash_attention_2"` sets the vision tower too: Qwen3-VL's own varlen attention over the
    # image patches (transformers' code), then CG-MLLM's causal prefill over text and image rows.
    input_ids = torch.tensor([[11, VISION_START] + [IMAGE] * 4 + [VISION_END, 12]])
    pixel_values = torch.randn(4, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(4))
    grid = torch.tensor([[1, 2, 2]])
    vision_config = tiny_model.config.vision_config

    def run():
        vision_config._attn_implementation = tiny_model.config.text_config._attn_implementation
        return tiny_model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid).logits

    try:
        reference, result = _run_both(tiny_model, run)
    finally:
        vision_config._attn_implementation = "sdpa"
    assert flash_standin["varlen"] == vision_config.depth  # one varlen call per vision block
    assert flash_standin["dense"] == tiny_model.config.text_config.num_hidden_layers  # unpadded causal prefill
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-5)


def test_pipeline_generation_equals_sdpa(flash_standin):
    # The whole text -> 3D loop: a left-padded [cond ; uncond] prefill, denoising steps in blocks of 4 rows, the clean
    # blocks written into the cache, and the conditional-only steps outside the guidance interval.
    from test_pipeline import PROMPTS, _tiny_pipeline

    pipe = _tiny_pipeline()

    def run():
        noise = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(5))
        return pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, guidance_interval=(0.0, 0.9), latents=noise,
                    shape_block_size=4, output_type="latent").latents

    reference, result = _run_both(pipe.model, run)
    assert flash_standin["varlen"] > 0
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-5)


# Errors ---------------------------------------------------------------------------------------------------------------
def test_flash_attention_without_flash_attn_is_a_clear_error(tiny_model, monkeypatch):
    monkeypatch.setattr(masking, "is_flash_attn_2_available", lambda: False)
    _use(tiny_model, "flash_attention_2")
    try:
        with pytest.raises(ImportError, match=r"flash-attn package and a CUDA GPU.*cg-mllm\[gpu\]"):
            tiny_model(input_ids=torch.tensor([[11, 12]]))
    finally:
        _use(tiny_model, "sdpa")
    # Through transformers' own switch (it checks the package itself).
    if not flash_utils.is_flash_attn_2_available():
        with pytest.raises(ImportError, match="FlashAttention2"):
            tiny_model.set_attn_implementation({"text_config": "flash_attention_2", "vision_config": "sdpa"})
