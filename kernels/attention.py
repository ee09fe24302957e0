"""Flash attention (forward + backward) with key padding masks, self- and cross-attention.

STUB: reference only; the Triton kernels and op registration are being written.
"""
from __future__ import annotations

import math

import torch


def attention_reference(q, k, v, key_padding_mask=None, is_causal=False, scale=None):
    """softmax(q k^T * scale + mask) v in the inputs' dtype (math in fp32); fully padded rows give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    Lq, Lk = q.shape[-2], k.shape[-2]
    keep = torch.ones(s.shape[0], 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    if is_causal:
        keep = keep & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.matmul(p, v.float()).to(q.dtype)


def attention(q, k, v, key_padding_mask=None, is_causal=False, scale=None):
    return attention_reference(q, k, v, key_padding_mask, is_causal, scale)
