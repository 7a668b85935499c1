"""Shared fixtures: tiny random CG-MLLM configs (CPU, milliseconds per forward)."""

from pathlib import Path

import pytest
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_MESHES = REPO_ROOT.parent / "shared" / "data" / "real_meshes"


def real_mesh_path(name: str) -> Path:
    """Path of a real mesh from `../shared/data/real_meshes` (meshes nobody here made); skips the test where the
    shared data is not checked out next to the repository."""
    path = REAL_MESHES / name
    if not path.is_file():
        pytest.skip(f"real mesh {path} is not available")
    return path


# Token ids of the tiny configs (vocabulary of 99).
IMAGE, VIDEO, VISION_START, VISION_END = 3, 4, 5, 6
OBJ_START, OBJ_END, OBJ_PAD = 90, 91, 92


def tiny_text_config(**overrides):
    config = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                         "rope_theta": 10000},
    )
    config.update(overrides)
    return config


def tiny_vision_config(**overrides):
    config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=32,
        num_heads=4,
        in_channels=3,
        patch_size=16,
        spatial_merge_size=1,
        temporal_patch_size=2,
        out_hidden_size=32,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
    )
    config.update(overrides)
    return config


def tiny_cgmllm_config(**overrides):
    from cgmllm import CGMLLMConfig

    kwargs = dict(
        text_config=tiny_text_config(),
        vision_config=tiny_vision_config(),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        obj_start_token_id=OBJ_START,
        obj_end_token_id=OBJ_END,
        obj_pad_token_id=OBJ_PAD,
        shape_latent_channels=8,
        num_shape_tokens=6,
    )
    kwargs.update(overrides)
    return CGMLLMConfig(**kwargs)


def randomize_heads(model, seed=0):
    """The velocity head is zero-initialised; tests that compare velocities need it non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.llm2obj.weight.copy_(torch.randn(model.llm2obj.weight.shape, generator=generator) * 0.2)
        model.llm2obj.bias.copy_(torch.randn(model.llm2obj.bias.shape, generator=generator) * 0.2)
        for name, param in model.named_parameters():
            if "_block_ar" in name and param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@pytest.fixture
def tiny_config():
    return tiny_cgmllm_config()


@pytest.fixture
def tiny_model():
    from cgmllm import CGMLLMForConditionalGeneration

    torch.manual_seed(0)
    return randomize_heads(CGMLLMForConditionalGeneration(tiny_cgmllm_config()).eval())


def shape_span(num_rows):
    return [OBJ_START] + [OBJ_PAD] * num_rows + [OBJ_END]


# Training fixtures shared by the training test modules (module scope: built once per module, as before). A module
# that needs another processor (e.g. the official image preprocessing) defines its own `processor`, which wins.
@pytest.fixture(scope="module")
def processor():
    """The tiny CG-MLLM processor (`cgmllm.training.testing.tiny_processor`)."""
    from cgmllm.training.testing import tiny_processor

    return tiny_processor()


@pytest.fixture(scope="module")
def mesh_folder(tmp_path_factory):
    """A caption-set folder of primitive meshes in the plain mesh-folder layout."""
    from cgmllm.training.testing import write_mesh_folder

    return write_mesh_folder(tmp_path_factory.mktemp("meshes") / "data")


@pytest.fixture(scope="module")
def cache(mesh_folder):
    """`mesh_folder` encoded by the tiny ShapeVAE into a latent cache at 4 and 8 latent tokens."""
    from cgmllm.training.data import load_caption_dataset
    from cgmllm.training.preprocess import encode_dataset
    from cgmllm.training.testing import tiny_vae

    return encode_dataset(load_caption_dataset(mesh_folder), tiny_vae(), [4, 8])
