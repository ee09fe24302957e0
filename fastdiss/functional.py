"""Public functional API. Each op validates its inputs, then runs the fused kernel
(Triton on CUDA, see fastdiss.set_backend) or its PyTorch reference."""
from __future__ import annotations

import torch

from fastdiss import _ext
from fastdiss.kernels import attention as _attention
from fastdiss.kernels import layer_norm as _layer_norm
from fastdiss.kernels import noising as _noising
from fastdiss.kernels import rounding_ce as _rounding_ce
from fastdiss.kernels import self_cond_proj as _self_cond_proj

__all__ = ["attention", "layer_norm", "q_sample", "embed_and_noise", "self_cond_project",
           "rounding_cross_entropy", "ddim_step"]


def attention(q, k, v, key_padding_mask=None, is_causal=False, scale=None):
    """Scaled dot-product attention. q (B, H, Lq, D); k, v (B, H, Lk, D); key_padding_mask bool
    (B, Lk) with True = padding. Rows whose keys are all padding return zeros."""
    return _attention.attention(q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dim; with `residual` returns (layer_norm(x + residual), x + residual)."""
    return _layer_norm.layer_norm(x, weight, bias, eps=eps, residual=residual)


def q_sample(z0, t, eps, schedule="sqrt", noise_factor=1.0):
    """x_t = alpha(t) z0 + sigma(t) * noise_factor * eps; t per sequence (B,) or per token (B, L)."""
    return _noising.q_sample(z0, t, eps, schedule=schedule, noise_factor=noise_factor)


def embed_and_noise(tokens, weight, t, eps, ln_weight=None, ln_bias=None, schedule="sqrt",
                    noise_factor=1.0, ln_eps=1e-5):
    """(z0, x_t) with z0 = LayerNorm(weight[tokens]) and x_t = q_sample(z0, t, eps)."""
    return _noising.embed_and_noise(tokens, weight, t, eps, ln_weight=ln_weight, ln_bias=ln_bias,
                                    schedule=schedule, noise_factor=noise_factor, ln_eps=ln_eps)


def self_cond_project(x_t, sc, weight, bias=None, add=None):
    """F.linear(cat([x_t, sc], -1), weight, bias) (+ add) without materialising the concatenation."""
    return _self_cond_proj.self_cond_project(x_t, sc, weight, bias=bias, add=add)


def rounding_cross_entropy(x0_hat, embedding, targets, ignore_index=-100, reduction="mean", chunk_size=None):
    """cross_entropy(x0_hat @ embedding.T, targets) without materialising the (tokens x vocab) logits;
    `chunk_size` bounds the vocabulary columns held at once (None: chosen from the sizes)."""
    return _rounding_ce.rounding_cross_entropy(x0_hat, embedding, targets, ignore_index=ignore_index,
                                               reduction=reduction, chunk_size=chunk_size)


def ddim_step_reference(x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s):
    """DDIM update from time t to s < t (docs/method.md section 1); alpha/sigma per token (B, L)."""
    a_t, s_t, a_s, s_s = (v.unsqueeze(-1).to(x_t.dtype) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
    eps_hat = (x_t - a_t * x0_hat) / s_t
    return a_s * x0_hat + s_s * eps_hat


def ddim_step(x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s):
    """DDIM update x_s = alpha_s x0_hat + sigma_s (x_t - alpha_t x0_hat) / sigma_t, per token.
    Uses the C++/CUDA op torch.ops.fastdiss.ddim_step when the extension is built for x_t's device."""
    if _ext.supports(x_t.device):
        return torch.ops.fastdiss.ddim_step(x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s)
    return ddim_step_reference(x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s)
