"""LoRA per expert, the Qwen3-VL builder, the official-checkpoint converter and the Hub card/upload."""

import json
import os
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, TrainingArguments

from cgmllm import CGMLLMForConditionalGeneration
from cgmllm.training.collator import CGMLLMDataCollator
from cgmllm.training.convert import build_main, convert_main, rename_official_key
from cgmllm.training.data import load_caption_dataset
from cgmllm.training.lora import get_cgmllm_lora_model, load_cgmllm_lora, lora_target_modules
from cgmllm.training.preprocess import encode_dataset
from cgmllm.training.testing import (
    official_key, tiny_model, tiny_model_config, tiny_vae, write_mesh_folder,
)
from cgmllm.training.trainer import CGMLLMTrainer


# 7. LoRA --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("experts", ["token_ar", "block_ar", "both"])
def test_lora_targets_the_chosen_experts_and_the_connector(processor, experts):
    model = get_cgmllm_lora_model(tiny_model(processor), experts=experts, r=4)
    lora = [name for name, _ in model.named_modules() if name.endswith(".lora_A")]
    block = [name for name in lora if "_block_ar" in name]
    per_expert = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert len(lora) == (2 * per_expert if experts == "both" else per_expert)
    assert len(block) == {"token_ar": 0, "block_ar": per_expert, "both": per_expert}[experts]
    assert not any("visual" in name for name in lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert {n.split(".modules_to_save")[0].split(".")[-1] for n in trainable} == {"obj2llm", "time_embedder",
                                                                                 "llm2obj"}
    with pytest.raises(ValueError, match="experts"):
        lora_target_modules("all")


def test_lora_finetune_lowers_the_loss_and_saves_loads_merges(tmp_path, processor):
    data = write_mesh_folder(tmp_path / "data", names=["box", "ball"])
    cache = encode_dataset(load_caption_dataset(data), tiny_vae(), 8)
    collator = CGMLLMDataCollator(processor, 8, task_weights={"text_to_shape": 1.0}, condition_dropout=0.0)
    base = tiny_model(processor)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_cgmllm_lora_model(base, experts="both", r=8, lora_alpha=16)
    batch = collator([cache[0], cache[1]])
    del batch["labels"]  # flow-only batch (CE over zero caption tokens is undefined)

    def loss(m):  # fixed flow noise, so before/after compare the same draw
        return float(m(**batch, generator=torch.Generator().manual_seed(0)).loss)

    with torch.no_grad():
        before = loss(model)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=2, learning_rate=5e-2,
                             remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=4, lr_scheduler_type="constant")
    CGMLLMTrainer(model=model, args=args, train_dataset=cache, data_collator=collator).train()
    model.eval()
    with torch.no_grad():
        after = loss(model)
    assert after < 0.9 * before

    model.save_pretrained(tmp_path / "adapter")
    saved = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert any("lora_A" in k for k in saved) and any("llm2obj" in k for k in saved)
    assert not any("visual" in k for k in saved)

    fresh = tiny_model(processor)
    fresh.load_state_dict(reference)
    reloaded = load_cgmllm_lora(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loss(reloaded), after, rtol=1e-5, atol=1e-6)
        merged = reloaded.merge_and_unload()
        assert isinstance(merged, CGMLLMForConditionalGeneration)
        torch.testing.assert_close(loss(merged), after, rtol=1e-4, atol=1e-5)


# 8. Builders and the official converter -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory, processor):
    folder = tmp_path_factory.mktemp("qwen")
    config = tiny_model_config(processor)
    torch.manual_seed(0)
    qwen = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(),
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
    ))
    qwen.save_pretrained(folder / "qwen")
    processor.tokenizer.save_pretrained(folder / "qwen")
    processor.image_processor.save_pretrained(folder / "qwen")
    save_file(tiny_vae().state_dict(), str(folder / "vae.safetensors"))  # Hunyuan3D key names = ShapeVAE's
    return folder


def _model_from_folder(out):
    if os.path.isfile(os.path.join(out, "model_index.json")) or os.path.isdir(os.path.join(out, "model")):
        return CGMLLMForConditionalGeneration.from_pretrained(os.path.join(out, "model"))
    raise AssertionError(f"{out} is not a pipeline folder")


def test_build_writes_a_pipeline_folder(tmp_path, qwen_folder):
    model, processor, vae, layout = build_main(["--qwen3-vl", str(qwen_folder / "qwen"), "--shape-vae",
                                                str(qwen_folder / "vae.safetensors"), "--out", str(tmp_path / "p"),
                                                "--num-shape-tokens", "8"])
    assert {"model", "processor", "vae"} <= set(os.listdir(tmp_path / "p"))
    loaded = _model_from_folder(str(tmp_path / "p"))
    if layout == "pipeline":
        from cgmllm.pipelines import CGMLLMPipeline

        pipe = CGMLLMPipeline.from_pretrained(str(tmp_path / "p"))
        assert pipe.vae.config.embed_dim == 8 and pipe.model.config.num_shape_tokens == 8
    torch.testing.assert_close(loaded.state_dict()["model.language_model.layers.0.self_attn.q_proj_block_ar.weight"],
                               model.state_dict()["model.language_model.layers.0.self_attn.q_proj.weight"])
    assert loaded.config.num_shape_tokens == 8 and not loaded.llm2obj.weight.any()


