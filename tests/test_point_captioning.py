"""pipe.caption(mesh=...) through PointBERT (the official 3D-captioning path) and the point-cloud preparation."""

import json

import numpy as np
import pytest
import torch
import trimesh
from conftest import randomize_heads, tiny_cgmllm_config, tiny_text_config
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import Qwen2VLImageProcessorPil

from cgmllm import CGMLLMForConditionalGeneration, CGMLLMProcessor, PointBERTConfig, PointBERTEncoder
from cgmllm import train_bbpe_tokenizer
from cgmllm.modeling_shape_vae import ShapeVAE
from cgmllm.pipelines import CGMLLMPipeline
from cgmllm.pipelines.pipeline_cgmllm import DEFAULT_POINT_QUESTION, check_component_agreement


POINT_DIM, GROUPS = 12, 8


def _pipeline(with_points=True, trans_dim=POINT_DIM):
    tokenizer = train_bbpe_tokenizer(["what does this collection of points represent", "a red box"] * 4,
                                     vocab_size=300)
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=1, temporal_patch_size=2)
    processor = CGMLLMProcessor(image_processor=image_processor, tokenizer=tokenizer, num_shape_tokens=8)
    config = tiny_cgmllm_config(
        text_config=tiny_text_config(vocab_size=len(tokenizer), pad_token_id=0), num_shape_tokens=8,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"), point_feature_dim=POINT_DIM,
        **processor.special_token_ids,
    )
    torch.manual_seed(0)
    model = randomize_heads(CGMLLMForConditionalGeneration(config).eval())
    vae = ShapeVAE(num_latents=8, embed_dim=8, width=32, heads=4, num_encoder_layers=1, num_decoder_layers=1,
                   num_freqs=4, pc_size=256, pc_sharpedge_size=0, downsample_ratio=4).eval()
    encoder = None
    if with_points:
        encoder = PointBERTEncoder(PointBERTConfig(trans_dim=trans_dim, depth=1, num_heads=2, group_size=4,
                                                   num_group=GROUPS, encoder_dims=8)).eval()
    pipe = CGMLLMPipeline(model=model, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          processor=processor, **({"point_encoder": encoder} if encoder is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _pipeline()


def _red_box():
    box = trimesh.creation.box(extents=(1.0, 0.5, 0.25))
    box.visual.face_colors = [255, 0, 0, 255]
    return box


def test_mesh_clouds_carry_the_mesh_colours_or_grey(pipe):
    clouds = pipe.processor.prepare_point_clouds([_red_box(), trimesh.creation.icosphere(1)], num_points=512)
    assert clouds.shape == (2, 512, 6)
    torch.testing.assert_close(clouds[0, :, 3:], torch.tensor([1.0, 0.0, 0.0]).expand(512, 3))
    torch.testing.assert_close(clouds[1, :, 3:], torch.full((512, 3), 0.4))
    # pc_norm: centred, largest radius 1.
    torch.testing.assert_close(clouds[..., :3].mean(1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(clouds[..., :3].norm(dim=-1).amax(1), torch.ones(2))


def test_pointllm_npy_clouds_are_used_as_they_are(pipe, tmp_path):
    cloud = np.random.RandomState(0).rand(300, 6).astype(np.float32)
    np.save(tmp_path / "obj_8192.npy", cloud)
    out = pipe.processor.prepare_point_clouds([str(tmp_path / "obj_8192.npy")])
    assert out.shape == (1, 300, 6)  # no resampling, as the official path
    torch.testing.assert_close(out[0, :, 3:], torch.from_numpy(cloud[:, 3:]))
    xyz = cloud[:, :3] - cloud[:, :3].mean(0)
    torch.testing.assert_close(out[0, :, :3], torch.from_numpy(xyz / np.linalg.norm(xyz, axis=1).max()))
    np.save(tmp_path / "xyz_only.npy", cloud[:, :3])
    with pytest.raises(ValueError, match=r"\(P, 6\).*\(300, 3\)"):
        pipe.processor.prepare_point_clouds([str(tmp_path / "xyz_only.npy")])


@torch.no_grad()
def test_caption_mesh_goes_through_pointbert_and_the_official_prompt(pipe):
    captions = pipe.caption(mesh=[_red_box()], max_new_tokens=4)
    # The same by hand: cloud -> PointBERT -> <shape> block of 1 + GROUPS rows before the official question.
    clouds = pipe.processor.prepare_point_clouds([_red_box()], num_points=8192)
    features = pipe.point_encoder(clouds)
    assert features.shape == (1, 1 + GROUPS, POINT_DIM)
    text = pipe.processor.shape_caption_prompt(DEFAULT_POINT_QUESTION)
    inputs = pipe.processor(text=[text], num_shape_tokens=1 + GROUPS)
    generated = pipe.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    point_features=features[0], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert captions == pipe.processor.decode_captions(generated[:, inputs["input_ids"].shape[1]:])


def test_pipeline_without_pointbert_keeps_the_vae_path():
    pipe = _pipeline(with_points=False)
    assert pipe.point_encoder is None
    with pytest.raises(ValueError, match="no `point_encoder`"):
        pipe.encode_points(_red_box())
    assert len(pipe.caption(mesh=_red_box(), max_new_tokens=2)) == 1


@torch.no_grad()
def test_save_load_keeps_the_point_encoder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["point_encoder"] == ["modeling_pointbert", "PointBERTEncoder"]
    assert (tmp_path / "p" / "point_encoder" / "modeling_pointbert.py").is_file()
    loaded = CGMLLMPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.caption(mesh=_red_box(), max_new_tokens=3) == pipe.caption(mesh=_red_box(), max_new_tokens=3)
    without = _pipeline(with_points=False)
    without.save_pretrained(tmp_path / "q")
    assert CGMLLMPipeline.from_pretrained(tmp_path / "q").point_encoder is None


def test_components_that_disagree_are_a_clear_error(pipe):
    wrong = _pipeline(trans_dim=16)
    with pytest.raises(ValueError, match="16-d but the model's obj_und_connector takes 12-d"):
        check_component_agreement({"model": pipe.model, "processor": pipe.processor,
                                   "point_encoder": wrong.point_encoder})
    other = _pipeline(with_points=False)
    other.model.config.obj_pad_token_id = 3  # a checkpoint whose 3D token ids are not the tokenizer's
    expected = pipe.processor.special_token_ids["obj_pad_token_id"]
    with pytest.raises(ValueError, match=f"obj_pad_token_id: processor {expected} vs model 3"):
        check_component_agreement({"model": other.model, "processor": other.processor}, "a folder")


def test_point_encoder_loads_as_remote_code_without_the_package(pipe, tmp_path):
    import subprocess
    import sys
    import textwrap

    pipe.save_pretrained(tmp_path / "p")
    np.save(tmp_path / "cloud.npy", np.random.RandomState(1).rand(64, 6).astype(np.float32))
    expected = pipe.caption(mesh=str(tmp_path / "cloud.npy"), max_new_tokens=3)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["cgmllm"] = None  # the installed package must not be needed
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "p")!r}, trust_remote_code=True)
        assert type(pipe.point_encoder).__name__ == "PointBERTEncoder", type(pipe.point_encoder)
        assert not type(pipe.point_encoder).__module__.startswith("cgmllm"), type(pipe.point_encoder).__module__
        print(repr(pipe.caption(mesh={str(tmp_path / "cloud.npy")!r}, max_new_tokens=3)))
        """
    )
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == repr(expected)
