"""Forward-process noising with per-sequence or per-token noise levels, and the fused
embedding gather + norm + noising of the training path. STUB: reference only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiss.schedule import alpha_sigma


def _expand_t(t, z0):
    if t.dim() == 1:          # per sequence (B,)
        t = t[:, None]
    return t[..., None].to(torch.float32)  # (B, L, 1)


def q_sample_reference(z0, t, eps, schedule="sqrt", noise_factor=1.0):
    a, s = alpha_sigma(_expand_t(t, z0), schedule)
    return (a * z0.float() + s * noise_factor * eps.float()).to(z0.dtype)


def embed_and_noise_reference(tokens, weight, t, eps, ln_weight=None, ln_bias=None,
                              schedule="sqrt", noise_factor=1.0, ln_eps=1e-5):
    """Returns (z0, x_t): z0 = LayerNorm(weight[tokens]), x_t = q_sample(z0, t, eps)."""
    z0 = F.layer_norm(weight[tokens], weight.shape[-1:], ln_weight, ln_bias, ln_eps)
    return z0, q_sample_reference(z0, t, eps, schedule, noise_factor)


def q_sample(z0, t, eps, schedule="sqrt", noise_factor=1.0):
    return q_sample_reference(z0, t, eps, schedule, noise_factor)


def embed_and_noise(tokens, weight, t, eps, ln_weight=None, ln_bias=None, schedule="sqrt",
                    noise_factor=1.0, ln_eps=1e-5):
    return embed_and_noise_reference(tokens, weight, t, eps, ln_weight, ln_bias, schedule, noise_factor, ln_eps)
