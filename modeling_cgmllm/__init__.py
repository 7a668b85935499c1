"""cg-mllm: CG-MLLM (arXiv 2601.21798) for the Hugging Face ecosystem.

`import cgmllm` is cheap: every public name is imported on first use (PEP 562 module `__getattr__`), so that the
command line starts in a fraction of a second and a script pays only for what it touches (torch and transformers
for the model, diffusers for the pipeline, the training stack for `CGMLLMTrainer`).

The first use of a model-side name (`CGMLLMConfig`, `CGMLLMForConditionalGeneration`, `CGMLLMProcessor`,
`CGMLLMPipeline`, ...) registers CG-MLLM with the transformers Auto classes, so that `AutoConfig` / `AutoModel` /
`AutoModelForImageTextToText` / `AutoProcessor` resolve `model_type="cgmllm"` to the installed code;
`cgmllm.register_auto_classes()` does it explicitly. Checkpoints also load without it through their remote code
(`trust_remote_code=True`).
"""

import importlib


__version__ = "0.1.0"

# Public name -> submodule that defines it.
_EXPORTS = {
    "SHAPE_SPECIAL_TOKENS": "configuration_cgmllm",
    "CGMLLMConfig": "configuration_cgmllm",
    "CGMLLMForConditionalGeneration": "modeling_cgmllm",
    "CGMLLMModel": "modeling_cgmllm",
    "CGMLLMPreTrainedModel": "modeling_cgmllm",
    "CGMLLMTimestepEmbedder": "modeling_cgmllm",
    "CGMLLMProcessor": "processing_cgmllm",
    "denormalize_mesh": "mesh_utils",
    "export_mesh": "mesh_utils",
    "load_mesh": "mesh_utils",
    "normalize_mesh": "mesh_utils",
    "sample_sdf_points": "mesh_utils",
    "sample_surface": "mesh_utils",
    "PointBERTConfig": "modeling_pointbert",
    "PointBERTEncoder": "modeling_pointbert",
    "DiagonalGaussianDistribution": "modeling_shape_vae",
    "ShapeVAE": "modeling_shape_vae",
    "ShapeVAELossOutput": "modeling_shape_vae",
    "render_mesh": "rendering",
    "render_multiview": "rendering",
    "train_bbpe_tokenizer": "tokenization_cgmllm",
    "field_to_mesh": "volume_decoding",
    "CGMLLMPipeline": "pipelines",
    "CGMLLMPipelineOutput": "pipelines",
    "CGMLLMTrainer": "training",
}
# Names whose use means the Auto classes will be needed (everything that builds, loads or saves a model).
_REGISTERING_MODULES = {
    "configuration_cgmllm", "modeling_cgmllm", "modeling_pointbert", "processing_cgmllm", "pipelines", "training"
}
_registered = False


def register_auto_classes() -> None:
    """Register CG-MLLM (and its PointBERT encoder) with `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`
    and `AutoProcessor`, and mark
    the classes for `auto_map` (so that `save_pretrained` writes remote-code checkpoints). Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .configuration_cgmllm import CGMLLMConfig
    from .modeling_cgmllm import CGMLLMForConditionalGeneration, CGMLLMModel
    from .modeling_pointbert import PointBERTConfig, PointBERTEncoder
    from .processing_cgmllm import CGMLLMProcessor

    # As transformers maps Qwen3-VL: `AutoModel` -> the base model (no heads), `AutoModelForImageTextToText` -> the
    # model with its heads (text and velocity), which is what generation and the pipeline use.
    AutoConfig.register(CGMLLMConfig.model_type, CGMLLMConfig, exist_ok=True)
    AutoModel.register(CGMLLMConfig, CGMLLMModel, exist_ok=True)
    AutoModelForImageTextToText.register(CGMLLMConfig, CGMLLMForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(CGMLLMConfig, CGMLLMProcessor, exist_ok=True)
    AutoConfig.register(PointBERTConfig.model_type, PointBERTConfig, exist_ok=True)
    AutoModel.register(PointBERTConfig, PointBERTEncoder, exist_ok=True)
    # `save_pretrained` copies the modeling files next to the weights and writes `auto_map` (both CG-MLLM model
    # classes, see `CGMLLMPreTrainedModel.save_pretrained`), so checkpoints load with `trust_remote_code=True` where
    # this package is not installed.
    CGMLLMConfig.register_for_auto_class("AutoConfig")
    CGMLLMModel.register_for_auto_class("AutoModel")
    CGMLLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    CGMLLMProcessor.register_for_auto_class("AutoProcessor")
    PointBERTConfig.register_for_auto_class("AutoConfig")
    PointBERTEncoder.register_for_auto_class("AutoModel")
    _registered = True


def __getattr__(name):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'cgmllm' has no attribute {name!r}")
    if module_name in _REGISTERING_MODULES:
        register_auto_classes()
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # later lookups skip `__getattr__`
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS) + ["register_auto_classes"]