def _official_state_dict(processor, extra_rows=0):
    """A tiny checkpoint with the official key names (official_cgmllm.md §1.2), obj tokens in its last 2 rows."""
    torch.manual_seed(5)
    ours = tiny_model(processor, seed=5).state_dict()
    official = {}
    for key, value in ours.items():
        official[official_key(key)] = torch.randn_like(value)
    rows = len(processor.tokenizer) - 1 + extra_rows
    hidden = official["language_model.model.embed_tokens.weight"].shape[1]
    official["language_model.model.embed_tokens.weight"] = torch.randn(rows, hidden)
    official["language_model.lm_head.weight"] = official["language_model.model.embed_tokens.weight"].clone()
    official["obj_und_connector.fc1.weight"] = torch.randn(hidden, 1152)
    official["obj_und_connector.fc1.bias"] = torch.randn(hidden)
    official["obj_und_connector.fc2.weight"] = torch.randn(hidden, hidden)
    official["obj_und_connector.fc2.bias"] = torch.randn(hidden)
    return official


def test_convert_official_checkpoint(tmp_path, qwen_folder, processor):
    official = _official_state_dict(processor)
    save_file(official, str(tmp_path / "ema.safetensors"))
    common = ["--qwen3-vl", str(qwen_folder / "qwen"), "--shape-vae", str(qwen_folder / "vae.safetensors"),
              "--num-shape-tokens", "8"]
    model, summary = convert_main(["--ema", str(tmp_path / "ema.safetensors"), "--out", str(tmp_path / "out"),
                                   *common])
    assert summary["header"]["point_feature_dim"] == 1152  # the PointBERT connector, kept
    assert json.loads((tmp_path / "out" / "conversion_summary.json").read_text())["num_converted"] == len(official)
    state = _model_from_folder(str(tmp_path / "out")).state_dict()
    for key in ("language_model.model.layers.1.self_attn.k_proj_block_ar.weight", "vit_model.blocks.0.attn.qkv.weight",
                "time_embedder.mlp.0.weight", "obj2llm.weight", "llm2obj.bias", "language_model.model.norm_block_ar.weight",
                "obj_und_connector.fc1.weight", "obj_und_connector.fc2.bias"):
        torch.testing.assert_close(state[rename_official_key(key)], official[key])
    embed = state["model.language_model.embed_tokens.weight"]
    rows = official["language_model.model.embed_tokens.weight"]
    ids = processor.special_token_ids
    torch.testing.assert_close(embed[: rows.shape[0] - 2][10:], rows[: rows.shape[0] - 2][10:])
    torch.testing.assert_close(embed[ids["obj_start_token_id"]], rows[-2])
    torch.testing.assert_close(embed[ids["obj_end_token_id"]], rows[-1])
    torch.testing.assert_close(embed[ids["obj_pad_token_id"]], rows.mean(0))

    official["language_model.model.some_new_module.weight"] = torch.zeros(2)
    save_file(official, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="some_new_module"):
        convert_main(["--ema", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "bad"), *common])
    del official["language_model.model.some_new_module.weight"]
    del official["llm2obj.weight"]
    save_file(official, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="llm2obj.weight"):
        convert_main(["--ema", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m"), *common])


# 9. Hub card and upload (only the network calls are mocked) -----------------------------------------------------------
def test_model_card_and_push_to_hub(tmp_path, qwen_folder):
    import yaml

    from cgmllm.training.hub import push_to_hub, render_model_card

    card = render_model_card("someone/cgmllm-tiny", pipeline_tag="image-to-3d", datasets=["tiange/Cap3D"])
    text = str(card)
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "image-to-3d"
    assert metadata["base_model"] == "Qwen/Qwen3-VL-2B-Instruct" and metadata["datasets"] == ["tiange/Cap3D"]
    assert metadata["license"] == "apache-2.0" and "text-to-3d" in metadata["tags"]
    assert 'CGMLLMPipeline.from_pretrained("someone/cgmllm-tiny")' in text and "pipe.caption(mesh=" in text
    with pytest.raises(ValueError, match="pipeline_tag"):
        render_model_card("a/b", pipeline_tag="text-to-image")

    build_main(["--qwen3-vl", str(qwen_folder / "qwen"), "--shape-vae", str(qwen_folder / "vae.safetensors"),
                "--out", str(tmp_path / "pipe"), "--num-shape-tokens", "8"])
    with mock.patch("huggingface_hub.HfApi.create_repo") as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder", return_value="https://hf.co/commit/1") as upload:
        url = push_to_hub(tmp_path / "pipe", "someone/cgmllm-tiny", private=True)
    assert url == "https://hf.co/commit/1"
    create.assert_called_once_with("someone/cgmllm-tiny", private=True, exist_ok=True)
    assert upload.call_args.kwargs["folder_path"] == str(tmp_path / "pipe")
    readme = (tmp_path / "pipe" / "README.md").read_text()
    assert "pipeline_tag: text-to-3d" in readme and "someone/cgmllm-tiny" in readme
    with pytest.raises(ValueError, match="not a saved CG-MLLM pipeline"):
        push_to_hub(tmp_path, "someone/x")
