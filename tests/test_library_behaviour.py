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
        # Without labels: every position's logits, the last token of each sample included.
        packed_all = tiny_model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], **extra).logits
        padded_all = tiny_model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits

    start = 0
    for row, sample in enumerate(samples):
        torch.testing.assert_close(packed_all[0, start:start + len(sample)], padded_all[row, : len(sample)],
                                   rtol=1e-5, atol=1e-5)
        start += len(sample)
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
    # The collator's optional extras (flash-attention varlen kwargs, `seq_idx`) are accepted and change nothing.
    full = DataCollatorWithFlattening(position_ids_start=5, return_flash_attn_kwargs=True, return_seq_idx=True)(
        [{"input_ids": s} for s in samples]
    )
    assert {"cu_seq_lens_q", "seq_idx"} <= set(full)
    with torch.no_grad():
        from_full = tiny_model(**{k: v for k, v in full.items() if k != "labels"}, **extra)
    torch.testing.assert_close(from_full.logits, from_ids.logits, rtol=1e-5, atol=1e-5)
    # The mRoPE ids are the model's own (one id per 3D block, image grids), shifted to the given start.
    torch.testing.assert_close(from_positions.position_ids, from_ids.position_ids + 5)
    block = from_positions.position_ids[:, 0, 2:10]
    assert bool((block == block[0, 0]).all())


# generate(**processor_outputs) -----------------------------------------------------------------------------------------
def _image_prompts(batch_size=2):
    """What a Qwen3-VL-style processor returns for image prompts: ids (left-padded), mask, pixels, grids and
    `mm_token_type_ids` (0 text, 1 image)."""
    rows = [[11, VISION_START] + [IMAGE] * 4 + [VISION_END, 12, 13], [21, VISION_START] + [IMAGE] * 4 + [VISION_END, 22]]
    rows = rows[:batch_size]
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    pixel_values, grid = _pixels(batch_size)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
        "mm_token_type_ids": (input_ids == IMAGE).int(),
    }


@pytest.mark.parametrize(
    "mode, generate_kwargs, batch_size",
    [
        ("greedy", dict(do_sample=False), 2),
        ("sampling", dict(do_sample=True, top_k=5), 2),
        ("beam search", dict(do_sample=False, num_beams=2), 2),
        ("beam sampling", dict(do_sample=True, num_beams=2), 2),
        ("logits_to_keep", dict(do_sample=False, logits_to_keep=1), 2),
        ("prompt lookup", dict(do_sample=False, prompt_lookup_num_tokens=2), 1),
    ],
)
def test_generate_accepts_the_processor_outputs(tiny_model, mode, generate_kwargs, batch_size):
    """`mm_token_type_ids` is accepted (as by Qwen3-VL) and changes nothing: the ids locate the image rows."""
    inputs = _image_prompts(batch_size)
    without_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    torch.manual_seed(0)
    generated = tiny_model.generate(**inputs, max_new_tokens=4)
    torch.manual_seed(0)
    reference = tiny_model.generate(**without_types, max_new_tokens=4)
    torch.testing.assert_close(generated, reference)
    assert generated.shape == (batch_size, inputs["input_ids"].shape[1] + 4)


