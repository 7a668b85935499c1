"""Tiny components for smoke tests and examples (CPU, seconds): a BBPE processor, a random CG-MLLM, a ShapeVAE,
and procedural meshes with captions on disk."""

import os

import torch


PRIMITIVES = {
    "box": "a small box",
    "ball": "a round ball",
    "cylinder": "a tall cylinder",
    "cone": "a pointy cone",
    "capsule": "a long capsule",
    "torus": "a flat ring",
}


def primitive_mesh(name: str):
    import trimesh

    creation = trimesh.creation
    return {
        "box": lambda: creation.box(),
        "ball": lambda: creation.icosphere(1),
        "cylinder": lambda: creation.cylinder(0.3, 1.0, sections=12),
        "cone": lambda: creation.cone(0.5, 1.0, sections=12),
        "capsule": lambda: creation.capsule(1.0, 0.25, count=[8, 8]),
        "torus": lambda: creation.torus(0.5, 0.15, major_sections=12, minor_sections=6),
    }[name]()


def write_mesh_folder(folder, names=None, suffix: str = ".glb") -> str:
    """`folder/*.glb` + `metadata.csv` (file_name, caption): a meshfolder data set."""
    names = list(names or PRIMITIVES)
    os.makedirs(folder, exist_ok=True)
    lines = ["file_name,caption"]
    for name in names:
        primitive_mesh(name).export(os.path.join(folder, name + suffix))
        lines.append(f"{name}{suffix},{PRIMITIVES[name]}")
    with open(os.path.join(folder, "metadata.csv"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return str(folder)


def tiny_processor(texts=None, vocab_size: int = 300):
    from transformers import Qwen2VLImageProcessorPil

    from cgmllm import CGMLLMProcessor, train_bbpe_tokenizer

    texts = list(texts or PRIMITIVES.values()) + ["Describe this 3D object.", "Describe this image."]
    tokenizer = train_bbpe_tokenizer(texts, vocab_size=vocab_size)
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=1, temporal_patch_size=2,
                                               min_pixels=32 * 32, max_pixels=64 * 64)
    return CGMLLMProcessor(image_processor=image_processor, tokenizer=tokenizer, num_shape_tokens=8)


def tiny_model_config(processor, shape_latent_channels: int = 8, num_shape_tokens: int = 8, hidden_size: int = 32,
                      num_hidden_layers: int = 2, intermediate_size: int = 37, point_feature_dim: int | None = None,
                      shape_block_size: int | None = None, mixture_of_transformers: bool = True):
    from cgmllm import CGMLLMConfig

    head_dim = hidden_size // 4
    quarter = head_dim // 8  # mRoPE sections (t, h, w) over the head_dim / 2 frequencies, for wider models
    mrope_section = [2, 1, 1] if hidden_size < 32 else [4, 2, 2] if hidden_size <= 64 else [
        head_dim // 2 - 2 * quarter, quarter, quarter]
    text_config = dict(
        vocab_size=len(processor.tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "mrope_section": mrope_section,
                         "mrope_interleaved": True, "rope_theta": 10000},
    )
    vision_config = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=4, in_channels=3, patch_size=16,
                         spatial_merge_size=1, temporal_patch_size=2, out_hidden_size=hidden_size,
                         num_position_embeddings=16, deepstack_visual_indexes=[0])
    return CGMLLMConfig(text_config=text_config, vision_config=vision_config, video_token_id=processor.token_id(
        "<|video_pad|>"), shape_latent_channels=shape_latent_channels, num_shape_tokens=num_shape_tokens,
        point_feature_dim=point_feature_dim, shape_block_size=shape_block_size,
        mixture_of_transformers=mixture_of_transformers, **processor.special_token_ids)


def tiny_model(processor, seed: int = 0, **kwargs):
    from cgmllm import CGMLLMForConditionalGeneration

    torch.manual_seed(seed)
    return CGMLLMForConditionalGeneration(tiny_model_config(processor, **kwargs))


def tiny_vae(seed: int = 0, embed_dim: int = 8):
    from cgmllm.modeling_shape_vae import ShapeVAE

    torch.manual_seed(seed)
    return ShapeVAE(num_latents=8, embed_dim=embed_dim, width=32, heads=4, num_encoder_layers=1, num_decoder_layers=1,
                    pc_size=256, pc_sharpedge_size=0, downsample_ratio=4).eval().requires_grad_(False)


def official_key(key: str) -> str:
    """This package's state-dict key -> the official release's (official_cgmllm.md §1.2), written out by hand so that
    converter tests check `convert.RENAMES` against an independent statement of the layout."""
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("model.visual."):
        return "vit_model." + key[len("model.visual."):]
    if key.startswith("model."):
        return key[len("model."):]  # time_embedder, obj2llm, obj_und_connector
    return key  # llm2obj


__all__ = ["PRIMITIVES", "official_key", "primitive_mesh", "tiny_model", "tiny_model_config", "tiny_processor",
           "tiny_vae", "write_mesh_folder"]
