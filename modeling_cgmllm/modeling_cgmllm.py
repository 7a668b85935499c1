"""CG-MLLM: a Qwen3-VL whose decoder is a Mixture of Transformers bound by generation mode.

Reading order follows the data: timestep embedder -> expert routing -> MoT attention -> MoT decoder layer ->
text model -> multimodal model (vision tower, shape connector, 3D rope) -> generation head model.

Two parameter sets per decoder layer:
    TokenAR  = the original Qwen3-VL weights and names (`q_proj`, `mlp`, `input_layernorm`, ...), used by text and
               image rows, so a Qwen3-VL state dict loads into it unchanged;
    BlockAR  = a copy with a `_block_ar` suffix (`q_proj_block_ar`, `mlp_block_ar`, ...), used by 3D latent rows.
Attention is one joint attention over all rows; only projections, norms and MLPs are per expert.
With `config.mixture_of_transformers=False` there is no BlockAR set: every row, 3D latent rows included, goes through
the TokenAR weights (one shared transformer, the paper's ablation of MoT).
"""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLModel,
    Qwen3VLPreTrainedModel,
    Qwen3VLTextMLP,
    Qwen3VLTextModel,
    Qwen3VLTextRMSNorm,
    Qwen3VLTextRotaryEmbedding,
    Qwen3VLVisionModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import ModelOutput, is_tracing, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_cgmllm import CGMLLMConfig
from .masking_cgmllm import (
    check_attention_implementation,
    packed_sample_ids_from_position_ids,
    prepare_attention,
)


logger = logging.get_logger(__name__)


@dataclass
class CGMLLMModelOutputWithPast(ModelOutput):
    """Output of [`CGMLLMModel`].

    Args:
        last_hidden_state: `(batch, seq_len, hidden)` after the per-expert final norm.
        cache: the KV cache.
        hidden_states: with `output_hidden_states`, the embeddings and the output of every layer (the last one after
            the final norm), each `(batch, seq_len, hidden)`.
        attentions: with `output_attentions` (eager attention), every layer's `(batch, heads, seq_len, kv_len)`
            attention weights.
        shape_row_mask: `(batch, seq_len)` True at latent rows (`<|obj_pad|>` tokens).
        shape_timesteps: `(num_latent_rows,)` the flow time of every latent row.
        velocity_target: `(num_latent_rows, channels)` `noise - x0` where noise was drawn, else None.
        flow_loss_mask: `(num_latent_rows,)` True where a flow-matching loss applies.
        position_ids: `(3, batch, seq_len)` the mRoPE ids that were used.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    shape_row_mask: torch.BoolTensor | None = None
    shape_timesteps: torch.FloatTensor | None = None
    velocity_target: torch.FloatTensor | None = None
    flow_loss_mask: torch.BoolTensor | None = None
    position_ids: torch.LongTensor | None = None


@dataclass
class CGMLLMCausalLMOutputWithPast(ModelOutput):
    """Output of [`CGMLLMForConditionalGeneration`].

    The first fields are those of every transformers causal LM, in their order, so that `return_dict=False` gives
    `(loss, logits, cache, ...)` (`None` fields are left out of tuples).

    Args:
        loss: `lm_loss_weight * lm_loss + flow_loss_weight * flow_loss` over the terms that are present.
        logits: `(batch, seq_len or logits_to_keep, vocab)`; with `labels`, only the rows that predict a label:
            `(num_label_tokens, vocab)` in row-major order (see [`cgmllm_loss`]).
        cache: the KV cache.
        hidden_states / attentions: as in [`CGMLLMModelOutputWithPast`].
        lm_loss: next-token cross-entropy over the `labels` that are not -100.
        flow_loss: flow-matching MSE (mean over channels, then over target latent rows).
        velocity: `(num_latent_rows, channels)` predicted velocity of every latent row, in row-major order.
        velocity_target: `(num_latent_rows, channels)` `noise - x0` when the forward drew the noise itself.
        flow_loss_mask: `(num_latent_rows,)` True where the flow loss applies.
        shape_timesteps: `(num_latent_rows,)` flow time of every latent row.
        position_ids: `(3, batch, seq_len)` the mRoPE ids used (handy to continue a cached sequence).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    lm_loss: torch.FloatTensor | None = None
    flow_loss: torch.FloatTensor | None = None
    velocity: torch.FloatTensor | None = None
    velocity_target: torch.FloatTensor | None = None
    flow_loss_mask: torch.BoolTensor | None = None
    shape_timesteps: torch.FloatTensor | None = None
    position_ids: torch.LongTensor | None = None