def test_assisted_decoding_with_processor_outputs_equals_greedy(tiny_model):
    inputs = _image_prompts(1)
    greedy = tiny_model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assisted = tiny_model.generate(**inputs, max_new_tokens=5, do_sample=False, assistant_model=tiny_model)
    torch.testing.assert_close(assisted, greedy)
    # And greedy itself is the argmax continuation of uncached forwards over the growing sequence.
    current, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(5):
        with torch.no_grad():
            logits = tiny_model(input_ids=current, attention_mask=mask, pixel_values=inputs["pixel_values"],
                                image_grid_thw=inputs["image_grid_thw"]).logits
        current = torch.cat([current, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    torch.testing.assert_close(greedy, current)


# Output flags and return_dict ----------------------------------------------------------------------------------------
def _tiny_pair(attn_implementation="eager"):
    """A tiny Qwen3-VL and the CG-MLLM built from it (TokenAR = the Qwen3-VL weights)."""
    from conftest import OBJ_END, OBJ_PAD, OBJ_START, tiny_text_config, tiny_vision_config
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from cgmllm import CGMLLMForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLConfig(text_config=tiny_text_config(), vision_config=tiny_vision_config(), image_token_id=IMAGE,
                           video_token_id=4, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    qwen = Qwen3VLForConditionalGeneration(config).eval()
    qwen.set_attn_implementation(attn_implementation)
    model = CGMLLMForConditionalGeneration.from_qwen3_vl(
        qwen, obj_start_token_id=OBJ_START, obj_end_token_id=OBJ_END, obj_pad_token_id=OBJ_PAD,
        shape_latent_channels=8, num_shape_tokens=6, attn_implementation=attn_implementation,
    ).eval()
    return qwen, model


def test_output_attentions_and_hidden_states_equal_qwen3_vl():
    qwen, model = _tiny_pair("eager")
    inputs = _image_prompts(2)
    with torch.no_grad():
        expected = qwen(**inputs, output_attentions=True, output_hidden_states=True)
        actual = model(**inputs, output_attentions=True, output_hidden_states=True)
    num_layers = model.config.text_config.num_hidden_layers
    assert len(actual.attentions) == num_layers and len(actual.hidden_states) == num_layers + 1
    real = inputs["attention_mask"].bool()  # what padded query rows hold is each kernel's own business
    for got, want in zip(actual.attentions, expected.attentions):
        torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real], rtol=1e-5, atol=1e-5)
    for got, want in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_attention_weights_follow_the_hybrid_mask(tiny_model):
    tiny_model.set_attn_implementation("eager")
    input_ids = torch.tensor([[11, 12] + shape_span(6) + [13]])
    with torch.no_grad():
        out = tiny_model(input_ids=input_ids, shape_latents=torch.randn(6, 8), shape_timesteps=torch.full((6,), 0.5),
                         output_attentions=True)
    weights = out.attentions[-1][0]  # (heads, seq, seq)
    assert weights.shape == (4, 11, 11)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 11))
    block = slice(2, 10)
    assert bool((weights[:, 10, block] == 0).all())  # nothing reads a noisy block
    assert bool((weights[:, 3, block] > 0).all())  # inside the block: bidirectional
    assert bool((weights[:, 0, 1:] == 0).all())  # text: causal


def test_output_flags_from_the_config():
    """`config.output_hidden_states` / `config.output_attentions` (top-level or text config) work without keywords."""
    from conftest import randomize_heads, tiny_cgmllm_config

    from cgmllm import CGMLLMForConditionalGeneration

    input_ids = torch.randint(7, 80, (2, 6))
    for holder in ("config", "text_config"):
        config = tiny_cgmllm_config()
        target = config if holder == "config" else config.text_config
        target.output_hidden_states = True
        target.output_attentions = True  # selects eager attention, as in transformers
        model = randomize_heads(CGMLLMForConditionalGeneration(config).eval())
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(input_ids=input_ids)
            base = model.model(input_ids=input_ids)
        assert len(out.hidden_states) == 3 and len(out.attentions) == 2, holder
        torch.testing.assert_close(out.hidden_states[-1], base.last_hidden_state)
        assert out.attentions[0].shape == (2, 4, 6, 6)
        with torch.no_grad():
            plain = model(input_ids=input_ids, output_hidden_states=False, output_attentions=False)
        assert plain.hidden_states is None and plain.attentions is None


def test_generate_returns_attentions_and_hidden_states(tiny_model):
    tiny_model.set_attn_implementation("eager")
    inputs = _image_prompts(2)
    out = tiny_model.generate(**inputs, max_new_tokens=3, do_sample=False, output_attentions=True,
                              output_hidden_states=True, return_dict_in_generate=True)
    length = inputs["input_ids"].shape[1]
    assert len(out.attentions) == 3 and len(out.hidden_states) == 3
    assert out.attentions[0][0].shape == (2, 4, length, length)  # prefill
    assert out.attentions[1][0].shape == (2, 4, 1, length + 1)  # first cached step
    assert len(out.hidden_states[0]) == 3 and out.hidden_states[2][0].shape == (2, 1, 32)
    # Padding is never attended to.
    assert bool((out.attentions[0][-1][1, :, 1:, :1] == 0).all())  # row 1 has one pad on the left
    assert bool((out.attentions[2][-1][1, :, :, :1] == 0).all())


