"""cgmllm-convert-official on tiny state dicts in each release's key layout: JreamH/CGMLLM (with the PointBERT
connector) and JreamH/CGMLLM-4B-i2o (image -> 3D only), vocabulary rows as official, clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from cgmllm import CGMLLMForConditionalGeneration, PointBERTConfig, PointBERTEncoder
from cgmllm.pipelines import CGMLLMPipeline
from cgmllm.tokenization_cgmllm import QWEN_SPECIAL_TOKENS
from cgmllm.training.convert import convert_main
from cgmllm.training.testing import official_key, tiny_vae


def _qwen_like_tokenizer():
    """A byte-level BPE with Qwen's special tokens only: the 3D tokens get appended at the end, as with Qwen3-VL."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=list(QWEN_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["a red car", "a chair", "describe this object"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))


def _qwen_folder(root, hidden_size, num_layers):
    tokenizer = _qwen_like_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer) + 20, hidden_size=hidden_size, intermediate_size=40,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden_size // 4, pad_token_id=0, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1] if hidden_size < 64
                                          else [4, 2, 2], "mrope_interleaved": True, "rope_theta": 10000}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=4, in_channels=3, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden_size,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        tie_word_embeddings=True, **ids,
    )
    torch.manual_seed(0)
    folder = root / f"qwen_{hidden_size}"
    Qwen3VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2).save_pretrained(folder)
    return folder, len(tokenizer)


def _official_checkpoint(qwen_folder, qwen_vocab, point_feature_dim=None, seed=1):
    """Random weights under the official key names (official_cgmllm.md §1.2) for a model of the folder's sizes;
    R = qwen_vocab + 2 vocabulary rows (the official tokenizer: Qwen's + <|obj_start|>, <|obj_end|>)."""
    torch.manual_seed(seed)
    model = CGMLLMForConditionalGeneration.from_qwen3_vl(qwen_folder, tokenizer=_qwen_like_tokenizer(),
                                                         shape_latent_channels=8, point_feature_dim=point_feature_dim)
    official = {}
    for key, value in model.state_dict().items():
        official[official_key(key)] = torch.randn_like(value)
    hidden = official["language_model.model.embed_tokens.weight"].shape[1]
    official["language_model.model.embed_tokens.weight"] = torch.randn(qwen_vocab + 2, hidden)
    official["language_model.lm_head.weight"] = official["language_model.model.embed_tokens.weight"].clone()
    return official


def _convert(tmp_path, ema, qwen_folder, *extra):
    save_file(tiny_vae().state_dict(), str(tmp_path / "vae.safetensors"))
    return convert_main(["--ema", str(ema), "--qwen3-vl", str(qwen_folder), "--shape-vae",
                         str(tmp_path / "vae.safetensors"), "--out", str(tmp_path / "out"), "--num-shape-tokens", "8",
                         *extra])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {"2b": _qwen_folder(root, 32, 2), "4b": _qwen_folder(root, 48, 3)}


def test_4b_image_to_3d_release_converts_with_its_own_sizes(tmp_path, folders):
    qwen, vocab = folders["4b"]
    official = _official_checkpoint(qwen, vocab)
    save_file(official, str(tmp_path / "ema.safetensors"))
    model, summary = _convert(tmp_path, tmp_path / "ema.safetensors", qwen)
    assert summary["header"] == {"vocab_rows": vocab + 2, "hidden_size": 48, "num_hidden_layers": 3,
                                 "point_feature_dim": None}
    pipe = CGMLLMPipeline.from_pretrained(tmp_path / "out")
    config = pipe.model.config
    assert config.text_config.hidden_size == 48 and config.text_config.num_hidden_layers == 3
    assert config.point_feature_dim is None and pipe.point_encoder is None
    assert not any("obj_und_connector" in key for key in pipe.model.state_dict())
    # Vocabulary: the R official rows at their ids, plus <|obj_pad|> (id R) initialised to their mean.
    rows = official["language_model.model.embed_tokens.weight"]
    embed = pipe.model.get_input_embeddings().weight
    assert embed.shape[0] == vocab + 3 == config.text_config.vocab_size == len(pipe.processor.tokenizer)
    torch.testing.assert_close(embed[: vocab + 2], rows)
    torch.testing.assert_close(embed[vocab + 2], rows.mean(0))
    torch.testing.assert_close(pipe.model.lm_head.weight[: vocab + 2], official["language_model.lm_head.weight"])
    assert pipe.processor.special_token_ids["obj_start_token_id"] == vocab
    assert (config.obj_start_token_id, config.obj_end_token_id, config.obj_pad_token_id) == (vocab, vocab + 1,
                                                                                              vocab + 2)
    torch.testing.assert_close(pipe.model.state_dict()["model.language_model.layers.2.mlp_block_ar.up_proj.weight"],
                               official["language_model.model.layers.2.mlp_block_ar.up_proj.weight"])
    assert pipe.processor.image_preprocessing == "official"


