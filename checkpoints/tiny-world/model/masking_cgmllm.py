"""The CG-MLLM hybrid attention mask.

One rule covers training (packed batches), prefill and KV-cached denoising:

* sequential tokens (text, image) are causal;
* the tokens of one 3D block (its latent rows plus the `<|obj_start|>` / `<|obj_end|>` markers it owns) attend to
  each other bidirectionally;
* a *noisy* block (a generation target, t > 0) is invisible to every token outside it, so noise never leaks into
  context; a *clean* block (t = 0, 3D understanding or an already generated block) is ordinary context;
* tokens of different packed samples never attend to each other, and padding is never attended to.

Packed samples are told apart by `packed_sample_ids`, or, in the padding-free layout of transformers'
`DataCollatorWithFlattening` (one row, no attention mask, text position ids restarting for every sample), by where
the position ids restart ([`packed_sample_ids_from_position_ids`]).

Each query row may always attend to itself, which keeps fully padded rows finite (no NaN in the KV cache of a
batched prefill where one row is empty, e.g. the unconditional CFG branch).

The rule is written once as a `mask_function(batch_idx, head_idx, q_idx, kv_idx)` and turned into the format of
the attention kernel by transformers' own mask interfaces: a boolean tensor for `sdpa`, an additive float
tensor for `eager`, a `BlockMask` for `flex_attention`.
"""

from collections.abc import Callable

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask, find_packed_sequence_indices


SUPPORTED_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def check_attention_implementation(attn_implementation: str | None) -> None:
    """Raise a `ValueError` for attention kernels that cannot express the hybrid mask."""
    if attn_implementation not in SUPPORTED_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"CG-MLLM needs an attention implementation that accepts an arbitrary mask; got "
            f"attn_implementation={attn_implementation!r}. Expected one of {SUPPORTED_ATTENTION_IMPLEMENTATIONS} "
            "(flash-attention kernels cannot express bidirectional 3D blocks inside a causal sequence)."
        )


def hybrid_mask_function(
    keep: torch.BoolTensor,
    block_ids: torch.LongTensor,
    noisy: torch.BoolTensor,
    sample_ids: torch.LongTensor,
) -> Callable:
    """Build the mask function over absolute positions.

    Args:
        keep: `(batch, kv_len)` False for padding.
        block_ids: `(batch, kv_len)` 3D block id per token (unique within a row), -1 for sequential tokens.
        noisy: `(batch, kv_len)` True for tokens of noisy (generation-target) blocks.
        sample_ids: `(batch, kv_len)` packed-sample id per token.
    """

    def mask_function(batch_idx, head_idx, q_idx, kv_idx):
        q_block = block_ids[batch_idx, q_idx]
        kv_block = block_ids[batch_idx, kv_idx]
        same_block = (q_block == kv_block) & (q_block >= 0)
        causal = kv_idx <= q_idx
        visible = ~noisy[batch_idx, kv_idx] | same_block
        same_sample = sample_ids[batch_idx, q_idx] == sample_ids[batch_idx, kv_idx]
        allowed = (causal | same_block) & visible & same_sample & keep[batch_idx, kv_idx]
        return allowed | (q_idx == kv_idx)

    return mask_function


def packed_sample_ids_from_position_ids(
    text_position_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    past_length: int,
) -> torch.LongTensor | None:
    """Packed-sample ids of a padding-free batch, read from its text position ids.

    A new sample starts wherever the position ids do not advance by one (transformers' own rule,
    `find_packed_sequence_indices`; this is the layout `DataCollatorWithFlattening` produces). Only a fresh forward
    (no cached tokens) without padding can be packed this way: with a KV cache or a padding mask the position ids
    continue a sequence or skip padding, and carry no sample boundaries.

    Args:
        text_position_ids: `(batch, seq_len)` (or `(1, seq_len)`) text position ids, or None.
        attention_mask: `(batch, seq_len)` 2D padding mask, or None.
        past_length: number of cached tokens in front of the queries.

    Returns:
        `(batch, seq_len)` sample ids (0, 1, ... within each row), or None when every row holds a single sample.
    """
    if text_position_ids is None or past_length > 0:
        return None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        return None
    return find_packed_sequence_indices(text_position_ids)


def _queries_are_one_block(shape_block_ids: torch.LongTensor, query_keep: torch.BoolTensor) -> bool:
    """True when every query of every row belongs to the same 3D block and none is padding.

    Then the hybrid rule reduces to the padding mask: a block sees all earlier (cached) context and itself
    bidirectionally, and nothing in the cache is noisy (only clean blocks are ever written into a cache).
    """
    first = shape_block_ids[:, :1]
    return bool(((shape_block_ids == first) & (first >= 0)).all()) and bool(query_keep.all())


def _pad_past(tensor: torch.Tensor, past_length: int, fill_value) -> torch.Tensor:
    """Left-extend a `(batch, q_len)` tensor with `past_length` columns of `fill_value` (the cached tokens)."""
    if past_length == 0:
        return tensor
    past = tensor.new_full((tensor.shape[0], past_length), fill_value)
    return torch.cat([past, tensor], dim=1)