def cgmllm_loss(
    logits: torch.Tensor | None,
    target_ids: torch.LongTensor | None,
    velocity: torch.Tensor | None,
    velocity_target: torch.Tensor | None,
    flow_loss_mask: torch.BoolTensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    num_shape_rows_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """CG-MLLM's two loss terms: the one definition, used by the model's forward (and so by `CGMLLMTrainer`).

    lm_loss   = sum of the token cross-entropies (float32) / `num_items_in_batch`
    flow_loss = sum over target latent rows of the channel-mean squared velocity error (float32)
                / `num_shape_rows_in_batch`

    The counts default to this batch's own. The Trainer passes the whole optimizer step's (every gradient-accumulation
    micro-batch on every process), so accumulating micro-batches or splitting a batch over processes gives the
    gradient of one big batch. A term is None when this batch has no item of its kind.

    Args:
        logits: `(num_label_tokens, vocab)` the predictions of the labelled next tokens only.
        target_ids: `(num_label_tokens,)` their labels.
        velocity / velocity_target: `(num_latent_rows, channels)`; flow_loss_mask: `(num_latent_rows,)`.
    """
    lm_loss = flow_loss = None
    if logits is not None and target_ids is not None and target_ids.numel() > 0:
        count = target_ids.numel() if num_items_in_batch is None else num_items_in_batch
        lm_sum = F.cross_entropy(logits.float(), target_ids.to(logits.device), reduction="sum")
        lm_loss = lm_sum / torch.as_tensor(count, device=lm_sum.device)
    if velocity_target is not None and flow_loss_mask is not None:
        per_row = (velocity.float() - velocity_target.float().to(velocity.device)).pow(2).mean(-1)
        per_row = per_row[flow_loss_mask.to(per_row.device)]
        if per_row.numel() > 0:
            count = per_row.numel() if num_shape_rows_in_batch is None else num_shape_rows_in_batch
            flow_loss = per_row.sum() / torch.as_tensor(count, device=per_row.device)
    return lm_loss, flow_loss


class CGMLLMTimestepEmbedder(nn.Module):
    """Sinusoidal timestep features -> MLP (DiT style). Added to the latent rows' input embeddings (no AdaLN).

    `t` is the continuous flow time in [0, 1] (not multiplied by 1000). Features are ordered [cos, sin].
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        # `mlp.0` / `mlp.2` are the official key names (mlp.1 is the parameter-free SiLU).
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def timestep_features(self, timesteps: torch.Tensor) -> torch.Tensor:
        """`(n,)` -> `(n, frequency_embedding_size)`."""
        half = self.frequency_embedding_size // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        freqs = torch.exp(exponent / half)
        args = timesteps.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = self.timestep_features(timesteps).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class CGMLLMUnderstandingConnector(nn.Module):
    """3D-understanding features (e.g. PointBERT's `(513, 1152)`) -> LLM rows: `fc2(gelu_tanh(fc1(x)))`.

    The official `obj_und_connector` (key names `fc1` / `fc2`). No timestep embedding is added to its rows: they are
    clean context, not noisy latents.
    """

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_size)
        self.act = ACT2FN["gelu_pytorch_tanh"]
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))


class ExpertRouting:
    """Sends each row of a `(batch, seq_len, dim)` tensor to its expert, each expert running on one contiguous slice.

    Built once per forward (as MoE token sorting): a stable sort puts the TokenAR rows first and the BlockAR rows
    (3D latent rows, `block_ar_mask` True) after them, both in sequence order. Every call then gathers the rows once
    into that order, runs each expert on its slice and puts the rows back with the inverse permutation.

    No host synchronisation: the slice sizes come from `num_block_ar`, which the caller knows on the host (the number
    of latent rows it embedded). The permutation is moved to the device of the rows it is applied to (and kept there),
    so a layer placed on another GPU by a `device_map` gets its own copy. When a forward holds one kind of row only
    (plain text, or a denoising query without markers) the whole tensor goes to one expert, without any
    gather/scatter, which keeps the TokenAR path bit-identical to Qwen3-VL.

    Args:
        block_ar_mask: `(batch, seq_len)` True at BlockAR rows.
        num_block_ar: the number of True values in `block_ar_mask`.
    """

    def __init__(self, block_ar_mask: torch.BoolTensor, num_block_ar: int):
        self.num_rows = block_ar_mask.numel()
        self.num_block_ar = int(num_block_ar)
        self.num_token_ar = self.num_rows - self.num_block_ar
        self._permutations: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if 0 < self.num_block_ar < self.num_rows:
            order = torch.argsort(block_ar_mask.reshape(-1).to(torch.uint8), stable=True)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(self.num_rows, device=order.device)
            self._permutations[order.device] = (order, inverse)

    def _permutation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._permutations:
            order, inverse = next(iter(self._permutations.values()))
            self._permutations[device] = (order.to(device), inverse.to(device))
        return self._permutations[device]

    def __call__(self, hidden_states: torch.Tensor, token_ar_fn: Callable, block_ar_fn: Callable) -> torch.Tensor:
        if self.num_block_ar == 0:
            return token_ar_fn(hidden_states)
        if self.num_token_ar == 0:
            return block_ar_fn(hidden_states)
        order, inverse = self._permutation(hidden_states.device)
        leading_shape = hidden_states.shape[:-1]
        rows = hidden_states.reshape(self.num_rows, hidden_states.shape[-1]).index_select(0, order)
        out = torch.cat([token_ar_fn(rows[: self.num_token_ar]), block_ar_fn(rows[self.num_token_ar :])])
        return out.index_select(0, inverse).reshape(*leading_shape, *out.shape[1:])


class CGMLLMTextAttention(nn.Module):
    """Qwen3-VL attention with a second (BlockAR) set of q/k/v/o projections and q/k norms.

    Rows are projected by their own expert, then one joint attention runs over the whole sequence.
    `block_ar=False` builds the TokenAR projections only (one shared transformer); the routing then sends every row
    to them.
    """

    def __init__(self, config: Qwen3VLTextConfig, layer_idx: int, block_ar: bool = True):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim

        # TokenAR: the original Qwen3-VL names.
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3VLTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3VLTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if not block_ar:
            return
        # BlockAR: same shapes, `_block_ar` suffix (the official CG-MLLM key names).
        self.q_proj_block_ar = nn.Linear(config.hidden_size, q_dim, bias=bias)
        self.k_proj_block_ar = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.v_proj_block_ar = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.o_proj_block_ar = nn.Linear(q_dim, config.hidden_size, bias=bias)
        self.q_norm_block_ar = Qwen3VLTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm_block_ar = Qwen3VLTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def _qkv(self, rows: torch.Tensor, block_ar: bool) -> torch.Tensor:
        """`(..., hidden)` -> `(..., (heads + 2 * kv_heads) * head_dim)` with q/k already normed."""
        suffix = "_block_ar" if block_ar else ""
        q_proj, k_proj, v_proj = (getattr(self, f"{n}_proj{suffix}") for n in "qkv")
        q_norm, k_norm = getattr(self, f"q_norm{suffix}"), getattr(self, f"k_norm{suffix}")
        query = q_norm(q_proj(rows).unflatten(-1, (self.num_heads, self.head_dim)))
        key = k_norm(k_proj(rows).unflatten(-1, (self.num_key_value_heads, self.head_dim)))
        value = v_proj(rows).unflatten(-1, (self.num_key_value_heads, self.head_dim))
        return torch.cat([query, key, value], dim=-2).flatten(-2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask,
        routing: ExpertRouting,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the attention output `(batch, seq_len, hidden)` and the attention weights
        `(batch, heads, seq_len, kv_len)` (None unless the kernel computes them: eager)."""
        batch_size, seq_len, _ = hidden_states.shape
        qkv = routing(hidden_states, lambda r: self._qkv(r, False), lambda r: self._qkv(r, True))
        qkv = qkv.view(batch_size, seq_len, self.num_heads + 2 * self.num_key_value_heads, self.head_dim)
        # (batch, heads, seq_len, head_dim)
        query_states, key_states, value_states = qkv.transpose(1, 2).split(
            [self.num_heads, self.num_key_value_heads, self.num_key_value_heads], dim=1
        )

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        # The kernel of this forward (`prepare_attention`): a flash-attn model falls back to flex / sdpa for the
        # forwards that need the hybrid mask.
        implementation = kwargs.pop("attention_implementation", None) or self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1).contiguous()
        # BlockAR modules are looked up only when the routing has BlockAR rows (a shared transformer has neither).
        return routing(attn_output, self.o_proj, lambda r: self.o_proj_block_ar(r)), attn_weights


class CGMLLMTextDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer with per-expert norms and MLPs around the joint attention (`block_ar=False`: the
    TokenAR ones only)."""

    def __init__(self, config: Qwen3VLTextConfig, layer_idx: int, block_ar: bool = True):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = CGMLLMTextAttention(config=config, layer_idx=layer_idx, block_ar=block_ar)
        self.mlp = Qwen3VLTextMLP(config)
        self.input_layernorm = Qwen3VLTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3VLTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not block_ar:
            return
        self.mlp_block_ar = Qwen3VLTextMLP(config)
        self.input_layernorm_block_ar = Qwen3VLTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm_block_ar = Qwen3VLTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask=None,
        routing: ExpertRouting | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = routing(hidden_states, self.input_layernorm, lambda r: self.input_layernorm_block_ar(r))
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            routing=routing,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = routing(
            hidden_states,
            lambda r: self.mlp(self.post_attention_layernorm(r)),
            lambda r: self.mlp_block_ar(self.post_attention_layernorm_block_ar(r)),
        )
        return residual + hidden_states


class CGMLLMPreTrainedModel(Qwen3VLPreTrainedModel):
    config_class = CGMLLMConfig
    config: CGMLLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["CGMLLMTextDecoderLayer", "Qwen3VLVisionBlock"]
    _supports_flash_attn = True  # where no general mask is needed; the other forwards fall back (masking_cgmllm)
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False
    _can_record_outputs = {}

    # Remote-code classes per Auto class, as transformers maps Qwen3-VL (`AutoModel` = the base model).
    _AUTO_MAP = {
        "AutoModel": "modeling_cgmllm.CGMLLMModel",
        "AutoModelForImageTextToText": "modeling_cgmllm.CGMLLMForConditionalGeneration",
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a local folder without `config.json` (unless a `config` is
        passed): transformers would otherwise build the default configuration, a 2B-shaped model of about 22 GB,
        before it finds that the weights do not fit."""
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if kwargs.get("config") is None and os.path.isdir(folder) and not os.path.isfile(
            os.path.join(folder, "config.json")
        ):
            raise OSError(
                f"{folder} has no config.json: it is not a saved CG-MLLM model folder. Pass the folder written by "
                "`save_pretrained` (in a pipeline folder, its `model/` subfolder), or pass `config=`."
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, variant: str | None = None, **kwargs):
        # `register_for_auto_class` writes only the saved class's entry; a checkpoint of either class loads as both.
        if isinstance(self.config, CGMLLMConfig):
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self._AUTO_MAP}
        # `variant` is named in the signature: a diffusers pipeline passes it only to components that declare it.
        return super().save_pretrained(save_directory, *args, variant=variant, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CGMLLMForConditionalGeneration):
            # Zero-initialised velocity head: training starts from v = 0 (the paper's and official code's choice).
            init.zeros_(module.llm2obj.weight)
            init.zeros_(module.llm2obj.bias)
        elif isinstance(module, Qwen3VLTextRotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


class CGMLLMTextModel(CGMLLMPreTrainedModel):
    """The Mixture-of-Transformers text decoder (Qwen3-VL text model with BlockAR experts and DeepStack).

    `output_hidden_states` / `output_attentions` are recorded by transformers' output-capturing hooks, as in
    Qwen3-VL: the input embeddings and every decoder layer's output (the last one replaced by the normed
    `last_hidden_state`), and every attention module's weights.

    `mixture_of_transformers=False` (the `CGMLLMConfig` field of the same name) builds no BlockAR parameters; the
    caller's routing must then send every row to TokenAR (`CGMLLMModel` does).
    """

    config_class = Qwen3VLTextConfig
    config: Qwen3VLTextConfig
    _can_record_outputs = {"hidden_states": CGMLLMTextDecoderLayer, "attentions": CGMLLMTextAttention}

    def __init__(self, config: Qwen3VLTextConfig, mixture_of_transformers: bool = True):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [CGMLLMTextDecoderLayer(config, layer_idx, block_ar=mixture_of_transformers)
             for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Qwen3VLTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if mixture_of_transformers:
            self.norm_block_ar = Qwen3VLTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3VLTextRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.LongTensor,
        attention_mask=None,
        routing: ExpertRouting | None = None,
        cache: Cache | None = None,
        visual_pos_masks: torch.Tensor | None = None,
        deepstack_visual_embeds: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        Args:
            inputs_embeds: `(batch, seq_len, hidden)`.
            position_ids: `(3, batch, seq_len)` mRoPE ids.
            attention_mask: the prepared mask (bool / float tensor, `BlockMask`, or flash-attn's 2D padding mask), see
                `masking_cgmllm.prepare_attention`.
            attention_implementation (keyword): the kernel of this forward when it differs from the config's (a
                flash-attn model's flex / sdpa fallback); `is_causal` and flash-attn's varlen keywords also go to the
                kernel.
            routing: which rows use BlockAR; defaults to all TokenAR.
            output_hidden_states / output_attentions (keyword, or the text config's flags): see the class docstring.
        """
        kwargs.pop("output_hidden_states", None)  # read by `capture_outputs`; the attention kernels take no such flag
        if routing is None:
            routing = ExpertRouting(torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool), 0)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        for layer_idx, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                routing=routing,
                cache=cache,
                **kwargs,
            )
            if deepstack_visual_embeds is not None and layer_idx < len(deepstack_visual_embeds):
                # DeepStack: add the ViT's intermediate features to the visual rows after the first layers
                # (transformers' own Qwen3-VL helper; it uses no state of its module).
                hidden_states = Qwen3VLTextModel._deepstack_process(
                    self, hidden_states, visual_pos_masks, deepstack_visual_embeds[layer_idx]
                )

        hidden_states = routing(hidden_states, self.norm, lambda r: self.norm_block_ar(r))
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


def _resolve_output_flag(value: bool | None, config: CGMLLMConfig, name: str) -> bool:
    """An `output_*` keyword when given, else the flag of the config or of its text config."""
    if value is not None:
        return bool(value)
    return bool(getattr(config, name, False) or getattr(config.text_config, name, False))


def _sample_start_values(
    values: torch.LongTensor, sample_ids: torch.LongTensor | None, keep: torch.Tensor | None
) -> torch.LongTensor:
    """`(batch, seq_len)` -> `(batch, seq_len)`: each token gets `values` at the first (unpadded) token of its sample."""
    batch_size, seq_len = values.shape
    columns = torch.arange(seq_len, device=values.device).expand(batch_size, -1)
    if sample_ids is None:
        first = keep.long().argmax(-1, keepdim=True) if keep is not None else columns[:, :1]
        return values.gather(1, first).expand(-1, seq_len)
    is_start = torch.ones_like(sample_ids, dtype=torch.bool)
    is_start[:, 1:] = sample_ids[:, 1:] != sample_ids[:, :-1]
    start_column = torch.where(is_start, columns, torch.zeros_like(columns)).cummax(-1).values
    return values.gather(1, start_column)


def check_inputs(condition: torch.Tensor, summary: str, details: Callable[[], str] | None = None) -> None:
    """Raise `ValueError` unless the boolean tensor `condition` holds everywhere.

    Eager, the condition is read on the host: one sync buys a clear error (`details()`, which may read counts, or
    `summary`). Traced (torch.compile, export, CUDA graph capture), it becomes a device-side assert inside the graph
    (`torch._assert_async` with `summary`): no host read and no graph break.
    """
    if is_tracing(condition):
        torch._assert_async(condition.all(), summary)
    elif not bool(condition.all()):
        raise ValueError(details() if details is not None else summary)


def _cached_length(cache: Cache | None, attention_mask: torch.Tensor | None, seq_len: int) -> int:
    """The number of cached tokens in front of the `seq_len` new ones, as a host int.

    A `StaticCache` keeps its length in a device tensor (so that compiled steps need not read it back). Traced, the 2D
    padding mask's width says it without a host read (`cached + new` columns), checked against the cache on the device;
    eager, or without a mask, the length is read.
    """
    if cache is None:
        return 0
    length = cache.get_seq_length()
    if not isinstance(length, torch.Tensor):
        return length
    if attention_mask is not None and attention_mask.ndim == 2 and is_tracing(length):
        past_length = attention_mask.shape[-1] - seq_len
        check_inputs(length == past_length, "`attention_mask` must cover the cached tokens and the new ones.")
        return past_length
    return int(length)


def masked_row_indices(mask: torch.BoolTensor, count: int) -> torch.LongTensor:
    """`(count,)` flat (row-major) indices of the True entries of `mask`, in order, without a host sync.

    `mask[mask]` or `mask.nonzero()` read the number of True entries on the host; here the caller knows it (e.g. the
    number of latent rows it embeds, validated against the mask), so a stable sort that puts the True entries first
    gives their indices with a shape known in advance.
    """
    return torch.argsort((~mask).reshape(-1).to(torch.uint8), stable=True)[:count]


class CGMLLMModel(CGMLLMPreTrainedModel, Qwen3VLModel):
    """Qwen3-VL vision tower + MoT text decoder + the 3D connector (`obj2llm`) and timestep embedder.

    Image handling (`get_image_features`, `get_placeholder_mask`, `get_vision_position_ids`) is inherited from
    transformers' `Qwen3VLModel`.
    """

    def __init__(self, config: CGMLLMConfig):
        CGMLLMPreTrainedModel.__init__(self, config)
        self.visual = Qwen3VLVisionModel._from_config(config.vision_config)
        self.language_model = CGMLLMTextModel._from_config(
            config.text_config, mixture_of_transformers=config.mixture_of_transformers
        )
        hidden_size = config.text_config.hidden_size
        self.obj2llm = nn.Linear(config.shape_latent_channels, hidden_size)
        self.time_embedder = CGMLLMTimestepEmbedder(hidden_size, config.timestep_embedding_dim)
        if config.point_feature_dim is not None:
            self.obj_und_connector = CGMLLMUnderstandingConnector(config.point_feature_dim, hidden_size)
        self.rope_deltas = None
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------------
    # 3D token bookkeeping
    # ----------------------------------------------------------------------------------------------------------------
    def get_image_token_mask(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.BoolTensor:
        """`(batch, seq_len)` True at image placeholder tokens.

        From `input_ids` when given; otherwise from `mm_token_type_ids == 1`, or else from the rows of `inputs_embeds`
        equal to the `<|image_pad|>` embedding (Qwen3-VL's rule for embeddings without ids).
        """
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        if mm_token_type_ids is not None:
            return mm_token_type_ids.to(inputs_embeds.device) == 1
        return self._rows_equal_to_token(inputs_embeds, self.config.image_token_id)

    def _rows_equal_to_token(self, inputs_embeds: torch.Tensor, token_id: int) -> torch.BoolTensor:
        """`(batch, seq_len)` True where a row of `inputs_embeds` is exactly the embedding of `token_id`."""
        token = torch.tensor(token_id, dtype=torch.long, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(token).to(inputs_embeds.dtype)).all(-1)

    def _check_no_shape_rows_in_embeds(self, inputs_embeds, shape_latents, shape_block_ids) -> None:
        """Embeddings without ids cannot say where a 3D block and its latent rows are: refuse instead of guessing."""
        config = self.config
        marker_ids = (config.obj_start_token_id, config.obj_pad_token_id, config.obj_end_token_id)
        holds_markers = any(bool(self._rows_equal_to_token(inputs_embeds, i).any()) for i in marker_ids)
        if shape_latents is not None or shape_block_ids is not None or holds_markers:
            raise ValueError(
                "3D blocks cannot be given as `inputs_embeds` alone: their `<|obj_start|>` / `<|obj_pad|>` / "
                "`<|obj_end|>` ids locate the latent rows, the block mask and the shared block position. Pass "
                "`input_ids` together with `inputs_embeds` (the ids then only locate image and 3D rows), or "
                "`input_ids` alone."
            )

    def get_shape_block_ids(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """Block id per token from the `<|obj_start|> ... <|obj_end|>` spans (markers included), -1 outside.

        `(batch, seq_len)` -> `(batch, seq_len)`; blocks are numbered 0, 1, ... within each row. A span without
        its `<|obj_end|>` runs to the end of the row (a prompt may end inside a block, e.g. when generating).
        """
        config = self.config
        is_start = input_ids == config.obj_start_token_id
        is_end = input_ids == config.obj_end_token_id
        starts_so_far = is_start.long().cumsum(-1)
        ends_before = is_end.long().cumsum(-1) - is_end.long()
        depth = starts_so_far - ends_before
        check_inputs(
            (depth >= 0) & (depth <= 1),
            "Unbalanced 3D markers: every `<|obj_end|>` must close an `<|obj_start|>` and blocks cannot nest.",
        )
        block_ids = torch.where(depth == 1, starts_so_far - 1, torch.full_like(starts_so_far, -1))
        outside = (input_ids == config.obj_pad_token_id) & (block_ids < 0)
        check_inputs(~outside, "Found `<|obj_pad|>` tokens outside an `<|obj_start|> ... <|obj_end|>` span.")
        return block_ids

    def get_rope_index(
        self,
        input_ids: torch.LongTensor,
        image_grid_thw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        shape_block_ids: torch.LongTensor | None = None,
        noisy_shape_mask: torch.BoolTensor | None = None,
        packed_sample_ids: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """mRoPE ids for text, images and 3D blocks.

        Text advances by one per token; an image follows Qwen3-VL (t = start, h/w = start + grid offsets, then
        `start + max(h, w) // merge`); every token of a 3D block (markers included) shares one id `r`, after which a
        clean block advances to `r + 1` while a noisy block does not advance (the official convention). Positions
        restart at 0 for every packed sample.

        Image tokens are found from `mm_token_type_ids == 1` when given (Qwen3-VL's token types), else from
        `input_ids`; without `input_ids`, both `mm_token_type_ids` and `shape_block_ids` are needed.

        Returns:
            position_ids `(3, batch, seq_len)` and rope deltas `(batch, 1)` (`max position + 1 - length`).
        """
        if input_ids is None and (mm_token_type_ids is None or shape_block_ids is None):
            raise ValueError("`get_rope_index` without `input_ids` needs `mm_token_type_ids` and `shape_block_ids`.")
        if shape_block_ids is None:
            shape_block_ids = self.get_shape_block_ids(input_ids)
        batch_size, seq_len = shape_block_ids.shape
        device = shape_block_ids.device
        if noisy_shape_mask is None:
            noisy_shape_mask = torch.zeros_like(shape_block_ids, dtype=torch.bool)
        if mm_token_type_ids is not None:
            is_image = mm_token_type_ids.to(device) == 1
        else:
            is_image = input_ids == self.config.image_token_id
        merge = self.config.vision_config.spatial_merge_size
        grid_iter = iter(image_grid_thw) if image_grid_thw is not None else None

        position_ids = torch.zeros(3, batch_size, seq_len, dtype=torch.long, device=device)
        deltas = []
        # Plain Python lists: one pass per row over run-length segments, no per-token tensor indexing.
        image_rows = is_image.tolist()
        block_rows = shape_block_ids.tolist()
        noisy_rows = noisy_shape_mask.tolist()
        sample_rows = packed_sample_ids.tolist() if packed_sample_ids is not None else None
        keep_rows = attention_mask.bool().tolist() if attention_mask is not None else None
        for b in range(batch_size):
            columns = range(seq_len) if keep_rows is None else [c for c, k in enumerate(keep_rows[b]) if k]
            # Run-length segments over (sample, kind, block): kind 0 text, 1 image, 2 3D block.
            segments = []
            for col in columns:
                sample = sample_rows[b][col] if sample_rows is not None else 0
                block = block_rows[b][col]
                kind = 2 if block >= 0 else (1 if image_rows[b][col] else 0)
                key = (sample, kind, block if kind == 2 else -1)
                if segments and segments[-1][0] == key:
                    segments[-1][1].append(col)
                else:
                    segments.append((key, [col]))
            current, current_sample, max_position = 0, None, -1
            for (sample, kind, block), cols in segments:
                if sample != current_sample:
                    current, current_sample = 0, sample
                index = torch.tensor(cols, device=device)
                if kind == 0:
                    pos = torch.arange(current, current + len(cols), device=device).expand(3, -1)
                    current += len(cols)
                elif kind == 1:
                    if grid_iter is None:
                        raise ValueError("Image tokens found in `input_ids` but no `image_grid_thw` was given.")
                    grid_thw = next(grid_iter)
                    pos = self.get_vision_position_ids(current, grid_thw, 1, merge, device=device)
                    if pos.shape[1] != len(cols):
                        raise ValueError(
                            f"An image with grid {grid_thw.tolist()} needs {pos.shape[1]} image tokens, but the "
                            f"sequence has a run of {len(cols)}."
                        )
                    current += max(int(grid_thw[1]), int(grid_thw[2])) // merge
                else:
                    pos = torch.full((3, len(cols)), current, dtype=torch.long, device=device)
                    if not noisy_rows[b][cols[0]]:
                        current += 1
                position_ids[:, b, index] = pos
                max_position = max(max_position, int(pos.max()))
            deltas.append(max_position + 1 - len(columns))
        return position_ids, torch.tensor(deltas, device=device).unsqueeze(1)

    # ----------------------------------------------------------------------------------------------------------------
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        shape_latents: torch.Tensor | list[torch.Tensor] | None = None,
        point_features: torch.Tensor | None = None,
        shape_timesteps: torch.Tensor | None = None,
        shape_loss_mask: torch.BoolTensor | None = None,
        shape_block_ids: torch.LongTensor | None = None,
        packed_sample_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        update_cache: bool = True,
        mm_token_type_ids: torch.IntTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> CGMLLMModelOutputWithPast:
        r"""
        Args:
            input_ids: `(batch, seq_len)`; every latent row is an `<|obj_pad|>` token inside an
                `<|obj_start|> ... <|obj_end|>` span.
            inputs_embeds: `(batch, seq_len, hidden)` token embeddings to use instead of looking `input_ids` up, as
                in Qwen3-VL. Alone, they can hold text and image rows: image rows are the `<|image_pad|>` embedding
                (or marked by `mm_token_type_ids == 1`) and are replaced by the features of `pixel_values`. 3D blocks
                are located by their ids only: for rows with 3D blocks pass `input_ids` together with
                `inputs_embeds` (the ids then only locate the image and 3D rows, every other row keeps its given
                embedding), or `input_ids` alone.
            mm_token_type_ids: `(batch, seq_len)` Qwen3-VL's token types (0 text, 1 image, 2 video), as the
                processor returns them. Accepted so that `generate(**processor_outputs)` works; image rows are
                found from `input_ids` when given, so the types are only read with `inputs_embeds` alone.
            output_attentions / output_hidden_states: return every layer's attention weights (eager attention
                only; other kernels compute none, as in transformers) / hidden states. Default: the config's flags
                (the top-level config or its `text_config`).
            attention_mask: `(batch, cached + seq_len)` 2D padding mask.
            position_ids: the mRoPE ids `(3, batch, seq_len)`, or `(4, batch, seq_len)` with the text positions in
                row 0 (what `generate` passes), or text positions only `(batch, seq_len)`. Computed with
                [`~CGMLLMModel.get_rope_index`] when omitted. Text positions that restart inside a row without
                padding or cache mark padding-free packed samples (`DataCollatorWithFlattening`), exactly like
                `packed_sample_ids`; with 2D ids, rows holding images or 3D blocks still get their mRoPE ids, computed
                per sample and starting at the sample's first text position.
            shape_latents: `(num_latent_rows, C)` (or a list of `(N_i, C)` per object), one row per `<|obj_pad|>` in
                row-major order. Clean latents `x0` unless `shape_timesteps` is given, in which case they are the
                noisy `x_t` at those times.
            point_features: `(num_latent_rows, point_feature_dim)` (or `(B, rows, dim)`), 3D-understanding features
                (PointBERT's, cls row first) for the `<|obj_pad|>` rows instead of `shape_latents`, the official
                3D-captioning input: `obj_und_connector` only (no timestep embedding), a clean bidirectional block
                through BlockAR with one rope id, the markers through TokenAR.
            shape_timesteps: `(num_latent_rows,)` flow time of every latent row, or one value `(1,)` shared by all
                rows (a denoising step; its embedding is computed once). When omitted, the forward draws a
                logit-normal `t` per block for the rows in `shape_loss_mask` (noise `eps`, `x_t = (1-t) x0 + t eps`,
                target `eps - x0`) and uses `t = 0` (clean, no loss) for the others.
            shape_loss_mask: `(num_latent_rows,)` bool, which rows are generation targets when timesteps are drawn
                (default: all).
            shape_block_ids: `(batch, seq_len)` block id per token (-1 outside blocks); derived from the markers
                when omitted. Needed only for layouts with several blocks per object.
            packed_sample_ids: `(batch, seq_len)` id of the packed sample each token belongs to (derived from restarting
                text `position_ids` when omitted).
            update_cache: False leaves `cache` as it was (a denoising step attends to the cached prompt but must not
                stay in it): the rows are written with the cache's own `update` and cropped off again afterwards
                (`cache.crop`), the standard cache API, so `DynamicCache`, `StaticCache` and offloaded caches work
                alike. Caches whose layers cannot be cropped (sliding windows) raise a `ValueError`.
            generator: optional generator for the drawn timesteps and noise.
        """
        cache = kwargs.pop("past_key_values", cache)
        check_attention_implementation(self.config.text_config._attn_implementation)
        config = self.config
        if input_ids is None and inputs_embeds is None:
            raise ValueError("Pass `input_ids` or `inputs_embeds` (or both, see the docstring).")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        elif input_ids is not None and tuple(input_ids.shape) != tuple(inputs_embeds.shape[:2]):
            raise ValueError(
                f"`input_ids` {tuple(input_ids.shape)} and `inputs_embeds` {tuple(inputs_embeds.shape)} must describe "
                "the same (batch, seq_len) tokens."
            )
        batch_size, seq_len = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=config.text_config)
        if cache is not None and not update_cache and not cache.is_croppable:
            raise ValueError(
                f"`update_cache=False` writes the new rows into the cache and crops them off again; a "
                f"{type(cache).__name__} cannot be cropped (sliding-window or quantized layers). Use a DynamicCache "
                "or a StaticCache for the denoising steps."
            )
        past_length = _cached_length(cache, attention_mask, seq_len)

        # 1. Token embeddings, images (Qwen3-VL), 3D latent rows.
        if input_ids is None:
            self._check_no_shape_rows_in_embeds(inputs_embeds, shape_latents, shape_block_ids)
        image_token_mask = self.get_image_token_mask(input_ids, inputs_embeds, mm_token_type_ids)
        visual_pos_masks, deepstack_visual_embeds, image_outputs = None, None, None
        if pixel_values is None:
            check_inputs(
                ~image_token_mask,
                "The sequence holds image tokens but no `pixel_values` were given.",
                lambda: f"The sequence holds {int(image_token_mask.sum())} image tokens but no `pixel_values` were "
                "given.",
            )
        else:
            if image_grid_thw is None:
                raise ValueError("`pixel_values` were given without `image_grid_thw`.")
            image_outputs = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            image_embeds = torch.cat(image_outputs.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            check_inputs(
                image_token_mask.sum() == image_embeds.shape[0],
                "The images produce another number of visual tokens than the sequence holds image tokens.",
                lambda: f"The images produce {image_embeds.shape[0]} visual tokens but the sequence holds "
                f"{int(image_token_mask.sum())} image tokens.",
            )
            image_mask = image_token_mask.unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds)
            visual_pos_masks = image_token_mask
            deepstack_visual_embeds = [torch.cat(feat, dim=0) for feat in image_outputs.deepstack_features]

        if input_ids is None:
            # Checked above: rows given as embeddings hold no 3D block.
            shape_block_ids = torch.full((batch_size, seq_len), -1, dtype=torch.long, device=inputs_embeds.device)
            shape_row_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=inputs_embeds.device)
        else:
            if shape_block_ids is None:
                shape_block_ids = self.get_shape_block_ids(input_ids)
            shape_row_mask = input_ids == config.obj_pad_token_id
        if point_features is not None:
            shape_out = self._embed_point_rows(shape_row_mask, point_features, shape_latents)
        else:
            shape_out = self._embed_shape_rows(
                shape_row_mask, shape_block_ids, shape_latents, shape_timesteps, shape_loss_mask, generator
            )
        if shape_out is not None:
            shape_embeds, shape_timesteps, velocity_target, flow_loss_mask = shape_out
            num_shape_rows = shape_embeds.shape[0]  # known on the host (and checked against the mask): no sync
            shape_row_index = masked_row_indices(shape_row_mask, num_shape_rows)
            inputs_embeds = (
                inputs_embeds.reshape(-1, inputs_embeds.shape[-1])
                .index_copy(0, shape_row_index, shape_embeds.to(inputs_embeds))
                .view_as(inputs_embeds)
            )
            noisy_shape_mask = self._noisy_token_mask(shape_row_index, shape_block_ids, shape_timesteps)
        else:
            velocity_target = flow_loss_mask = None
            num_shape_rows = 0
            noisy_shape_mask = torch.zeros_like(shape_row_mask)

        # 2. Packed samples and positions: one id per 3D block, Qwen3-VL grids for images.
        # 2D position ids (and row 0 of 4-row ones) are text positions: in a padding-free packed row
        # (`DataCollatorWithFlattening`) they restart for every sample, which is what separates the samples.
        text_position_ids = None
        if position_ids is not None and position_ids.ndim == 2:
            text_position_ids = position_ids.expand(batch_size, -1)
        elif position_ids is not None and position_ids.shape[0] == 4:
            text_position_ids = position_ids[0]
        if packed_sample_ids is None:
            packed_sample_ids = packed_sample_ids_from_position_ids(text_position_ids, attention_mask, past_length)
        if position_ids is not None and position_ids.ndim == 3:
            position_ids = position_ids[1:] if position_ids.shape[0] == 4 else position_ids
        elif position_ids is not None and (
            past_length > 0 or (pixel_values is None and not bool((shape_block_ids >= 0).any()))
        ):
            # Text positions: the same id on the three mRoPE axes (what Qwen3-VL does with 2D ids).
            position_ids = text_position_ids.unsqueeze(0).expand(3, -1, -1)
        elif past_length == 0 or self.rope_deltas is None:
            keep = attention_mask[:, past_length:] if attention_mask is not None else None
            rope, deltas = self.get_rope_index(
                input_ids, image_grid_thw, keep, shape_block_ids, noisy_shape_mask, packed_sample_ids,
                mm_token_type_ids=image_token_mask.long(),
            )
            if text_position_ids is not None:
                # 2D text positions cannot express image grids or shared block ids: the mRoPE ids are computed per
                # sample and start where the sample's text positions start.
                offset = _sample_start_values(text_position_ids, packed_sample_ids, keep)
                rope, deltas = rope + offset, deltas + offset[:, -1:]
            position_ids, self.rope_deltas = rope, deltas
        else:
            # Continuing a cached sequence without explicit positions: plain text after the cache.
            steps = torch.arange(past_length, past_length + seq_len, device=inputs_embeds.device)
            position_ids = (steps[None] + self.rope_deltas).unsqueeze(0).expand(3, -1, -1)

        # 3. The hybrid mask (or flash-attn's causal flag / varlen layout) and the MoT decoder.
        attention = prepare_attention(
            config.text_config,
            inputs_embeds,
            attention_mask,
            past_length,
            shape_block_ids,
            noisy_shape_mask,
            packed_sample_ids,
            cache=cache,
        )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention.mask,
            # One shared transformer (`mixture_of_transformers=False`): 3D rows take the TokenAR weights as well.
            routing=ExpertRouting(shape_row_mask, num_block_ar=num_shape_rows if config.mixture_of_transformers else 0),
            cache=cache,
            attention_implementation=attention.implementation,
            **attention.kwargs,
            visual_pos_masks=visual_pos_masks,
            deepstack_visual_embeds=deepstack_visual_embeds,
            output_hidden_states=_resolve_output_flag(output_hidden_states, config, "output_hidden_states"),
            output_attentions=_resolve_output_flag(output_attentions, config, "output_attentions"),
            return_dict=True,
        )
        if cache is not None and not update_cache:
            cache.crop(-seq_len)  # back to the context: the rows were attended to, not kept
        return CGMLLMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            shape_row_mask=shape_row_mask,
            # Understanding rows (point features) are context only: no velocity is read from them.
            shape_timesteps=shape_timesteps if shape_out is not None and point_features is None else None,
            velocity_target=velocity_target,
            flow_loss_mask=flow_loss_mask,
            position_ids=position_ids,
        )

    def _embed_point_rows(self, shape_row_mask, point_features, shape_latents):
        """`obj_und_connector(point_features)` for the `<|obj_pad|>` rows (clean context, t = 0, no timestep
        embedding). Returns `(embeds (S, hidden), zeros (S,), None, None)` like `_embed_shape_rows`."""
        if shape_latents is not None:
            raise ValueError("Pass either `shape_latents` or `point_features` for the `<|obj_pad|>` rows, not both.")
        connector = getattr(self, "obj_und_connector", None)
        if connector is None:
            raise ValueError(
                "`point_features` were given but this model has no `obj_und_connector` (config.point_feature_dim is "
                "None); caption meshes from ShapeVAE latents with `shape_latents` instead."
            )
        features = torch.as_tensor(point_features)
        if features.ndim == 3:
            features = features.reshape(-1, features.shape[-1])
        width = self.config.point_feature_dim
        if features.ndim != 2 or features.shape[-1] != width:
            raise ValueError(
                f"`point_features` must have shape (num_rows, {width}) (config.point_feature_dim), got "
                f"{tuple(torch.as_tensor(point_features).shape)}."
            )
        num_rows = features.shape[0]
        check_inputs(
            shape_row_mask.sum() == num_rows,
            "The number of `<|obj_pad|>` tokens must equal the number of `point_features` rows.",
            lambda: f"The number of `<|obj_pad|>` tokens ({int(shape_row_mask.sum())}) must equal the number of "
            f"`point_features` rows ({num_rows}).",
        )
        # The inputs' device (parameters may sit on `meta` under sequential offload; hooks move the inputs).
        device = shape_row_mask.device
        embeds = connector(features.to(device=device, dtype=connector.fc1.weight.dtype))
        return embeds, torch.zeros(num_rows, device=device), None, None

    def _embed_shape_rows(self, shape_row_mask, shape_block_ids, shape_latents, shape_timesteps, shape_loss_mask,
                          generator):
        """Connector input for the latent rows: `obj2llm(x_t) + time_embedder(t)`.

        Returns `(embeds (S, hidden), timesteps (S,), velocity_target (S, C) | None, flow_loss_mask (S,) | None)`,
        or None when the sequence has no latent rows.
        """
        config = self.config
        if shape_latents is None:
            check_inputs(
                ~shape_row_mask,
                "`input_ids` holds `<|obj_pad|>` latent rows but no `shape_latents` were given.",
                lambda: f"`input_ids` holds {int(shape_row_mask.sum())} `<|obj_pad|>` latent rows but no "
                "`shape_latents` were given.",
            )
            return None
        if isinstance(shape_latents, (list, tuple)):
            shape_latents = torch.cat([torch.as_tensor(x) for x in shape_latents], dim=0)
        if shape_latents.ndim == 3:
            shape_latents = shape_latents.reshape(-1, shape_latents.shape[-1])
        if shape_latents.ndim != 2 or shape_latents.shape[-1] != config.shape_latent_channels:
            raise ValueError(
                f"`shape_latents` must have shape (num_latent_rows, {config.shape_latent_channels}), got "
                f"{tuple(shape_latents.shape)}."
            )
        # The row count comes from the latents (known on the host), checked against the mask.
        num_rows = shape_latents.shape[0]
        check_inputs(
            shape_row_mask.sum() == num_rows,
            "The number of `<|obj_pad|>` tokens must equal the number of latent rows in `shape_latents`.",
            lambda: f"The number of `<|obj_pad|>` tokens ({int(shape_row_mask.sum())}) must equal the number of "
            f"latent rows in `shape_latents` ({num_rows}).",
        )
        # The inputs' device, not a parameter's: under sequential offload parameters sit on `meta`, and under a
        # `device_map` accelerate's hooks move the connector's inputs to wherever it lives.
        device = shape_row_mask.device
        x = shape_latents.to(device=device, dtype=torch.float32)
        velocity_target = flow_loss_mask = None
        time_embeds = None
        if shape_timesteps is not None:
            timesteps = torch.as_tensor(shape_timesteps, dtype=torch.float32, device=device).reshape(-1)
            if timesteps.numel() == 1:
                # One flow time for every row (a denoising step): embed it once, not once per row.
                time_embeds = self.time_embedder(timesteps)
                timesteps = timesteps.expand(num_rows)
            if timesteps.shape[0] != num_rows:
                raise ValueError(
                    f"`shape_timesteps` must have one value per latent row ({num_rows}), got {timesteps.shape[0]}."
                )
        else:
            if shape_loss_mask is None:
                flow_loss_mask = torch.ones(num_rows, dtype=torch.bool, device=device)
            else:
                flow_loss_mask = torch.as_tensor(shape_loss_mask, device=device).bool().reshape(-1)
                if flow_loss_mask.shape[0] != num_rows:
                    raise ValueError(
                        f"`shape_loss_mask` must have one value per latent row ({num_rows}), got "
                        f"{flow_loss_mask.shape[0]}."
                    )
            # One logit-normal t per (row, block): every latent of a block shares its noise level.
            batch_size, seq_len = shape_row_mask.shape
            logits = torch.randn(batch_size, seq_len, generator=generator, device="cpu" if generator is None
                                 else generator.device).to(device)
            block_t = torch.sigmoid(config.timestep_logit_mean + config.timestep_logit_std * logits)
            shift = config.timestep_shift
            block_t = shift * block_t / (1 + (shift - 1) * block_t)
            token_t = block_t.gather(1, shape_block_ids.to(device).clamp(min=0))  # each token: its block's t
            timesteps = token_t.reshape(-1).index_select(0, masked_row_indices(shape_row_mask, num_rows))
            timesteps = torch.where(flow_loss_mask, timesteps, torch.zeros_like(timesteps))
            noise = torch.randn(x.shape, generator=generator, device="cpu" if generator is None
                                else generator.device).to(device)
            velocity_target = noise - x
            x = (1 - timesteps[:, None]) * x + timesteps[:, None] * noise
        dtype = self.obj2llm.weight.dtype
        embeds = self.obj2llm(x.to(dtype)) + (self.time_embedder(timesteps) if time_embeds is None else time_embeds)
        return embeds, timesteps, velocity_target, flow_loss_mask

    @staticmethod
    def _noisy_token_mask(shape_row_index, shape_block_ids, shape_timesteps) -> torch.BoolTensor:
        """`(batch, seq_len)` True for every token (markers included) of a block holding a latent row with t > 0.

        `shape_row_index` `(num_latent_rows,)`: the flat positions of the latent rows ([`masked_row_indices`]).
        """
        batch_size, seq_len = shape_block_ids.shape
        device = shape_block_ids.device
        # 1 at the latent rows with t > 0, 0 elsewhere; then the largest value per (row, block id): the noisy blocks.
        row_is_noisy = torch.zeros(batch_size * seq_len, device=device).index_copy(
            0, shape_row_index.to(device), (shape_timesteps.to(device) > 0).float()
        )
        block_index = shape_block_ids.clamp(min=0)  # tokens outside blocks add a 0 to block 0: no change
        noisy_block = torch.zeros(batch_size, seq_len, device=device).scatter_reduce(
            1, block_index, row_is_noisy.view(batch_size, seq_len), reduce="amax"
        )
        return (shape_block_ids >= 0) & (noisy_block.gather(1, block_index) > 0)


class CGMLLMForConditionalGeneration(CGMLLMPreTrainedModel, GenerationMixin):
    """CG-MLLM with its two heads: `lm_head` (text, tied to the embeddings when configured) and `llm2obj`
    (velocity of the 3D latent rows, zero-initialised)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    accepts_loss_kwargs = True

    def __init__(self, config: CGMLLMConfig):
        super().__init__(config)
        self.model = CGMLLMModel(config)
        hidden_size = config.text_config.hidden_size
        self.lm_head = nn.Linear(hidden_size, config.text_config.vocab_size, bias=False)
        self.llm2obj = nn.Linear(hidden_size, config.shape_latent_channels)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.language_model.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        shape_latents: torch.Tensor | list[torch.Tensor] | None = None,
        point_features: torch.Tensor | None = None,
        shape_timesteps: torch.Tensor | None = None,
        shape_loss_mask: torch.BoolTensor | None = None,
        shape_block_ids: torch.LongTensor | None = None,
        packed_sample_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        update_cache: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
        mm_token_type_ids: torch.IntTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> CGMLLMCausalLMOutputWithPast | tuple:
        r"""
        Training and inference share this forward. See [`CGMLLMModel.forward`] for the 3D arguments, `inputs_embeds`,
        `mm_token_type_ids` and the output flags.

        Args:
            labels: `(batch, seq_len)` next-token labels aligned with `input_ids` (-100 = ignored; shifted inside).
                With labels, `lm_head` runs only on the rows that predict a label (a training batch's latent rows
                and prompt never reach the 151,936-way vocabulary projection), and `logits` holds those rows.
            logits_to_keep: without labels, compute logits for the last `logits_to_keep` positions only (0 = all;
                `generate` and the pipeline pass 1).
            num_items_in_batch / num_shape_rows_in_batch: the denominators of the two loss terms (see
                [`cgmllm_loss`]); default: this batch's label tokens / target latent rows.
            return_dict (keyword, defaults to `config.return_dict`): False returns `output.to_tuple()`, i.e.
                `(loss, logits, ...)` without the fields that are None, as every transformers model does.

        Returns `loss = lm_loss_weight * lm_loss + flow_loss_weight * flow_loss` (the terms that exist), the two
        terms separately, `logits`, and `velocity` for every latent row.
        """
        cache = kwargs.pop("past_key_values", cache)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        num_shape_rows_in_batch = kwargs.pop("num_shape_rows_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            shape_latents=shape_latents,
            point_features=point_features,
            shape_timesteps=shape_timesteps,
            shape_loss_mask=shape_loss_mask,
            shape_block_ids=shape_block_ids,
            packed_sample_ids=packed_sample_ids,
            use_cache=use_cache,
            update_cache=update_cache,
            mm_token_type_ids=mm_token_type_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            generator=generator,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state

        velocity = None
        if outputs.shape_timesteps is not None:
            rows = masked_row_indices(outputs.shape_row_mask, outputs.shape_timesteps.shape[0]).to(hidden_states.device)
            velocity = self.llm2obj(hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, rows)).float()

        target_ids = None
        if labels is not None:
            # Row i predicts label i + 1; only labelled rows go through lm_head.
            labels = labels.to(hidden_states.device)
            label_mask = labels[:, 1:] != -100
            target_ids = labels[:, 1:][label_mask]
            logits = self.lm_head(hidden_states[:, :-1][label_mask])
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])

        # A generation-only batch (every label -100) has no CE term rather than a NaN one.
        lm_loss, flow_loss = cgmllm_loss(
            logits, target_ids, velocity, outputs.velocity_target, outputs.flow_loss_mask,
            num_items_in_batch=num_items_in_batch, num_shape_rows_in_batch=num_shape_rows_in_batch,
        )
        loss = None
        if lm_loss is not None or flow_loss is not None:
            loss = 0.0
            if lm_loss is not None:
                loss = loss + self.config.lm_loss_weight * lm_loss
            if flow_loss is not None:
                loss = loss + self.config.flow_loss_weight * flow_loss

        return CGMLLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            flow_loss=flow_loss,
            velocity=velocity,
            velocity_target=outputs.velocity_target,
            flow_loss_mask=outputs.flow_loss_mask,
            shape_timesteps=outputs.shape_timesteps,
            position_ids=outputs.position_ids,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Text generation (captioning) through GenerationMixin
    # ----------------------------------------------------------------------------------------------------------------
    _SHAPE_INPUTS = ("shape_latents", "point_features", "shape_timesteps", "shape_loss_mask", "shape_block_ids",
                     "packed_sample_ids")

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        # Images and 3D blocks go with every forward whose (uncached) tokens hold their placeholders: the prefill,
        # each step without a cache, and an assisted-decoding assistant's first forward (which `generate` does not
        # count as a first iteration, and so would send without its pixels).
        input_ids = model_inputs.get("input_ids")
        if input_ids is None:  # a prompt given as `inputs_embeds` (first step only): text and image rows
            has_images, has_shapes = True, False
        else:
            has_images = bool((input_ids == self.config.image_token_id).any())
            has_shapes = bool((input_ids == self.config.obj_pad_token_id).any())
        for names, needed in (
            (("pixel_values", "image_grid_thw"), has_images),
            (self._SHAPE_INPUTS, has_shapes),
        ):
            for name in names:
                if needed and kwargs.get(name) is not None:
                    model_inputs[name] = kwargs[name]
                else:
                    model_inputs.pop(name, None)
        # A 3D block inside a prompt is context: clean latents (t = 0) unless told otherwise.
        if model_inputs.get("shape_latents") is not None and model_inputs.get("shape_timesteps") is None:
            model_inputs["shape_timesteps"] = torch.zeros(1)
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """Repeat every prompt `expand_size` times for beam search / `num_return_sequences > 1`.

        `GenerationMixin` repeats each tensor row by row along dim 0. That is right for `(batch, ...)` tensors, but
        the 3D latents and the image patches are flattened over the batch: `shape_latents` `(num_latent_rows, C)`
        (with per-row `shape_timesteps` / `shape_loss_mask`) and `pixel_values` `(num_patches, D)` with one
        `image_grid_thw` row per image. Those are cut into one chunk per prompt (by its `<|obj_pad|>` count, by
        its images' patch counts) and each chunk is repeated whole, so that copy k of prompt b holds prompt b's
        objects and images: `[a, b] -> [a, a, b, b]` object by object, not `[a0, a0, a1, a1, ...]` row by row.
        """
        if expand_size == 1 or input_ids is None:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        config = self.config

        def repeat_chunks(values: torch.Tensor, counts: list[int], name: str) -> torch.Tensor:
            if sum(counts) != values.shape[0]:
                raise ValueError(
                    f"`{name}` has {values.shape[0]} rows but the prompts need {sum(counts)} ({counts} per prompt)."
                )
            chunks = values.split(counts)
            return torch.cat([chunk for chunk in chunks for _ in range(expand_size)])

        flat = {}
        shape_latents = model_kwargs.pop("shape_latents", None)
        if shape_latents is not None:
            if isinstance(shape_latents, (list, tuple)):
                shape_latents = torch.cat([torch.as_tensor(x) for x in shape_latents], dim=0)
            shape_latents = shape_latents.reshape(-1, shape_latents.shape[-1])
            rows_per_prompt = (input_ids == config.obj_pad_token_id).sum(-1).tolist()
            flat["shape_latents"] = repeat_chunks(shape_latents, rows_per_prompt, "shape_latents")
            for name in ("shape_timesteps", "shape_loss_mask"):
                value = model_kwargs.pop(name, None)
                if value is not None:
                    value = torch.as_tensor(value).reshape(-1)
                    # A single value applies to every row and needs no copies.
                    flat[name] = value if value.numel() == 1 else repeat_chunks(value, rows_per_prompt, name)
        point_features = model_kwargs.pop("point_features", None)
        if point_features is not None:
            point_features = torch.as_tensor(point_features)
            point_features = point_features.reshape(-1, point_features.shape[-1])
            rows_per_prompt = (input_ids == config.obj_pad_token_id).sum(-1).tolist()
            flat["point_features"] = repeat_chunks(point_features, rows_per_prompt, "point_features")

        pixel_values = model_kwargs.pop("pixel_values", None)
        image_grid_thw = model_kwargs.pop("image_grid_thw", None)
        if pixel_values is not None and image_grid_thw is not None:
            merge = config.vision_config.spatial_merge_size
            patches = image_grid_thw.prod(-1).tolist()
            tokens = [p // (merge * merge) for p in patches]
            tokens_per_prompt = (input_ids == config.image_token_id).sum(-1).tolist()
            # Images belong to prompts in order: prompt b holds the next images whose tokens add up to its count.
            images_per_prompt, image = [], 0
            for needed in tokens_per_prompt:
                start = image
                while needed > 0 and image < len(tokens):
                    needed -= tokens[image]
                    image += 1
                if needed != 0:
                    raise ValueError(
                        f"The image tokens of the prompts ({tokens_per_prompt}) do not match the images' grids "
                        f"({image_grid_thw.tolist()})."
                    )
                images_per_prompt.append(image - start)
            patches_per_prompt = [
                sum(patches[start:start + count])
                for start, count in zip(torch.tensor([0] + images_per_prompt).cumsum(0).tolist(), images_per_prompt)
            ]
            flat["pixel_values"] = repeat_chunks(pixel_values, patches_per_prompt, "pixel_values")
            flat["image_grid_thw"] = repeat_chunks(image_grid_thw, images_per_prompt, "image_grid_thw")
        else:
            model_kwargs.update(
                {k: v for k, v in (("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw)) if v is not None}
            )

        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs.update(flat)
        return input_ids, model_kwargs

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # (4, batch, seq_len): row 0 text positions (bookkeeping for generate), rows 1-3 CG-MLLM's mRoPE ids.
        text_positions = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[-1] == 0:
            input_ids = inputs_tensor
        if input_ids.ndim == 2 and input_ids.dtype in (torch.int, torch.long):
            rope, _ = self.model.get_rope_index(
                input_ids,
                image_grid_thw=model_kwargs.get("image_grid_thw"),
                attention_mask=model_kwargs.get("attention_mask"),
                shape_block_ids=model_kwargs.get("shape_block_ids"),
            )
        elif input_ids.ndim == 3 and input_ids.is_floating_point():
            # A prompt given as `inputs_embeds`: text and image rows only (see `CGMLLMModel.forward`).
            inputs_embeds = input_ids
            self.model._check_no_shape_rows_in_embeds(
                inputs_embeds, model_kwargs.get("shape_latents"), model_kwargs.get("shape_block_ids")
            )
            image_token_mask = self.model.get_image_token_mask(None, inputs_embeds, model_kwargs.get("mm_token_type_ids"))
            rope, _ = self.model.get_rope_index(
                None,
                image_grid_thw=model_kwargs.get("image_grid_thw"),
                attention_mask=model_kwargs.get("attention_mask"),
                shape_block_ids=torch.full(image_token_mask.shape, -1, dtype=torch.long, device=inputs_embeds.device),
                mm_token_type_ids=image_token_mask.long(),
            )
        else:
            return text_positions
        return torch.cat([text_positions.reshape(1, *rope.shape[1:]), rope], dim=0)

    # ----------------------------------------------------------------------------------------------------------------
    # Builders
    # ----------------------------------------------------------------------------------------------------------------
    def init_block_ar_from_token_ar(self) -> None:
        """Copy every TokenAR weight into its BlockAR twin (the initialisation used before stage-1 training)."""
        state = self.state_dict()
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "_block_ar" in name:
                    param.copy_(state[name.replace("_block_ar", "")])

    @classmethod
    def from_qwen3_vl(
        cls,
        pretrained_model_name_or_path,
        tokenizer=None,
        torch_dtype: torch.dtype | None = None,
        attn_implementation: str = "sdpa",
        **config_kwargs,
    ) -> "CGMLLMForConditionalGeneration":
        """Build a CG-MLLM from a Qwen3-VL checkpoint (a local folder or a loaded `Qwen3VLForConditionalGeneration`).

        TokenAR gets the Qwen3-VL weights unchanged, BlockAR is copied from TokenAR, the connector and timestep
        embedder are freshly initialised and the velocity head is zero. When a tokenizer is given (or found in
        the folder) the 3D special tokens are added to it, their ids are written to the config, and the
        embeddings are resized if the vocabulary grew beyond the embedding matrix.

        Args:
            pretrained_model_name_or_path: folder of a Qwen3-VL checkpoint, or a `Qwen3VLForConditionalGeneration`.
            tokenizer: the tokenizer to extend (modified in place); loaded from the folder when None and present.
            config_kwargs: 3D settings for [`CGMLLMConfig`] (e.g. `num_shape_tokens`, `shape_latent_channels`).
        """
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

        from .configuration_cgmllm import SHAPE_SPECIAL_TOKENS

        if isinstance(pretrained_model_name_or_path, Qwen3VLForConditionalGeneration):
            qwen = pretrained_model_name_or_path
        else:
            path = os.fspath(pretrained_model_name_or_path)
            if not os.path.isdir(path):
                raise ValueError(f"`{path}` is not a local Qwen3-VL checkpoint folder.")
            qwen = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
            if tokenizer is None and any(
                os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
            ):
                tokenizer = AutoTokenizer.from_pretrained(path)

        config_dict = qwen.config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            config_dict.pop(key, None)
        if tokenizer is not None:
            tokenizer.add_tokens(list(SHAPE_SPECIAL_TOKENS), special_tokens=True)
            ids = tokenizer.convert_tokens_to_ids(list(SHAPE_SPECIAL_TOKENS))
            config_kwargs.update(obj_start_token_id=ids[0], obj_end_token_id=ids[1], obj_pad_token_id=ids[2])
        config_dict.update(config_kwargs)
        config = CGMLLMConfig(**config_dict)
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation

        model = cls(config)
        qwen_state = qwen.state_dict()
        missing, unexpected = model.load_state_dict(qwen_state, strict=False)
        if unexpected:
            raise ValueError(f"Qwen3-VL weights with no place in CG-MLLM: {sorted(unexpected)[:10]} ...")
        fresh_prefixes = ("model.obj2llm.", "model.time_embedder.", "model.obj_und_connector.", "llm2obj.")
        not_loaded = [
            k for k in missing if "_block_ar" not in k and not k.startswith(fresh_prefixes) and k != "lm_head.weight"
        ]
        if not_loaded:
            raise ValueError(f"These CG-MLLM weights were not found in the Qwen3-VL checkpoint: {not_loaded[:10]}")
        if "lm_head.weight" in missing:
            model.lm_head.weight.data.copy_(model.get_input_embeddings().weight.data)
        model.init_block_ar_from_token_ar()
        with torch.no_grad():
            model.llm2obj.weight.zero_()
            model.llm2obj.bias.zero_()
        needed = max(config.obj_start_token_id, config.obj_end_token_id, config.obj_pad_token_id) + 1
        if tokenizer is not None:
            needed = max(needed, len(tokenizer))
        if needed > config.text_config.vocab_size:
            model.resize_token_embeddings(needed)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model


__all__ = [
    "cgmllm_loss",
    "CGMLLMUnderstandingConnector",
    "CGMLLMForConditionalGeneration",
    "CGMLLMModel",
    "CGMLLMPreTrainedModel",
    "CGMLLMTextModel",
    "CGMLLMTimestepEmbedder",
]
