"""`CGMLLMConfig.mixture_of_transformers=False`: one shared transformer, 3D latent rows through the TokenAR weights
(the paper's MoT ablation). It differs from MoT when the experts differ, equals MoT when the BlockAR weights are
copies of the TokenAR ones, builds no BlockAR parameters, trains, and saves / loads."""

import pytest
import torch
from conftest import OBJ_PAD, randomize_heads, shape_span, tiny_cgmllm_config

from cgmllm import CGMLLMForConditionalGeneration


def _models():
    torch.manual_seed(0)
    mot = randomize_heads(CGMLLMForConditionalGeneration(tiny_cgmllm_config()).eval())
    shared = CGMLLMForConditionalGeneration(tiny_cgmllm_config(mixture_of_transformers=False)).eval()
    # The shared model takes the MoT model's TokenAR (and every non-expert) weight.
    missing, unexpected = shared.load_state_dict(mot.state_dict(), strict=False)
    assert missing == [] and unexpected and all("_block_ar" in key for key in unexpected)
    return mot, shared


def _batch():
    # Text, a noisy 3D block (generation), text with labels; and a clean block (understanding) in the second row.
    input_ids = torch.tensor([[11, 12] + shape_span(6) + [13, 14, 15], [21] + shape_span(6) + [22, 23, 24, 25]])
    labels = input_ids.masked_fill(input_ids == OBJ_PAD, -100)
    latents = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.cat([torch.full((6,), 0.7), torch.zeros(6)])
    return dict(input_ids=input_ids, labels=labels, shape_latents=latents, shape_timesteps=timesteps)


def test_the_shared_transformer_has_no_block_ar_parameters():
    mot, shared = _models()
    block_ar = [name for name, _ in mot.named_parameters() if "_block_ar" in name]
    assert block_ar and not [name for name, _ in shared.named_parameters() if "_block_ar" in name]
    assert sum(p.numel() for p in shared.parameters()) == sum(
        p.numel() for name, p in mot.named_parameters() if "_block_ar" not in name)


def test_shared_differs_from_mot_when_the_experts_differ():
    mot, shared = _models()
    with torch.no_grad():
        mot_out, shared_out = mot(**_batch()), shared(**_batch())
    # 3D rows go through other weights, and text rows attend to 3D rows: both outputs move.
    assert not torch.allclose(mot_out.velocity, shared_out.velocity, atol=1e-4)
    assert not torch.allclose(mot_out.logits, shared_out.logits, atol=1e-4)


def test_shared_equals_mot_when_the_expert_weights_are_equal():
    mot, shared = _models()
    mot.init_block_ar_from_token_ar()  # BlockAR := TokenAR: MoT computes what one shared transformer computes
    with torch.no_grad():
        mot_out, shared_out = mot(**_batch()), shared(**_batch())
    torch.testing.assert_close(shared_out.velocity, mot_out.velocity, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared_out.logits, mot_out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared_out.loss, mot_out.loss, rtol=1e-5, atol=1e-6)


def test_3d_rows_train_the_token_ar_weights_only_in_the_shared_transformer():
    # Only the flow (velocity) loss: text rows' LM loss would give every TokenAR weight a gradient anyway. The last
    # layer's TokenAR MLP is reached by 3D rows only through the shared transformer: under MoT they run through
    # BlockAR's, and the text tokens' last-layer outputs feed no 3D row.
    mot, shared = _models()
    grads = {}
    for name, model in (("mot", mot), ("shared", shared)):
        model.train()
        model(**_batch()).velocity.square().mean().backward()
        grads[name] = model.model.language_model.layers[-1].mlp.down_proj.weight.grad
    assert grads["shared"] is not None and grads["shared"].abs().sum() > 0
    assert grads["mot"] is None or grads["mot"].abs().sum() == 0
    assert mot.model.language_model.layers[-1].mlp_block_ar.down_proj.weight.grad.abs().sum() > 0


def test_the_shared_transformer_trains_and_round_trips(tmp_path):
    _, shared = _models()
    shared.train()
    optimizer = torch.optim.AdamW(shared.parameters(), lr=3e-3)
    batch = _batch()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        out = shared(**batch)
        # The flow loss needs a target; velocity towards zero is enough to see the 3D path learn.
        loss = out.loss + out.velocity.square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    shared.save_pretrained(tmp_path)
    loaded = CGMLLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.mixture_of_transformers is False
    shared.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).velocity, shared(**batch).velocity)


def test_lora_on_block_ar_is_refused_for_a_shared_transformer():
    from cgmllm.training.lora import get_cgmllm_lora_model

    _, shared = _models()
    with pytest.raises(ValueError, match="no BlockAR weights"):
        get_cgmllm_lora_model(shared, experts="block_ar", r=2)


def test_from_qwen3_vl_builds_the_shared_transformer_at_any_size():
    # The route to the comparison at scale: both variants from the same Qwen3-VL weights. Fresh from Qwen3-VL the
    # BlockAR weights are TokenAR copies, so both compute the same; they part once training moves the experts.
    from conftest import IMAGE, OBJ_END, OBJ_START, VISION_END, VISION_START, tiny_text_config, tiny_vision_config
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    qwen = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=tiny_text_config(), vision_config=tiny_vision_config(), image_token_id=IMAGE, video_token_id=4,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)).eval()
    ids = dict(obj_start_token_id=OBJ_START, obj_end_token_id=OBJ_END, obj_pad_token_id=OBJ_PAD,
               shape_latent_channels=8, num_shape_tokens=6)
    mot = CGMLLMForConditionalGeneration.from_qwen3_vl(qwen, **ids).eval()
    shared = CGMLLMForConditionalGeneration.from_qwen3_vl(qwen, mixture_of_transformers=False, **ids).eval()
    assert not [name for name in shared.state_dict() if "_block_ar" in name]
    # The freshly initialised 3D connector, timestep embedder and velocity head (zero) are random draws: the same
    # in both, and a non-zero head.
    with torch.no_grad():
        mot.llm2obj.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(1))
    fresh = {k: v for k, v in mot.state_dict().items() if k.startswith(("model.obj2llm.", "model.time_embedder.",
                                                                         "llm2obj."))}
    shared.load_state_dict(fresh, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(shared(**_batch()).velocity, mot(**_batch()).velocity, rtol=1e-5, atol=1e-6)
