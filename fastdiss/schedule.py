"""Noise schedules (alpha(t), sigma(t): fastdiss.kernels.schedule, which the noising kernels compute
in-kernel) and the sampler's time grid."""
from __future__ import annotations

import torch

from fastdiss.kernels.schedule import (COSINE_S, MAX_ALPHA_BAR, MIN_ALPHA_BAR, SCHEDULES, SQRT_SHIFT,  # noqa: F401
                                       alpha_bar, alpha_sigma, check_schedule)


def time_grid(steps: int, spacing: str = "uniform", device=None, dtype=torch.float32) -> torch.Tensor:
    """Decreasing grid t_0 = 1 > t_1 > ... > t_K = 0 with K = steps (K + 1 points).

    `uniform`: t_k = 1 - k/K.  `quadratic`: t_k = (1 - k/K)^2, denser near t = 0 (fine detail);
    `sqrt`: t_k = sqrt(1 - k/K), denser near t = 1 (the high-noise steps).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    u = 1.0 - torch.arange(steps + 1, device=device, dtype=torch.float64) / steps
    if spacing == "uniform":
        g = u
    elif spacing == "quadratic":
        g = u * u
    elif spacing == "sqrt":
        g = u.sqrt()
    else:
        raise ValueError(f"unknown time spacing {spacing!r}; expected 'uniform', 'quadratic' or 'sqrt'")
    return g.to(dtype)
