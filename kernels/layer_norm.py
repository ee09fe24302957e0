"""Fused (residual add +) LayerNorm. STUB: reference only; Triton kernel being written."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_reference(x, weight, bias, eps=1e-5, residual=None):
    if residual is not None:
        h = x + residual
        return F.layer_norm(h, h.shape[-1:], weight, bias, eps), h
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    return layer_norm_reference(x, weight, bias, eps, residual)