def _pad_future(tensor: torch.Tensor, length: int, fill_value) -> torch.Tensor:
    """Right-extend a `(batch, kv_len)` tensor with `length` columns of `fill_value` (unused cache slots)."""
    if length == 0:
        return tensor
    return torch.cat([tensor, tensor.new_full((tensor.shape[0], length), fill_value)], dim=1)


def create_hybrid_attention_mask(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_length: int,
    shape_block_ids: torch.LongTensor,
    noisy_shape_mask: torch.BoolTensor,
    packed_sample_ids: torch.LongTensor | None = None,
    cache=None,
):
    """Return the attention mask in the format of `config._attn_implementation`.

    Args:
        config: the text config (its `_attn_implementation` selects the format).
        inputs_embeds: `(batch, q_len, hidden)`; only its shape / dtype / device are used.
        attention_mask: `(batch, past_length + q_len)` 2D padding mask (1 = real token) or None.
        past_length: number of cached tokens in front of the queries.
        shape_block_ids: `(batch, q_len)` block id per query token, -1 for sequential tokens.
        noisy_shape_mask: `(batch, q_len)` True for tokens of noisy blocks.
        packed_sample_ids: `(batch, q_len)` packed-sample ids, or None for one sample per row.
        cache: the KV cache. A cache that returns more key columns than `past_length + q_len` (a `StaticCache`
            returns its whole preallocated length) gets those extra columns masked out.

    Returns None (no mask: every query attends to every key, which lets sdpa pick its flash kernel) when the queries
    are one block over an unpadded context, e.g. a denoising step on an unpadded prompt.
    """
    implementation = config._attn_implementation
    check_attention_implementation(implementation)
    batch_size, q_length = inputs_embeds.shape[:2]
    kv_length = past_length + q_length
    device = inputs_embeds.device

    has_blocks = bool((shape_block_ids >= 0).any())
    has_padding = attention_mask is not None and not bool(attention_mask.bool().all())
    if not has_blocks and not has_padding and packed_sample_ids is None:
        # Plain causal attention: exactly what Qwen3-VL does (lets sdpa use `is_causal`).
        return create_causal_mask(
            config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache
        )
    if packed_sample_ids is not None and past_length > 0:
        raise ValueError("Packed sequences (`packed_sample_ids`) cannot be combined with a KV cache.")

    if attention_mask is None:
        keep = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:
        if attention_mask.shape != (batch_size, kv_length):
            raise ValueError(
                f"`attention_mask` must have shape (batch, cached + new tokens) = {(batch_size, kv_length)}, "
                f"got {tuple(attention_mask.shape)}."
            )
        keep = attention_mask.to(device=device).bool()
    # Key columns the cache will hand to the kernel beyond the real ones (a StaticCache's unused slots).
    unused_columns = 0
    if cache is not None:
        unused_columns = max(int(cache.get_mask_sizes(q_length, 0)[0]) - kv_length, 0)
    if (
        packed_sample_ids is None
        and unused_columns == 0
        and implementation in ("sdpa", "eager")
        and _queries_are_one_block(shape_block_ids, keep[:, past_length:])
        and bool(keep.all())
    ):
        # The queries are one block and see every key: no mask at all.
        return None
    keep = _pad_future(keep, unused_columns, False)
    if packed_sample_ids is None and implementation in ("sdpa", "eager") and _queries_are_one_block(
        shape_block_ids, keep[:, past_length : past_length + q_length]
    ):
        # A denoising step (or a clean block written after the cached prompt): every query sees every kept key, so
        # the mask is the padding mask broadcast over the queries, `(batch, 1, 1, kv_len)`: O(kv_len) to build
        # instead of O(q_len * kv_len), and the kernel converts a tiny boolean mask instead of a full one per layer.
        if implementation == "sdpa":
            return keep[:, None, None, :]
        return torch.zeros(keep.shape, dtype=inputs_embeds.dtype, device=device).masked_fill(
            ~keep, torch.finfo(inputs_embeds.dtype).min
        )[:, None, None, :]
    block_ids = _pad_future(_pad_past(shape_block_ids.to(device), past_length, -1), unused_columns, -1)
    noisy = _pad_future(_pad_past(noisy_shape_mask.to(device).bool(), past_length, False), unused_columns, False)
    kv_length += unused_columns
    if packed_sample_ids is None:
        sample_ids = torch.zeros(batch_size, kv_length, dtype=torch.long, device=device)
    else:
        sample_ids = packed_sample_ids.to(device)

    mask_function = hybrid_mask_function(keep, block_ids, noisy, sample_ids)
    mask_interface = ALL_MASK_ATTENTION_FUNCTIONS[implementation]
    return mask_interface(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=past_length,
        kv_offset=0,
        mask_function=mask_function,
        attention_mask=None,
        allow_is_causal_skip=False,
        dtype=inputs_embeds.dtype,
        config=config,
        use_vmap=False,
        device=device,
    )


__all__ = [
    "SUPPORTED_ATTENTION_IMPLEMENTATIONS",
    "check_attention_implementation",
    "create_hybrid_attention_mask",
    "hybrid_mask_function",
    "packed_sample_ids_from_position_ids",
]
