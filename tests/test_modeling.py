"""Core model: Qwen3-VL parity, hybrid mask, permutation equivariance, remote code, training step, bad input."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    IMAGE,
    OBJ_END,
    OBJ_PAD,
    OBJ_START,
    VISION_END,
    VISION_START,
    randomize_heads,
    shape_span,
    tiny_cgmllm_config,
    tiny_text_config,
    tiny_vision_config,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from cgmllm import CGMLLMConfig, CGMLLMForConditionalGeneration, CGMLLMModel
from cgmllm.masking_cgmllm import create_hybrid_attention_mask, hybrid_mask_function


def _tiny_qwen(seed=0):
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=tiny_text_config(),
        vision_config=tiny_vision_config(),
        image_token_id=IMAGE,
        video_token_id=4,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def _from_qwen(qwen):
    return CGMLLMForConditionalGeneration.from_qwen3_vl(
        qwen, obj_start_token_id=OBJ_START, obj_end_token_id=OBJ_END, obj_pad_token_id=OBJ_PAD,
        shape_latent_channels=8, num_shape_tokens=6,
    ).eval()


# 1. Parity with transformers' Qwen3-VL -------------------------------------------------------------------------------
def test_text_logits_equal_qwen3_vl():
    qwen = _tiny_qwen()
    model = _from_qwen(qwen)
    input_ids = torch.randint(7, 80, (2, 12))
    with torch.no_grad():
        expected = qwen(input_ids=input_ids).logits
        actual = model(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_image_logits_equal_qwen3_vl():
    qwen = _tiny_qwen(1)
    model = _from_qwen(qwen)
    image_span = torch.tensor([[VISION_START] + [IMAGE] * 6 + [VISION_END]] * 2)
    input_ids = torch.cat([torch.randint(7, 80, (2, 3)), image_span, torch.randint(7, 80, (2, 4))], dim=1)
    pixel_values = torch.randn(12, 3 * 2 * 16 * 16)
    grid = torch.tensor([[1, 2, 3], [1, 2, 3]])
    with torch.no_grad():
        expected = qwen(
            input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
            mm_token_type_ids=(input_ids == IMAGE).long(),
        ).logits
        actual = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_block_ar_is_a_copy_of_token_ar_after_from_qwen3_vl():
    model = _from_qwen(_tiny_qwen())
    state = model.state_dict()
    block_keys = [k for k in state if "_block_ar" in k]
    assert len(block_keys) == 2 * (6 + 2 + 3) + 1  # per layer: 6 attn, 2 norms, 3 mlp; plus the final norm
    for key in block_keys:
        torch.testing.assert_close(state[key], state[key.replace("_block_ar", "")], rtol=0, atol=0)
    assert model.llm2obj.weight.abs().sum() == 0


# 2. The hybrid mask --------------------------------------------------------------------------------------------------
def _reference_mask(block, noisy, sample, keep):
    """Dense (L, L) mask from the written rules, one pair at a time."""
    length = len(block)
    mask = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for kv in range(length):
            if q == kv:
                mask[q, kv] = True
                continue
            if not keep[kv] or sample[q] != sample[kv]:
                continue
            same_block = block[q] >= 0 and block[q] == block[kv]
            if noisy[kv] and not same_block:
                continue
            mask[q, kv] = same_block or kv <= q
    return mask


def test_hybrid_mask_region_by_region(tiny_config):
    # text(3) | clean block A (start, 2 rows, end) | text(2) | noisy block B (start, 3 rows, end) | text(2) | pad(2)
    block = [-1] * 3 + [0] * 4 + [-1] * 2 + [1] * 5 + [-1] * 2 + [-1] * 2
    noisy = [False] * 9 + [True] * 5 + [False] * 4
    keep = [True] * 16 + [False] * 2
    sample = [0] * 18
    # Second row: two packed samples (9 + 9 tokens), each with a clean block.
    block2 = [-1, 0, 0, 0, -1, -1, -1, -1, -1] * 2
    noisy2 = [False] * 18
    sample2 = [0] * 9 + [1] * 9
    config = tiny_config.text_config
    config._attn_implementation = "sdpa"
    mask = create_hybrid_attention_mask(
        config,
        torch.zeros(2, 18, 32),
        torch.tensor([keep, [True] * 18]).long(),
        0,
        torch.tensor([block, block2]),
        torch.tensor([noisy, noisy2]),
        torch.tensor([sample, sample2]),
    )
    assert mask.shape == (2, 1, 18, 18) and mask.dtype == torch.bool
    m = mask[0, 0]
    assert not m[2, 3] and not m[0, 8]  # causal before the clean block
    assert m[3:7, 3:7].all()  # clean block: bidirectional
    assert m[7:9, 3:7].all()  # later text sees the clean block
    assert not m[4, 7]  # a clean block row does not see later text
    assert m[9:14, 9:14].all()  # noisy block: bidirectional, markers included
    assert m[9:14, 0:9].all()  # the noisy block sees everything before it
    assert not m[14:16, 9:14].any()  # nothing after a noisy block sees it
    assert m[14:16, 0:9].all()  # ... but it sees what came before the block
    assert not m[:16, 16:].any()  # padding is never attended to
    assert m[16, 16] and m[17, 17]  # pad rows attend to themselves only (finite outputs)
    m2 = mask[1, 0]
    assert not m2[9:, :9].any() and not m2[:9, 9:].any()  # packed samples are isolated
    assert m2[10:13, 10:13].all()
    torch.testing.assert_close(m, _reference_mask(block, noisy, sample, keep))
    torch.testing.assert_close(m2, _reference_mask(block2, noisy2, sample2, [True] * 18))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_mask_of_a_block_after_a_cache_is_the_padding_mask_and_follows_the_rule(tiny_config, implementation):
    # A denoising step: 2 left-padded cached prompts (7 columns, row 1 has 3 padding), then one noisy block of 5 tokens.
    past, length = 7, 5
    keep = torch.tensor([[1] * 12, [0] * 3 + [1] * 9]).bool()
    block_ids = torch.zeros(2, length, dtype=torch.long)
    noisy = torch.ones(2, length, dtype=torch.bool)
    config = tiny_config.text_config
    config._attn_implementation = implementation
    mask = create_hybrid_attention_mask(config, torch.zeros(2, length, 32), keep.long(), past, block_ids, noisy)
    assert mask.shape == (2, 1, 1, past + length)  # broadcast over the queries: O(kv_len), not O(q_len * kv_len)
    allowed = mask if implementation == "sdpa" else mask == 0
    # The general rule, evaluated query by query, gives the same mask for every query.
    pad = lambda t, v: torch.cat([torch.full((2, past), v, dtype=t.dtype), t], 1)  # noqa: E731
    rule = hybrid_mask_function(keep, pad(block_ids, -1), pad(noisy, False), torch.zeros(2, past + length).long())
    for b in range(2):
        for q in range(past, past + length):
            expected = torch.stack([rule(b, 0, torch.tensor(q), torch.tensor(k)) for k in range(past + length)])
            assert torch.equal(allowed[b, 0, 0], expected), (b, q)


def _mixed_batch(num_rows=6, channels=8):
    input_ids = torch.tensor(
        [[11, 12, 13] + shape_span(num_rows) + [14, 15],
         [16, 17, 18] + shape_span(num_rows) + [19, 20]]
    )
    latents = torch.randn(2 * num_rows, channels)
    timesteps = torch.tensor([0.0] * num_rows + [0.7] * num_rows)  # row 0: clean block, row 1: noisy block
    return input_ids, latents, timesteps


def test_eager_and_flex_match_sdpa(tiny_model):
    input_ids, latents, timesteps = _mixed_batch()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding in the second row
    with torch.no_grad():
        reference = tiny_model(input_ids=input_ids, attention_mask=attention_mask, shape_latents=latents,
                               shape_timesteps=timesteps)
        for implementation in ("eager", "flex_attention"):
            tiny_model.set_attn_implementation({"text_config": implementation, "vision_config": "sdpa"})
            out = tiny_model(input_ids=input_ids, attention_mask=attention_mask, shape_latents=latents,
                             shape_timesteps=timesteps)
            torch.testing.assert_close(out.logits, reference.logits, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.velocity, reference.velocity, rtol=1e-4, atol=1e-5)
    assert reference.velocity.abs().sum() > 0


def test_nothing_reads_a_noisy_block(tiny_model):
    input_ids, latents, timesteps = _mixed_batch()
    changed = latents.clone()
    changed[6:] += 5.0  # change the noisy block of row 1
    with torch.no_grad():
        a = tiny_model(input_ids=input_ids, shape_latents=latents, shape_timesteps=timesteps).logits
        b = tiny_model(input_ids=input_ids, shape_latents=changed, shape_timesteps=timesteps).logits
    torch.testing.assert_close(a[1, -2:], b[1, -2:])  # text after the noisy block is blind to it
    assert not torch.allclose(a[1, 3:11], b[1, 3:11])  # the block itself changes
    changed_clean = latents.clone()
    changed_clean[:6] += 5.0  # the clean block of row 0 is context for the text after it
    with torch.no_grad():
        c = tiny_model(input_ids=input_ids, shape_latents=changed_clean, shape_timesteps=timesteps).logits
    assert not torch.allclose(a[0, -2:], c[0, -2:])


# 3. No positions inside a block ---------------------------------------------------------------------------------------
def test_block_is_permutation_equivariant(tiny_model):
    input_ids = torch.tensor([[11, 12, 13] + shape_span(6)])
    latents = torch.randn(6, 8)
    timesteps = torch.full((6,), 0.4)
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        v = tiny_model(input_ids=input_ids, shape_latents=latents, shape_timesteps=timesteps).velocity
        v_perm = tiny_model(input_ids=input_ids, shape_latents=latents[permutation], shape_timesteps=timesteps).velocity
    torch.testing.assert_close(v_perm, v[permutation], rtol=1e-5, atol=1e-6)
    positions = tiny_model(input_ids=input_ids, shape_latents=latents, shape_timesteps=timesteps).position_ids
    assert positions[:, 0, 3:].unique().numel() == 1  # markers and rows share one id


# KV cache ------------------------------------------------------------------------------------------------------------
def test_read_only_cache_matches_full_sequence(tiny_model):
    prompt = torch.tensor([[21, 22, 23, 24, 25]])
    block = torch.tensor([shape_span(6)])
    latents, timesteps = torch.randn(6, 8), torch.full((6,), 0.8)
    with torch.no_grad():
        full = tiny_model(input_ids=torch.cat([prompt, block], 1), shape_latents=latents, shape_timesteps=timesteps)
        prefill = tiny_model(input_ids=prompt, use_cache=True)
        cache = prefill.past_key_values if hasattr(prefill, "past_key_values") else prefill.cache
        rope = torch.full((3, 1, block.shape[1]), prompt.shape[1])
        for _ in range(2):  # twice: the cache must stay untouched
            step = tiny_model(input_ids=block, cache=cache, update_cache=False, position_ids=rope,
                              shape_latents=latents, shape_timesteps=timesteps)
            assert cache.get_seq_length() == prompt.shape[1]
            torch.testing.assert_close(step.velocity, full.velocity, rtol=1e-5, atol=1e-6)


def test_generate_matches_uncached_greedy_decoding(tiny_model):
    prompt = torch.tensor([shape_span(6) + [30, 31]])
    latents = torch.randn(6, 8)
    generated = tiny_model.generate(input_ids=prompt, shape_latents=latents, max_new_tokens=6, do_sample=False)
    current = prompt
    for _ in range(6):
        with torch.no_grad():
            logits = tiny_model(input_ids=current, shape_latents=latents, shape_timesteps=torch.zeros(6)).logits
        current = torch.cat([current, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(generated, current)


# 4. Remote code ------------------------------------------------------------------------------------------------------
def test_save_and_load_with_remote_code_without_the_package(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"modeling_cgmllm.py", "configuration_cgmllm.py", "masking_cgmllm.py", "config.json"} <= files
    assert not any(p.is_dir() for p in (tmp_path / "ckpt").iterdir())
    input_ids, latents, timesteps = _mixed_batch()
    with torch.no_grad():
        expected = tiny_model(input_ids=input_ids, shape_latents=latents, shape_timesteps=timesteps)
    torch.save({"input_ids": input_ids, "latents": latents, "timesteps": timesteps}, tmp_path / "inputs.pt")

    # Same process, package imported: the registered classes win. As for Qwen3-VL, AutoModel is the base model.
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    assert type(loaded) is CGMLLMForConditionalGeneration
    base = AutoModel.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    assert type(base) is CGMLLMModel
    torch.testing.assert_close(base.obj2llm.weight, tiny_model.model.obj2llm.weight, rtol=0, atol=0)
    auto_map = json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_cgmllm.CGMLLMConfig",
        "AutoModel": "modeling_cgmllm.CGMLLMModel",
        "AutoModelForImageTextToText": "modeling_cgmllm.CGMLLMForConditionalGeneration",
    }

    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["cgmllm"] = None  # make the installed package unimportable
        import torch
        from transformers import AutoModel, AutoModelForImageTextToText
        try:
            import cgmllm
            raise SystemExit("cgmllm should not be importable here")
        except ImportError:
            pass
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        base = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert type(base).__name__ == "CGMLLMModel", type(base)
        assert torch.equal(base.obj2llm.weight, model.model.obj2llm.weight)
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            out = model(input_ids=inputs["input_ids"], shape_latents=inputs["latents"],
                        shape_timesteps=inputs["timesteps"])
        torch.save({{"logits": out.logits, "velocity": out.velocity}}, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(out["logits"], expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(out["velocity"], expected.velocity, rtol=0, atol=0)


def test_config_round_trip_and_auto_config(tmp_path, tiny_config):
    tiny_config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CGMLLMConfig)
    assert loaded.num_shape_tokens == 6 and loaded.obj_pad_token_id == OBJ_PAD
    assert loaded.text_config.hidden_size == 32
    with pytest.raises(ValueError, match="shape_block_size"):
        tiny_cgmllm_config(shape_block_size=4)


# 5. Training step ----------------------------------------------------------------------------------------------------
def test_one_optimizer_step_lowers_both_losses():
    torch.manual_seed(0)
    model = CGMLLMForConditionalGeneration(tiny_cgmllm_config()).train()
    input_ids = torch.tensor([[11, 12, 13, 14] + shape_span(6) + [40, 41, 42]] * 2)
    labels = input_ids.clone()
    labels[:, 4:12] = -100
    latents = torch.randn(12, 8)

    def losses():
        out = model(input_ids=input_ids, labels=labels, shape_latents=latents,
                    generator=torch.Generator().manual_seed(123))
        return out

    before = losses()
    assert before.lm_loss is not None and before.flow_loss is not None
    torch.testing.assert_close(before.loss, before.lm_loss + before.flow_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before.loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = losses()
    assert after.lm_loss < before.lm_loss
    assert after.flow_loss < before.flow_loss


def test_clean_blocks_get_no_flow_loss(tiny_model):
    input_ids = torch.tensor([shape_span(6) + [30, 31]])
    out = tiny_model(input_ids=input_ids, shape_latents=torch.randn(6, 8), shape_loss_mask=torch.zeros(6, dtype=bool),
                     labels=input_ids)
    assert out.flow_loss is None and torch.all(out.shape_timesteps == 0)
    assert out.loss is not None


# Bad input -----------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(tiny_model):
    input_ids = torch.tensor([[11, 12] + shape_span(6)])
    with pytest.raises(ValueError, match=r"shape \(num_latent_rows, 8\)"):
        tiny_model(input_ids=input_ids, shape_latents=torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"<\|obj_pad\|>` tokens \(6\) must equal .* \(4\)"):
        tiny_model(input_ids=input_ids, shape_latents=torch.randn(4, 8))
    with pytest.raises(ValueError, match="no `shape_latents`"):
        tiny_model(input_ids=input_ids)
    with pytest.raises(ValueError, match="no `pixel_values`"):
        tiny_model(input_ids=torch.tensor([[11, VISION_START, IMAGE, IMAGE, VISION_END]]))
    with pytest.raises(ValueError, match="Unbalanced"):
        tiny_model(input_ids=torch.tensor([[11, OBJ_END, 12]]))
    tiny_model.config.text_config._attn_implementation = "flash_attention_3"
    with pytest.raises(ValueError, match="cannot run attn_implementation='flash_attention_3'"):
        tiny_model(input_ids=torch.tensor([[11, 12]]))


# Packing ---------------------------------------------------------------------------------------------------------------
def test_packed_samples_equal_separate_samples(tiny_model):
    first = [11, 12] + shape_span(6) + [13]
    second = [21, 22, 23] + shape_span(6) + [24, 25]
    latents = torch.randn(12, 8)
    timesteps = torch.tensor([0.0] * 6 + [0.6] * 6)
    packed = torch.tensor([first + second])
    sample_ids = torch.tensor([[0] * len(first) + [1] * len(second)])
    with torch.no_grad():
        out = tiny_model(input_ids=packed, packed_sample_ids=sample_ids, shape_latents=latents,
                         shape_timesteps=timesteps)
        a = tiny_model(input_ids=torch.tensor([first]), shape_latents=latents[:6], shape_timesteps=timesteps[:6])
        b = tiny_model(input_ids=torch.tensor([second]), shape_latents=latents[6:], shape_timesteps=timesteps[6:])
    torch.testing.assert_close(out.logits[0, : len(first)], a.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[0, len(first):], b.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.velocity, torch.cat([a.velocity, b.velocity]), rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize_heads(CGMLLMForConditionalGeneration(tiny_cgmllm_config())).train()
    input_ids = torch.tensor([[11, 12, 13] + shape_span(6) + [40, 41]])
    latents = torch.randn(6, 8)

    def grads():
        model.zero_grad()
        out = model(input_ids=input_ids, labels=input_ids, shape_latents=latents,
                    generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_generate_with_an_image_prompt(tiny_model):
    input_ids = torch.tensor([[11, VISION_START] + [IMAGE] * 4 + [VISION_END, 12]])
    pixel_values = torch.randn(4, 3 * 2 * 16 * 16)
    grid = torch.tensor([[1, 2, 2]])
    generated = tiny_model.generate(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
                                    max_new_tokens=4, do_sample=False)
    current = input_ids
    for _ in range(4):
        with torch.no_grad():
            logits = tiny_model(input_ids=current, pixel_values=pixel_values, image_grid_thw=grid).logits
        current = torch.cat([current, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(generated, current)


def test_from_qwen3_vl_folder_adds_tokens_and_resizes(tmp_path):
    from cgmllm import train_bbpe_tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = train_bbpe_tokenizer(["a tall cylinder", "a flat box on a sphere"] * 4, vocab_size=280)
    qwen = _tiny_qwen(2)
    qwen.save_pretrained(tmp_path / "qwen")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.save_pretrained(tmp_path / "qwen")
    model = CGMLLMForConditionalGeneration.from_qwen3_vl(tmp_path / "qwen", num_shape_tokens=6,
                                                          shape_latent_channels=8)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "qwen")
    ids = reloaded.convert_tokens_to_ids(["<|obj_start|>", "<|obj_end|>", "<|obj_pad|>"])
    assert [model.config.obj_start_token_id, model.config.obj_end_token_id, model.config.obj_pad_token_id] == ids
    # The tokenizer (280 tokens) outgrew the 99-row embedding: it was resized, old rows kept.
    assert model.get_input_embeddings().weight.shape[0] >= max(ids) + 1
    torch.testing.assert_close(model.get_input_embeddings().weight[:99], qwen.get_input_embeddings().weight)
    with torch.no_grad():
        x = torch.randint(20, 80, (1, 8))  # ids 0-9 are the special tokens of this tokenizer
        torch.testing.assert_close(model(input_ids=x).logits[..., :99], qwen(input_ids=x).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not a local Qwen3-VL checkpoint folder"):
        CGMLLMForConditionalGeneration.from_qwen3_vl(tmp_path / "missing")


def test_config_validates_field_types():
    with pytest.raises(Exception, match="num_shape_tokens"):
        tiny_cgmllm_config(num_shape_tokens="many")
    assert tiny_cgmllm_config(timestep_shift=3).timestep_shift == 3


def test_several_objects_per_sample_get_their_own_timestep(tiny_model):
    input_ids = torch.tensor([[11] + shape_span(6) + [12, 13] + shape_span(6) + [14]])
    out = tiny_model(input_ids=input_ids, shape_latents=torch.randn(12, 8), labels=input_ids,
                     generator=torch.Generator().manual_seed(3))
    t = out.shape_timesteps
    assert t[:6].unique().numel() == 1 and t[6:].unique().numel() == 1 and t[0] != t[6]
    assert out.flow_loss is not None and torch.isfinite(out.loss)
    # Official convention: a noisy block does not advance the mRoPE id, so the text after it continues from it.
    positions = out.position_ids[0, 0].tolist()
    assert positions[1:9] == [1] * 8 and positions[9:11] == [1, 2] and positions[11:19] == [3] * 8


# Several blocks per object (clean copy + noisy copy) ----------------------------------------------------------------
def test_blockwise_training_layout_matches_sequential_block_inference(tiny_model):
    from cgmllm import CGMLLMProcessor, train_bbpe_tokenizer
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = train_bbpe_tokenizer(["a tall cylinder"] * 4, vocab_size=280)
    processor = CGMLLMProcessor(
        image_processor=Qwen2VLImageProcessorPil(patch_size=16, merge_size=1, temporal_patch_size=2),
        tokenizer=tokenizer,
    )
    ids = processor.special_token_ids
    model = tiny_model
    model.config.obj_start_token_id, model.config.obj_end_token_id = ids["obj_start_token_id"], ids["obj_end_token_id"]
    model.config.obj_pad_token_id = ids["obj_pad_token_id"]
    layout = processor.blockwise_shape_layout(num_rows=6, block_size=2)
    assert len(layout["shape_loss_mask"]) == 2 * 6 - 2 and sum(layout["shape_loss_mask"]) == 6
    single = processor.blockwise_shape_layout(num_rows=6, block_size=6)
    assert single["input_ids"] == [ids["obj_start_token_id"]] + [ids["obj_pad_token_id"]] * 6 + [ids["obj_end_token_id"]]

    prompt = [20, 21, 22]
    x0 = torch.randn(6, 8)
    block_t = [0.9, 0.5, 0.2]
    rows = torch.tensor(layout["latent_index"])
    loss_mask = torch.tensor(layout["shape_loss_mask"])
    timesteps = torch.where(loss_mask, torch.tensor(block_t)[rows // 2], torch.zeros(len(rows)))
    noisy_latents = x0[rows] + timesteps[:, None] * 0.3  # any x_t: noisy rows differ from the clean copies
    input_ids = torch.tensor([prompt + layout["input_ids"]])
    block_ids = torch.tensor([[-1] * 3 + layout["shape_block_ids"]])
    with torch.no_grad():
        train = model(input_ids=input_ids, shape_block_ids=block_ids, shape_latents=noisy_latents,
                      shape_timesteps=timesteps)
        # Inference view of block j: [prompt, c_1 .. c_{j-1}, ñ_j] in one sequence.
        pad_index = 0
        for j in range(3):
            noisy_rows = [i for i in range(len(rows)) if loss_mask[i] and rows[i] // 2 == j]
            clean_rows = [i for i in range(len(rows)) if not loss_mask[i] and rows[i] // 2 < j]
            tokens, blocks, latents, ts = list(prompt), [-1] * 3, [], []
            for b, group in enumerate([clean_rows[k:k + 2] for k in range(0, len(clean_rows), 2)] + [noisy_rows]):
                is_first, is_last = rows[group[0]] == 0, rows[group[-1]] == 5
                span = ([ids["obj_start_token_id"]] if is_first else []) + [ids["obj_pad_token_id"]] * 2 + (
                    [ids["obj_end_token_id"]] if is_last else [])
                tokens += span
                blocks += [b] * len(span)
                latents.append(noisy_latents[group])
                ts.append(timesteps[group])
            out = model(input_ids=torch.tensor([tokens]), shape_block_ids=torch.tensor([blocks]),
                        shape_latents=torch.cat(latents), shape_timesteps=torch.cat(ts))
            torch.testing.assert_close(out.velocity[-2:], train.velocity[noisy_rows], rtol=1e-5, atol=1e-6)

    # And it trains: drawn timesteps on the noisy copies only.
    model.train()
    out = model(input_ids=input_ids, shape_block_ids=block_ids, shape_latents=x0[rows], shape_loss_mask=loss_mask)
    assert torch.all(out.shape_timesteps[~loss_mask] == 0) and torch.all(out.shape_timesteps[loss_mask] > 0)
    out.loss.backward()
    assert model.llm2obj.weight.grad.abs().sum() > 0


def test_generation_only_batch_has_no_nan_lm_loss(tiny_model):
    input_ids = torch.tensor([[11, 12] + shape_span(6)])
    out = tiny_model(input_ids=input_ids, labels=torch.full_like(input_ids, -100), shape_latents=torch.randn(6, 8))
    assert out.lm_loss is None and out.flow_loss is not None
    torch.testing.assert_close(out.loss, out.flow_loss)
