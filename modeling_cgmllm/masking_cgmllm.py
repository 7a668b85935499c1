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

flash-attn 2 takes no mask at all, only a causal flag and per-sequence boundaries (the varlen layout). It runs the
forwards whose rule reduces to that ([`prepare_attention`]):

* causal attention: a prefill or decoding step without 3D blocks among the queries (text, images), padded or not,
  or a padding-free packed row of such samples (`cu_seqlens` from the packed-sample ids);
* one 3D block over its context: every query belongs to the same block (a denoising step, or a clean block written
  after the cached prompt), so each query sees every real key, non-causally; padding is unpadded away.

Every other forward needs the hybrid mask and falls back, per forward: to `flex_attention` (a sparse `BlockMask`)
for padding-free packed rows, to `sdpa` with the dense boolean mask otherwise (e.g. a training batch with a noisy
block after its caption, or a captioning prompt holding a clean block).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask, find_packed_sequence_indices
from transformers.utils import is_flash_attn_2_available, is_tracing
from transformers.utils.generic import is_flash_attention_requested


# Kernels that take the hybrid mask itself.
MASKED_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
SUPPORTED_ATTENTION_IMPLEMENTATIONS = MASKED_ATTENTION_IMPLEMENTATIONS + ("flash_attention_2",)


def is_flash_attention_2(attn_implementation: str | None) -> bool:
    """True for flash-attn 2 under any name transformers gives it (`flash_attention_2`, or the Hub kernel
    `kernels-community/flash-attn2` it substitutes when the `kernels` package is installed instead of flash-attn)."""
    return attn_implementation is not None and is_flash_attention_requested(
        requested_attention_implementation=attn_implementation, version=2
    )


def check_attention_implementation(attn_implementation: str | None) -> None:
    """Raise a `ValueError` for attention kernels CG-MLLM cannot run, an `ImportError` for flash-attn 2 without the
    flash-attn package (or a device it runs on)."""
    if is_flash_attention_2(attn_implementation):
        if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
            raise ImportError(
                "attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA GPU, and "
                "flash-attn is not usable here (not installed, or no CUDA device). Install the `gpu` extra "
                "(`pip install 'cg-mllm[gpu]'`, flash-attn>=2.6) on a machine with a CUDA GPU, or use "
                "attn_implementation='sdpa' (the default) or 'flex_attention'."
            )
        return
    if attn_implementation not in MASKED_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"CG-MLLM cannot run attn_implementation={attn_implementation!r}. Expected one of "
            f"{SUPPORTED_ATTENTION_IMPLEMENTATIONS}: kernels that accept an arbitrary mask (bidirectional 3D blocks "
            "inside a causal sequence), or flash-attn 2 for the forwards that need no general mask (the others fall "
            "back to flex / sdpa, see `prepare_attention`)."
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


def _check_attention_mask_shape(attention_mask: torch.Tensor | None, batch_size: int, kv_length: int) -> None:
    """Raises `ValueError` unless the 2D padding mask is None or `(batch, past_length + q_len)`."""
    if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, kv_length):
        raise ValueError(
            f"`attention_mask` must have shape (batch, cached + new tokens) = {(batch_size, kv_length)}, "
            f"got {tuple(attention_mask.shape)}."
        )


