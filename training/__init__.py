"""`cgmllm.training`: data loading, latent caching, collator/packing, CGMLLMTrainer, stages, LoRA, converters.

Names are imported lazily, so `import cgmllm.training.<module>` does not pull in the whole training stack.
"""

import importlib


_EXPORTS = {
    "CGMLLMDataCollator": "collator",
    "CGMLLMTrainer": "trainer",
    "EMACallback": "trainer",
    "NonFiniteLossError": "checks",
    "Stage": "stages",
    "encode_dataset": "preprocess",
    "expand_stages": "stages",
    "get_cgmllm_lora_model": "lora",
    "load_caption_dataset": "data",
    "load_cgmllm_lora": "lora",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
