"""LoRA on CG-MLLM's Mixture-of-Transformers projections with `peft`.

The adapters sit on the attention (q/k/v/o) and MLP (gate/up/down) projections of the decoder layers, chosen per
expert: `"token_ar"` (text / image tokens), `"block_ar"` (3D latent tokens) or `"both"`. The 3D connector
(`model.obj2llm`, `model.time_embedder`) and the velocity head (`llm2obj`) are trained in full and saved with the
adapter (`modules_to_save`). The vision tower, `lm_head` and everything else stay frozen.

    model = get_cgmllm_lora_model(model, experts="block_ar", r=16)
    ... train with CGMLLMTrainer ...
    model.save_pretrained("adapter/")                          # adapter + connector/head weights only
    model = load_cgmllm_lora(base_model, "adapter/")           # PeftModel again
    merged = model.merge_and_unload()                          # a plain CGMLLMForConditionalGeneration
"""

from peft import LoraConfig, PeftModel, get_peft_model


EXPERTS = ("token_ar", "block_ar", "both")
CONNECTOR_MODULES = ["obj2llm", "time_embedder", "llm2obj"]


def lora_target_modules(experts: str = "both") -> str:
    """The `target_modules` regex (peft fullmatches it against module names) for an expert choice."""
    if experts not in EXPERTS:
        raise ValueError(f"`experts` must be one of {EXPERTS}, got {experts!r}.")
    prefix = r"model\.language_model\.layers\.\d+\."
    attn = r"self_attn\.(q|k|v|o)_proj"
    mlp = r"\.(gate|up|down)_proj"
    if experts == "token_ar":
        alternatives = [attn, r"mlp" + mlp]
    elif experts == "block_ar":
        alternatives = [attn + "_block_ar", r"mlp_block_ar" + mlp]
    else:
        alternatives = [attn + "(_block_ar)?", r"mlp(_block_ar)?" + mlp]
    return prefix + "(" + "|".join(alternatives) + ")"


def cgmllm_lora_config(experts: str = "both", r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                       train_connector: bool = True, **kwargs) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules(experts),
        modules_to_save=list(CONNECTOR_MODULES) if train_connector else None,
        task_type=None,
        **kwargs,
    )


def get_cgmllm_lora_model(model, experts: str = "both", r: int = 16, lora_alpha: int = 32, **kwargs) -> PeftModel:
    """Wrap a `CGMLLMForConditionalGeneration` in a `PeftModel` with LoRA on the chosen experts."""
    if experts == "block_ar" and not getattr(model.config, "mixture_of_transformers", True):
        raise ValueError("experts='block_ar': this model is one shared transformer (config."
                         "mixture_of_transformers=False), it has no BlockAR weights; its 3D rows use the TokenAR "
                         "ones (experts='token_ar').")
    return get_peft_model(model, cgmllm_lora_config(experts, r=r, lora_alpha=lora_alpha, **kwargs))


def load_cgmllm_lora(model, adapter_path, is_trainable: bool = False, adapter_name: str = "default") -> PeftModel:
    """Attach a saved adapter to a base model (`PeftModel.from_pretrained`; avoids `AutoPeftModel`'s import allowlist)."""
    return PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable)


__all__ = ["CONNECTOR_MODULES", "EXPERTS", "cgmllm_lora_config", "get_cgmllm_lora_model", "load_cgmllm_lora",
           "lora_target_modules"]