def create_hybrid_attention_mask(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_length: int,
    shape_block_ids: torch.LongTensor,
    noisy_shape_mask: torch.BoolTensor,
    packed_sample_ids: torch.LongTensor | None = None,
    cache=None,
    implementation: str | None = None,
):
    """Return the attention mask in the format of `implementation` (default: `config._attn_implementation`), one of
    the kernels that take a mask (sdpa, eager, flex_attention).

    Args:
        config: the text config (its `_attn_implementation` selects the format unless `implementation` is given).
        inputs_embeds: `(batch, q_len, hidden)`; only its shape / dtype / device are used.
        attention_mask: `(batch, past_length + q_len)` 2D padding mask (1 = real token) or None.
        past_length: number of cached tokens in front of the queries.
        shape_block_ids: `(batch, q_len)` block id per query token, -1 for sequential tokens.
        noisy_shape_mask: `(batch, q_len)` True for tokens of noisy blocks.
        packed_sample_ids: `(batch, q_len)` packed-sample ids, or None for one sample per row.
        cache: the KV cache. A cache that returns more key columns than `past_length + q_len` (a `StaticCache`
            returns its whole preallocated length) gets those extra columns masked out.
        implementation: the kernel the mask is for (a flash-attn model's fallback passes "sdpa" / "flex_attention").

    Returns None (no mask: every query attends to every key, which lets sdpa pick its flash kernel) when the queries
    are one block over an unpadded context, e.g. a denoising step on an unpadded prompt.
    """
    implementation = implementation or config._attn_implementation
    if implementation not in MASKED_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"A hybrid attention mask is built for {MASKED_ATTENTION_IMPLEMENTATIONS}, not {implementation!r} "
            "(flash-attn 2 takes no mask: use `prepare_attention`)."
        )
    batch_size, q_length = inputs_embeds.shape[:2]
    kv_length = past_length + q_length
    device = inputs_embeds.device
    _check_attention_mask_shape(attention_mask, batch_size, kv_length)  # before the plain-causal shortcut takes it

    # The shortcuts below read the inputs' layout on the host (one sync each). Traced (torch.compile, export, CUDA
    # graph capture), the forward builds the general mask instead: the same rule, no host read, no graph break.
    shortcuts = not is_tracing(inputs_embeds)
    if shortcuts:
        has_blocks = bool((shape_block_ids >= 0).any())
        has_padding = attention_mask is not None and not bool(attention_mask.bool().all())
        plain_causal = not has_blocks and not has_padding and packed_sample_ids is None
        if plain_causal and implementation == config._attn_implementation:
            # Plain causal attention: exactly what Qwen3-VL does (lets sdpa use `is_causal`).
            return create_causal_mask(
                config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache
            )
    if packed_sample_ids is not None and past_length > 0:
        raise ValueError("Packed sequences (`packed_sample_ids`) cannot be combined with a KV cache.")

    if attention_mask is None:
        keep = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:
        keep = attention_mask.to(device=device).bool()
    # Key columns the cache will hand to the kernel beyond the real ones (a StaticCache's unused slots).
    unused_columns = 0
    if cache is not None:
        unused_columns = max(int(cache.get_mask_sizes(q_length, 0)[0]) - kv_length, 0)
    if (
        shortcuts
        and packed_sample_ids is None
        and implementation in ("sdpa", "eager")
        and _queries_are_one_block(shape_block_ids, keep[:, past_length:])
    ):
        if unused_columns == 0 and bool(keep.all()):
            # The queries are one block and see every key: no mask at all.
            return None
        # A denoising step (or a clean block written after the cached prompt): every query sees every kept key, so
        # the mask is the padding mask broadcast over the queries, `(batch, 1, 1, kv_len)`: O(kv_len) to build
        # instead of O(q_len * kv_len), and the kernel converts a tiny boolean mask instead of a full one per layer.
        keep = _pad_future(keep, unused_columns, False)
        if implementation == "sdpa":
            return keep[:, None, None, :]
        return torch.zeros(keep.shape, dtype=inputs_embeds.dtype, device=device).masked_fill(
            ~keep, torch.finfo(inputs_embeds.dtype).min
        )[:, None, None, :]
    keep = _pad_future(keep, unused_columns, False)
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


@dataclass
class AttentionSetup:
    """How one forward's attention runs: the kernel, its mask and its extra keyword arguments.

    Args:
        implementation: the attention kernel of this forward (a key of transformers' `ALL_ATTENTION_FUNCTIONS`).
        mask: in that kernel's format: a 4D boolean / float tensor, a `BlockMask`, a `(batch, kv_len)` padding mask
            (flash-attn 2: the keys to keep; it unpads them into its varlen layout), or None.
        kwargs: for the kernel: `is_causal`, and for flash-attn 2 on packed rows `cu_seq_lens_q` / `cu_seq_lens_k`
            `(num_samples + 1,)` int32 and `max_length_q` / `max_length_k` (transformers' varlen arguments).
    """

    implementation: str
    mask: Any = None
    kwargs: dict = field(default_factory=dict)


