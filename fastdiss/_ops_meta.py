"""Fake (meta) implementations of the C++ ops in csrc/ops.cpp, so torch.compile, torch.export and
FakeTensor tracing know their output shapes without running a kernel.

Imported by fastdiss._ext right after fastdiss._C loads (the ops must be defined first). The checks
mirror csrc/checks.h, so tracing rejects the inputs the kernels would reject, with the same errors.
"""
from __future__ import annotations

import torch

_LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_step_inputs(op, x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s):
    torch._check_value(x_t.dim() == 3, lambda: f"{op}: x_t must be a 3-D tensor (B, L, D); got shape {list(x_t.shape)}")
    torch._check_type(x_t.dtype in _LATENT_DTYPES,
                      lambda: f"{op}: x_t must be float32, float16 or bfloat16; got {x_t.dtype}")
    torch._check_value(x0_hat.shape == x_t.shape,
                       lambda: f"{op}: x0_hat must have the shape of x_t {list(x_t.shape)}; got {list(x0_hat.shape)}")
    torch._check_type(x0_hat.dtype == x_t.dtype,
                      lambda: f"{op}: x0_hat must have the dtype of x_t ({x_t.dtype}); got {x0_hat.dtype}")
    for name, c in (("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_s", alpha_s), ("sigma_s", sigma_s)):
        torch._check_value(c.dim() == 2 and c.shape == x_t.shape[:2],
                           lambda: f"{op}: {name} must have shape (B, L) = {list(x_t.shape[:2])} (one value per "
                                   f"token of x_t {list(x_t.shape)}); got {list(c.shape)}")
        torch._check_type(c.dtype == torch.float32, lambda: f"{op}: {name} must be float32; got {c.dtype}")


@torch.library.register_fake("fastdiss::ddim_step")
def _ddim_step_fake(x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s):
    _check_step_inputs("fastdiss::ddim_step", x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s)
    return x_t.new_empty(x_t.shape)  # the kernels return contiguous tensors


@torch.library.register_fake("fastdiss::ddim_step_clamp")
def _ddim_step_clamp_fake(x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s, embedding_normed, clamp):
    op = "fastdiss::ddim_step_clamp"
    _check_step_inputs(op, x0_hat, x_t, alpha_t, sigma_t, alpha_s, sigma_s)
    torch._check_value(embedding_normed.dim() == 2 and embedding_normed.shape[1] == x_t.shape[2],
                       lambda: f"{op}: embedding_normed must have shape (V, D) with D = {x_t.shape[2]}; "
                               f"got {list(embedding_normed.shape)}")
    torch._check_type(embedding_normed.dtype == x_t.dtype,
                      lambda: f"{op}: embedding_normed must have the dtype of x_t ({x_t.dtype}); "
                              f"got {embedding_normed.dtype}")
    return x_t.new_empty(x_t.shape), x_t.new_empty(x_t.shape)
