"""cg-mllm: CG-MLLM (arXiv 2601.21798) for the Hugging Face ecosystem.

Importing `cgmllm` registers the model with the transformers Auto classes, so that
`AutoConfig` / `AutoModel` / `AutoModelForImageTextToText` resolve `model_type="cgmllm"` to the installed code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_cgmllm import SHAPE_SPECIAL_TOKENS, CGMLLMConfig
from .modeling_cgmllm import (
    CGMLLMForConditionalGeneration,
    CGMLLMModel,
    CGMLLMPreTrainedModel,
    CGMLLMTimestepEmbedder,
)
from .mesh_utils import denormalize_mesh, load_mesh, normalize_mesh, sample_sdf_points, sample_surface
from .modeling_pointbert import PointBERTConfig, PointBERTEncoder
from .modeling_shape_vae import DiagonalGaussianDistribution, ShapeVAE, ShapeVAELossOutput
from .processing_cgmllm import CGMLLMProcessor
from .rendering import render_mesh, render_multiview
from .tokenization_cgmllm import train_bbpe_tokenizer
from .volume_decoding import field_to_mesh
from .pipelines import CGMLLMPipeline, CGMLLMPipelineOutput  # noqa: E402  (subpackage, after the model)


__version__ = "0.1.0"

AutoConfig.register(CGMLLMConfig.model_type, CGMLLMConfig, exist_ok=True)
AutoModel.register(CGMLLMConfig, CGMLLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(CGMLLMConfig, CGMLLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(CGMLLMConfig, CGMLLMProcessor, exist_ok=True)
AutoConfig.register(PointBERTConfig.model_type, PointBERTConfig, exist_ok=True)
AutoModel.register(PointBERTConfig, PointBERTEncoder, exist_ok=True)
# `save_pretrained` copies the modeling files next to the weights and writes `auto_map`, so checkpoints load
# with `trust_remote_code=True` where this package is not installed.
CGMLLMConfig.register_for_auto_class("AutoConfig")
CGMLLMForConditionalGeneration.register_for_auto_class("AutoModel")
CGMLLMProcessor.register_for_auto_class("AutoProcessor")
PointBERTConfig.register_for_auto_class("AutoConfig")
PointBERTEncoder.register_for_auto_class("AutoModel")



def __getattr__(name):
    # The training stack (Trainer, datasets, peft) is imported only when asked for.
    if name == "CGMLLMTrainer":
        from .training import CGMLLMTrainer

        return CGMLLMTrainer
    raise AttributeError(f"module 'cgmllm' has no attribute {name!r}")


__all__ = [
    "SHAPE_SPECIAL_TOKENS",
    "CGMLLMTrainer",
    "CGMLLMPipeline",
    "CGMLLMPipelineOutput",
    "DiagonalGaussianDistribution",
    "ShapeVAE",
    "ShapeVAELossOutput",
    "field_to_mesh",
    "denormalize_mesh",
    "load_mesh",
    "normalize_mesh",
    "render_mesh",
    "render_multiview",
    "sample_sdf_points",
    "sample_surface",
    "CGMLLMConfig",
    "CGMLLMForConditionalGeneration",
    "CGMLLMModel",
    "CGMLLMPreTrainedModel",
    "CGMLLMProcessor",
    "CGMLLMTimestepEmbedder",
    "PointBERTConfig",
    "PointBERTEncoder",
    "train_bbpe_tokenizer",
]
