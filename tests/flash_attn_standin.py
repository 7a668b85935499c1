"""A STAND-IN for flash-attn 2's kernels, for CPU tests only.

flash-attn cannot run here (no CUDA GPU, no CUDA wheel), so the tests of CG-MLLM's flash-attention path replace the
two kernels transformers calls with these plain-SDPA versions of their documented semantics:

* `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ..., causal)`:
  `q` `(total_q, heads, head_dim)`, `k` / `v` `(total_k, kv_heads, head_dim)`; sequence `i` is rows
  `cu_seqlens[i]:cu_seqlens[i + 1]` of each, attends only within itself; `kv_heads` divides `heads` (GQA);
  `causal=True` aligns the causal mask to the bottom-right corner when a sequence has fewer queries than keys
  (flash-attn >= 2.1), i.e. query `i` sees keys `0 .. i + (len_k - len_q)`.
* `flash_attn_func(q, k, v, ..., causal)`: the same on `(batch, seq_len, heads, head_dim)` tensors, one sequence
  per row.

Nothing here is fast or fused; what it checks is the bookkeeping around the kernel (which forwards take the flash
path, the causal flag, unpadding into the varlen layout, `cu_seqlens`, padding back). The kernel itself still has
to be compared on a GPU (`benchmarks/gpu_checks.sh`).
"""

import torch
import torch.nn.functional as F


CALLS = {"varlen": 0, "dense": 0}


def _attend(q, k, v, softmax_scale, causal):
    """`q` `(len_q, heads, d)`, `k` / `v` `(len_k, kv_heads, d)` -> `(len_q, heads, d)`."""
    len_q, len_k = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = None
    if causal:
        offset = len_k - len_q
        mask = torch.arange(len_k)[None, :] <= torch.arange(len_q)[:, None] + offset
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=softmax_scale
    )
    return out.transpose(0, 1)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    CALLS["varlen"] += 1
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32, "flash-attn takes int32 cu_seqlens"
    assert len(cu_seqlens_q) == len(cu_seqlens_k)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert bounds_q[-1] == q.shape[0] and bounds_k[-1] == k.shape[0]
    assert max(b - a for a, b in zip(bounds_q, bounds_q[1:])) <= int(max_seqlen_q)
    assert max(b - a for a, b in zip(bounds_k, bounds_k[1:])) <= int(max_seqlen_k)
    out = torch.zeros_like(q)
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        if q1 > q0:
            out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale, causal)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    CALLS["dense"] += 1
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])
