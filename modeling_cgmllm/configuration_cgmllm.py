"""CG-MLLM model configuration.

A CG-MLLM is a Qwen3-VL whose decoder layers carry a second ("BlockAR") parameter set for 3D latent rows, plus a
small connector / timestep embedder / velocity head around a frozen 3D VAE. The config therefore *is* a
`Qwen3VLConfig` (same `text_config` / `vision_config`, same image token ids) extended with the 3D settings.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig


# Added to the Qwen3 tokenizer in this order (ids 151669, 151670, 151671 on the stock vocabulary).
SHAPE_SPECIAL_TOKENS = ("<|obj_start|>", "<|obj_end|>", "<|obj_pad|>")


@strict
class CGMLLMConfig(Qwen3VLConfig):
    r"""
    Configuration of a [`CGMLLMForConditionalGeneration`].

    Every Qwen3-VL field (`text_config`, `vision_config`, `image_token_id`, ...) keeps its meaning. The extra fields:

    Args:
        shape_latent_channels (`int`, defaults to 64):
            Channels of one 3D VAE latent row (Hunyuan3D-2.1 ShapeVAE: 64).
        num_shape_tokens (`int`, defaults to 4096):
            Default number of latent rows per object (the VAE's `num_latents`; the curriculum uses 512 ... 4096).
        shape_block_size (`int`, *optional*):
            Latent rows per generation block. `None` puts the whole object in one block (the released model).
            A smaller value generates an object as `num_shape_tokens // shape_block_size` sequential blocks: the
            training collator lays generation targets out block-wise with it (`cgmllm-train` passes it on) and
            `CGMLLMPipeline` samples block by block with it unless told otherwise.
        mixture_of_transformers (`bool`, defaults to `True`):
            `True`: every decoder layer has two parameter sets, TokenAR (text and image rows) and BlockAR (3D latent
            rows), as in the released model. `False`: one shared transformer: 3D latent rows go through the TokenAR
            weights and no BlockAR parameters are built (the paper's "shared" ablation, MoT 30.6 vs shared 44.9
            p-FID). Attention, the 3D connector, timestep embedder and velocity head are the same either way.
        timestep_embedding_dim (`int`, defaults to 256):
            Size of the sinusoidal features fed to the timestep MLP.
        timestep_shift (`float`, defaults to 1.0):
            Shift `s` applied to training timesteps: `t <- s t / (1 + (s - 1) t)` (1.0 = no shift, as in the
            official training code; inference uses the scheduler's own shift).
        timestep_logit_mean (`float`, defaults to 0.0) / timestep_logit_std (`float`, defaults to 1.0):
            Training timesteps are logit-normal: `t = sigmoid(mean + std * randn)`.
        obj_start_token_id / obj_end_token_id / obj_pad_token_id (`int`):
            Ids of `<|obj_start|>`, `<|obj_end|>` and the `<|obj_pad|>` placeholder that stands for one latent row.
            The defaults are the ids the tokens get when appended to the Qwen3 tokenizer (151669, 151670, 151671).
        point_feature_dim (`int`, *optional*):
            Width of the 3D-understanding features that `obj_und_connector` (`fc1 -> gelu_pytorch_tanh -> fc2`) maps
            into the LLM: 1152 for PointBERT (the released model), 64 for an encoder of VAE latents. `None` (the
            default) builds no connector; meshes are then captioned from clean ShapeVAE latents through `obj2llm`.
        lm_loss_weight (`float`, defaults to 1.0) / flow_loss_weight (`float`, defaults to 1.0):
            Weights of the text cross-entropy and of the flow-matching MSE in `loss`.
        max_prompt_tokens (`int`, *optional*):
            Tokens of the longest text -> 3D prompt (template included) the model was trained on. The pipeline warns
            for longer prompts: the model has never seen such a context. `None`: unknown (only the text model's
            `max_position_embeddings` is checked).

    Example:

    ```python
    >>> from cgmllm import CGMLLMConfig, CGMLLMForConditionalGeneration
    >>> config = CGMLLMConfig()                       # Qwen3-VL-sized defaults
    >>> model = CGMLLMForConditionalGeneration(config)  # doctest: +SKIP
    ```
    """

    model_type = "cgmllm"

    shape_latent_channels: int = 64
    num_shape_tokens: int = 4096
    shape_block_size: int | None = None
    mixture_of_transformers: bool = True
    timestep_embedding_dim: int = 256
    timestep_shift: float | int = 1.0
    timestep_logit_mean: float | int = 0.0
    timestep_logit_std: float | int = 1.0
    obj_start_token_id: int = 151669
    obj_end_token_id: int = 151670
    obj_pad_token_id: int = 151671
    point_feature_dim: int | None = None
    lm_loss_weight: float | int = 1.0
    flow_loss_weight: float | int = 1.0
    max_prompt_tokens: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.shape_latent_channels <= 0:
            raise ValueError(f"`shape_latent_channels` must be positive, got {self.shape_latent_channels}.")
        if self.num_shape_tokens <= 0:
            raise ValueError(f"`num_shape_tokens` must be positive, got {self.num_shape_tokens}.")
        if self.shape_block_size is not None:
            if self.shape_block_size <= 0 or self.num_shape_tokens % self.shape_block_size != 0:
                raise ValueError(
                    f"`shape_block_size` must be a positive divisor of `num_shape_tokens` ({self.num_shape_tokens}), "
                    f"got {self.shape_block_size}."
                )
        if self.timestep_embedding_dim % 2 != 0:
            raise ValueError(f"`timestep_embedding_dim` must be even, got {self.timestep_embedding_dim}.")
        if self.point_feature_dim is not None and self.point_feature_dim <= 0:
            raise ValueError(f"`point_feature_dim` must be positive or None, got {self.point_feature_dim}.")
        special = {
            "obj_start_token_id": self.obj_start_token_id,
            "obj_end_token_id": self.obj_end_token_id,
            "obj_pad_token_id": self.obj_pad_token_id,
        }
        if len(set(special.values())) != 3:
            raise ValueError(f"The 3D special token ids must be distinct, got {special}.")


__all__ = ["CGMLLMConfig", "SHAPE_SPECIAL_TOKENS"]