def test_return_dict_false_unpacks_like_every_causal_lm(tiny_model):
    input_ids = torch.randint(7, 80, (2, 6))
    with torch.no_grad():
        as_dict = tiny_model(input_ids=input_ids, labels=input_ids)
        loss, logits, *_ = tiny_model(input_ids=input_ids, labels=input_ids, return_dict=False)
    torch.testing.assert_close(loss, as_dict.loss)
    torch.testing.assert_close(logits, as_dict.logits)
    tiny_model.config.return_dict = False
    with torch.no_grad():
        from_config = tiny_model(input_ids=input_ids, labels=input_ids)
        base = tiny_model.model(input_ids=input_ids)
        explicit = tiny_model(input_ids=input_ids, labels=input_ids, return_dict=True)
    assert isinstance(from_config, tuple) and isinstance(base, tuple)
    torch.testing.assert_close(from_config[1], as_dict.logits)
    torch.testing.assert_close(base[0], tiny_model.model(input_ids=input_ids, return_dict=True).last_hidden_state)
    assert explicit.logits is not None
    # generate() keeps working on a model configured for tuples (it asks for dicts itself).
    generated = tiny_model.generate(input_ids=input_ids, max_new_tokens=2, do_sample=False)
    assert generated.shape == (2, 8)


# inputs_embeds -------------------------------------------------------------------------------------------------------
def test_inputs_embeds_for_text_and_image_rows(tiny_model):
    inputs = _image_prompts(2)
    embeds = tiny_model.get_input_embeddings()(inputs["input_ids"])
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "mm_token_type_ids")}
    with torch.no_grad():
        expected = tiny_model(**inputs).logits
        # Image rows found as the `<|image_pad|>` embedding (Qwen3-VL's rule) ...
        from_embeds = tiny_model(inputs_embeds=embeds, **rest).logits
        # ... or marked by `mm_token_type_ids`, whatever the rows hold.
        marked = embeds.masked_fill(inputs["mm_token_type_ids"].bool()[..., None], 0.5)
        from_types = tiny_model(inputs_embeds=marked, mm_token_type_ids=inputs["mm_token_type_ids"], **rest).logits
    torch.testing.assert_close(from_embeds, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_types, expected, rtol=1e-5, atol=1e-5)

    generated = tiny_model.generate(inputs_embeds=embeds, **rest, max_new_tokens=4, do_sample=False)
    reference = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(generated, reference[:, inputs["input_ids"].shape[1]:])


def test_inputs_embeds_with_3d_blocks_need_their_ids(tiny_model):
    input_ids = torch.tensor([[11, 12] + shape_span(6) + [13]])
    latents, timesteps = torch.randn(6, 8), torch.full((6,), 0.3)
    embeds = tiny_model.get_input_embeddings()(input_ids)
    with pytest.raises(ValueError, match="3D blocks cannot be given as `inputs_embeds` alone"):
        tiny_model(inputs_embeds=embeds, shape_latents=latents, shape_timesteps=timesteps)
    with pytest.raises(ValueError, match="3D blocks cannot be given as `inputs_embeds` alone"):
        tiny_model(inputs_embeds=embeds)  # the marker embeddings give the block away
    # The documented way: ids locate the 3D rows, the embeddings of the other rows are used as given.
    with torch.no_grad():
        expected = tiny_model(input_ids=input_ids, shape_latents=latents, shape_timesteps=timesteps)
        both = tiny_model(input_ids=input_ids, inputs_embeds=embeds, shape_latents=latents, shape_timesteps=timesteps)
        shifted = embeds.clone()
        shifted[0, 0] += 1.0
        changed = tiny_model(input_ids=input_ids, inputs_embeds=shifted, shape_latents=latents,
                             shape_timesteps=timesteps)
    torch.testing.assert_close(both.logits, expected.logits)
    torch.testing.assert_close(both.velocity, expected.velocity)
    assert not torch.allclose(changed.logits[0, 0], expected.logits[0, 0])
    with pytest.raises(ValueError, match="same \\(batch, seq_len\\)"):
        tiny_model(input_ids=input_ids[:, :5], inputs_embeds=embeds)
