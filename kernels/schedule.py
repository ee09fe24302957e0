"""Continuous-time noise schedules: alpha(t), sigma(t) for t in [0, 1], per sequence or per token.

x_t = alpha(t) * z0 + sigma(t) * F * eps, with F the noise factor (docs/method.md, section 1).
All functions accept any tensor shape for t and broadcast elementwise, so per-token levels
(B, L) work the same as per-sequence levels (B,).

The formulas live in the kernel package because the noising kernels compute them in-kernel from
these constants; fastdiss.schedule re-exports them next to the sampler's time grid.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("sqrt", "cosine", "vp-linear")
SQRT_SHIFT = 1e-4          # Diffusion-LM / Difformer: alpha_bar = 1 - sqrt(t + s)
COSINE_S = 0.008           # Nichol & Dhariwal offset
MIN_ALPHA_BAR = 1e-6       # keeps alpha, sigma finite and sigma > 0 at the ends
MAX_ALPHA_BAR = 1.0 - 1e-6


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES}")
    return name


def alpha_bar(t: torch.Tensor, schedule: str = "sqrt") -> torch.Tensor:
    """Signal fraction alpha(t)^2, clamped to (0, 1)."""
    check_schedule(schedule)
    t = t.clamp(0.0, 1.0)
    if schedule == "sqrt":
        ab = 1.0 - torch.sqrt(t + SQRT_SHIFT)
    elif schedule == "cosine":
        f0 = math.cos(COSINE_S / (1 + COSINE_S) * math.pi / 2) ** 2
        ab = torch.cos((t + COSINE_S) / (1 + COSINE_S) * (math.pi / 2)) ** 2 / f0
    else:  # vp-linear (DINOISER): alpha = sqrt(1 - t^2), sigma = t
        ab = 1.0 - t * t
    return ab.clamp(MIN_ALPHA_BAR, MAX_ALPHA_BAR)


def alpha_sigma(t: torch.Tensor, schedule: str = "sqrt") -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha(t), sigma(t)) with alpha^2 + sigma^2 = 1, elementwise over t."""
    ab = alpha_bar(t, schedule)
    return ab.sqrt(), (1.0 - ab).sqrt()