def packed_cu_seqlens(packed_sample_ids: torch.LongTensor) -> tuple[torch.Tensor, int]:
    """flash-attn's varlen boundaries of padding-free packed rows.

    `(batch, seq_len)` packed-sample ids -> `cu_seqlens` `(num_samples + 1,)` int32, the start of every sample in the
    flattened `batch * seq_len` tokens followed by the total, and the longest sample's length. A sample starts where
    its id differs from the previous token's, and at the start of every row.
    """
    batch_size, seq_len = packed_sample_ids.shape
    starts = torch.ones_like(packed_sample_ids, dtype=torch.bool)
    starts[:, 1:] = packed_sample_ids[:, 1:] != packed_sample_ids[:, :-1]
    start_indices = starts.reshape(-1).nonzero().reshape(-1)
    total = torch.tensor([batch_size * seq_len], device=start_indices.device)
    cu_seqlens = torch.cat([start_indices, total]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def _flash_attention_setup(
    implementation: str,
    batch_size: int,
    q_length: int,
    attention_mask: torch.Tensor | None,
    past_length: int,
    shape_block_ids: torch.LongTensor,
    packed_sample_ids: torch.LongTensor | None,
    cache,
) -> AttentionSetup | None:
    """The flash-attn 2 setup of a forward whose rule needs no general mask, or None when it does (see the module
    docstring)."""
    kv_length = past_length + q_length
    device = shape_block_ids.device
    _check_attention_mask_shape(attention_mask, batch_size, kv_length)  # before a shortcut drops it
    keep = None if attention_mask is None else attention_mask.to(device=device).bool()
    has_padding = keep is not None and not bool(keep.all())
    has_blocks = bool((shape_block_ids >= 0).any())
    if packed_sample_ids is not None:
        if has_blocks or has_padding or past_length > 0:  # (packing after a cache is refused by the fallback)
            return None
        cu_seqlens, max_length = packed_cu_seqlens(packed_sample_ids.to(device))
        kwargs = {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_length,
                  "max_length_k": max_length}
        return AttentionSetup(implementation, None, {"is_causal": True, **kwargs})
    if has_blocks and not _queries_are_one_block(
        shape_block_ids, torch.ones_like(shape_block_ids, dtype=torch.bool) if keep is None else keep[:, past_length:]
    ):
        return None
    # A cache handing the kernel more key columns than real ones (a StaticCache's unused slots) needs the padding mask
    # of the real columns: transformers' flash integration cuts the keys to its length before unpadding.
    unused_columns = 0 if cache is None else max(int(cache.get_mask_sizes(q_length, 0)[0]) - kv_length, 0)
    if keep is None and unused_columns > 0:
        keep = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    elif keep is not None and not has_padding and unused_columns == 0:
        keep = None
    # Causal without 3D queries (bottom-right aligned after a cache, as flash-attn >= 2.1 does); one block sees all.
    return AttentionSetup(implementation, keep, {"is_causal": not has_blocks})


def prepare_attention(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_length: int,
    shape_block_ids: torch.LongTensor,
    noisy_shape_mask: torch.BoolTensor,
    packed_sample_ids: torch.LongTensor | None = None,
    cache=None,
) -> AttentionSetup:
    """The attention kernel, mask and kernel arguments of one forward (arguments as [`create_hybrid_attention_mask`]).

    With a masked kernel (sdpa, eager, flex_attention) the kernel is `config._attn_implementation` and the mask is
    [`create_hybrid_attention_mask`]'s. With flash-attn 2 the forwards that need no general mask run on flash-attn
    (see the module docstring); the others fall back to `flex_attention` for padding-free packed rows (its sparse
    block mask) and to `sdpa` with the dense mask otherwise.
    """
    implementation = config._attn_implementation
    check_attention_implementation(implementation)
    if is_flash_attention_2(implementation):
        setup = _flash_attention_setup(
            implementation, *inputs_embeds.shape[:2], attention_mask, past_length, shape_block_ids,
            packed_sample_ids, cache,
        )
        if setup is not None:
            return setup
        implementation = "flex_attention" if packed_sample_ids is not None else "sdpa"
    mask = create_hybrid_attention_mask(
        config, inputs_embeds, attention_mask, past_length, shape_block_ids, noisy_shape_mask, packed_sample_ids,
        cache=cache, implementation=implementation,
    )
    kwargs = {}
    if mask is None and bool((shape_block_ids >= 0).any()):
        # No mask because the queries form one block that sees everything (a denoising step on an unpadded prompt),
        # not because attention is causal: sdpa must not fall back to `is_causal`.
        kwargs["is_causal"] = False
    return AttentionSetup(implementation, mask, kwargs)


__all__ = [
    "AttentionSetup",
    "MASKED_ATTENTION_IMPLEMENTATIONS",
    "SUPPORTED_ATTENTION_IMPLEMENTATIONS",
    "check_attention_implementation",
    "create_hybrid_attention_mask",
    "hybrid_mask_function",
    "is_flash_attention_2",
    "packed_cu_seqlens",
    "packed_sample_ids_from_position_ids",
    "prepare_attention",
]