def test_2b_release_keeps_the_connector_and_takes_point_bert(tmp_path, folders):
    qwen, vocab = folders["2b"]
    official = _official_checkpoint(qwen, vocab, point_feature_dim=24)
    save_file(official, str(tmp_path / "ema.safetensors"))
    torch.manual_seed(3)
    source = PointBERTEncoder(PointBERTConfig(trans_dim=24))  # PointLLM's sizes at width 24
    state = {"module.point_encoder." + k: v for k, v in source.state_dict().items()}
    torch.save({"state_dict": {**state, "module.logit_scale": torch.tensor(1.0)}}, tmp_path / "point_bert.pt")
    model, summary = _convert(tmp_path, tmp_path / "ema.safetensors", qwen, "--point-bert",
                              str(tmp_path / "point_bert.pt"))
    assert summary["header"]["point_feature_dim"] == 24
    pipe = CGMLLMPipeline.from_pretrained(tmp_path / "out")
    assert pipe.model.config.point_feature_dim == 24
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        torch.testing.assert_close(pipe.model.state_dict()[f"model.obj_und_connector.{name}"],
                                   official[f"obj_und_connector.{name}"])
    assert pipe.point_encoder is not None
    torch.testing.assert_close(pipe.point_encoder.state_dict()["cls_pos"], source.state_dict()["cls_pos"])
    saved = json.loads((tmp_path / "out" / "conversion_summary.json").read_text())
    assert saved["point_encoder"].endswith("point_bert.pt")


def test_release_errors_are_clear(tmp_path, folders):
    qwen2b, vocab2b = folders["2b"]
    qwen4b, vocab4b = folders["4b"]
    official = _official_checkpoint(qwen2b, vocab2b)
    save_file(official, str(tmp_path / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"backbone has \{'hidden_size': 32, 'num_hidden_layers': 2\}.*48"):
        _convert(tmp_path, tmp_path / "ema.safetensors", qwen4b)
    with pytest.raises(ValueError, match="no `obj_und_connector`.*4B-i2o"):
        _convert(tmp_path, tmp_path / "ema.safetensors", qwen2b, "--point-bert", str(tmp_path / "none.pt"))
    mismatched = dict(official)
    mismatched["language_model.lm_head.weight"] = official["language_model.lm_head.weight"][:-1].clone()
    save_file(mismatched, str(tmp_path / "mismatch.safetensors"))
    with pytest.raises(ValueError, match=f"embedding has {vocab2b + 2} rows but its lm_head has {vocab2b + 1}"):
        _convert(tmp_path, tmp_path / "mismatch.safetensors", qwen2b)
    (tmp_path / "not.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):
        _convert(tmp_path, tmp_path / "not.safetensors", qwen2b)


def test_build_reads_every_size_from_the_qwen_folder(tmp_path, folders):
    from cgmllm.training.convert import build_main

    qwen, vocab = folders["4b"]
    save_file(tiny_vae().state_dict(), str(tmp_path / "vae.safetensors"))
    model, processor, _, _ = build_main(["--qwen3-vl", str(qwen), "--shape-vae", str(tmp_path / "vae.safetensors"),
                                         "--out", str(tmp_path / "init"), "--num-shape-tokens", "8"])
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (48, 3, 40)
    assert model.config.point_feature_dim is None  # a fresh build has no PointBERT connector
    assert processor.image_preprocessing == "qwen3_vl"  # trained from scratch with the Qwen3-VL rule
    assert processor.special_token_ids["obj_pad_token_id"] == vocab + 2
