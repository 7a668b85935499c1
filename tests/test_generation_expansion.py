"""Beam search / `num_return_sequences > 1` with 3D latents and images: every copy of a prompt keeps its own inputs."""

import torch
from conftest import IMAGE, VISION_END, VISION_START, shape_span


def _two_objects(num_rows=6, channels=8):
    generator = torch.Generator().manual_seed(1)
    prompt = torch.tensor([shape_span(num_rows) + [30, 31]] * 2)
    # Two clearly different objects, so a scrambled expansion changes the logits.
    latents = [torch.randn(num_rows, channels, generator=generator) * 2,
               torch.randn(num_rows, channels, generator=generator) * 2 + 1]
    return prompt, latents


def test_expanded_latents_repeat_each_object_whole(tiny_model):
    prompt, (a, b) = _two_objects()
    input_ids, kwargs = tiny_model._expand_inputs_for_generation(
        expand_size=3, input_ids=prompt, shape_latents=torch.cat([a, b]), shape_timesteps=torch.zeros(12)
    )
    assert input_ids.shape[0] == 6
    torch.testing.assert_close(kwargs["shape_latents"], torch.cat([a, a, a, b, b, b]), rtol=0, atol=0)
    assert kwargs["shape_timesteps"].shape == (36,)


def test_beam_search_over_two_meshes_equals_each_alone(tiny_model):
    prompt, latents = _two_objects()
    settings = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False,
                    return_dict_in_generate=True, output_scores=True)
    both = tiny_model.generate(input_ids=prompt, shape_latents=torch.cat(latents), **settings)
    for index, own in enumerate(latents):
        alone = tiny_model.generate(input_ids=prompt[index:index + 1], shape_latents=own, **settings)
        torch.testing.assert_close(both.sequences[2 * index:2 * index + 2], alone.sequences, rtol=0, atol=0)
        torch.testing.assert_close(both.sequences_scores[2 * index:2 * index + 2], alone.sequences_scores,
                                   rtol=1e-5, atol=1e-5)


def test_every_beam_copy_sees_its_own_object(tiny_model):
    prompt, latents = _two_objects()
    out = tiny_model.generate(input_ids=prompt, shape_latents=torch.cat(latents), max_new_tokens=1, num_beams=2,
                              do_sample=False, return_dict_in_generate=True, output_logits=True)
    first_step = out.logits[0]  # (batch * num_beams, vocab): raw logits of the prefill, one row per beam copy
    for index, own in enumerate(latents):
        with torch.no_grad():
            expected = tiny_model(input_ids=prompt[index:index + 1], shape_latents=own,
                                  shape_timesteps=torch.zeros(1)).logits[:, -1]
        for copy in range(2):
            torch.testing.assert_close(first_step[2 * index + copy:2 * index + copy + 1], expected,
                                       rtol=1e-5, atol=1e-5)


def test_sampled_return_sequences_see_their_own_image(tiny_model):
    # Two prompts with different image sizes: patches are flattened over the batch like the latent rows.
    grids = torch.tensor([[1, 2, 2], [1, 2, 4]])
    generator = torch.Generator().manual_seed(2)
    pixels = [torch.randn(count, 3 * 2 * 16 * 16, generator=generator) for count in (4, 8)]
    rows = [[11, VISION_START] + [IMAGE] * 4 + [VISION_END, 12], [VISION_START] + [IMAGE] * 8 + [VISION_END]]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.cat(pixels),
                              image_grid_thw=grids, max_new_tokens=1, do_sample=True, num_return_sequences=2,
                              return_dict_in_generate=True, output_logits=True)
    for index in range(2):
        with torch.no_grad():
            expected = tiny_model(input_ids=torch.tensor([rows[index]]), pixel_values=pixels[index],
                                  image_grid_thw=grids[index:index + 1]).logits[:, -1]
        for copy in range(2):
            row = 2 * index + copy
            torch.testing.assert_close(out.logits[0][row:row + 1], expected, rtol=1e-4, atol=1e-4)
