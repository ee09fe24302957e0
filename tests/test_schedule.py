"""Noise schedules against closed-form values from their papers, at points chosen so the value can be
worked out by hand (never against schedule.py itself), in float64 and float32.

sqrt (Diffusion-LM, Difformer): alpha_bar(t) = 1 - sqrt(t + 1e-4).
cosine (Nichol & Dhariwal): alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008;
    with s = 0.008, (t + s) / (1 + s) = 1/2, 1/3, 2/3 at t = 0.496, 0.328, 0.664 and f(0) = cos^2(pi / 252).
vp-linear (DINOISER): alpha = sqrt(1 - t^2), sigma = t.
alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar); alpha_bar is clamped to [1e-6, 1 - 1e-6].
"""
import math

import pytest
import torch

from fastdiss.schedule import alpha_bar, alpha_sigma, time_grid

F0 = math.cos(math.pi / 252) ** 2

# (schedule, t, alpha_bar, alpha, sigma), worked out by hand from the formulas above
POINTS = [
    ("sqrt", 0.0, 0.99, 0.99498743710661995, 0.1),                       # sqrt(1e-4) = 0.01
    ("sqrt", 0.0899, 0.7, 0.83666002653407555, 0.54772255750516611),      # sqrt(0.09) = 0.3
    ("sqrt", 0.2499, 0.5, 0.5 ** 0.5, 0.5 ** 0.5),                        # sqrt(0.25) = 0.5
    ("sqrt", 0.6399, 0.2, 0.44721359549995794, 0.89442719099991588),      # sqrt(0.64) = 0.8
    ("sqrt", 1.0, 1e-6, 1e-3, (1 - 1e-6) ** 0.5),                         # 1 - sqrt(1.0001) < 0: clamped
    ("cosine", 0.496, 0.5 / F0, (0.5 / F0) ** 0.5, (1 - 0.5 / F0) ** 0.5),
    ("cosine", 0.328, 0.75 / F0, (0.75 / F0) ** 0.5, (1 - 0.75 / F0) ** 0.5),
    ("cosine", 0.664, 0.25 / F0, (0.25 / F0) ** 0.5, (1 - 0.25 / F0) ** 0.5),
    ("cosine", 0.0, 1 - 1e-6, (1 - 1e-6) ** 0.5, 1e-3),                   # f(0)/f(0) = 1: clamped
    ("cosine", 1.0, 1e-6, 1e-3, (1 - 1e-6) ** 0.5),                       # cos(pi/2) = 0: clamped
    ("vp-linear", 0.28, 1 - 0.28 ** 2, 0.96, 0.28),
    ("vp-linear", 0.6, 1 - 0.36, 0.8, 0.6),
    ("vp-linear", 0.8, 1 - 0.64, 0.6, 0.8),
    ("vp-linear", 0.0, 1 - 1e-6, (1 - 1e-6) ** 0.5, 1e-3),                # clamped
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("schedule", ["sqrt", "cosine", "vp-linear"])
def test_closed_form_values(schedule, dtype):
    pts = [p for p in POINTS if p[0] == schedule]
    t = torch.tensor([p[1] for p in pts], dtype=torch.float64).to(dtype)
    want_ab, want_a, want_s = (torch.tensor([p[i] for p in pts], dtype=torch.float64) for i in (2, 3, 4))
    ab = alpha_bar(t, schedule)
    a, s = alpha_sigma(t, schedule)
    assert ab.dtype == a.dtype == s.dtype == dtype
    eps = torch.finfo(dtype).eps
    for name, got, want in (("alpha_bar", ab, want_ab), ("alpha", a, want_a), ("sigma", s, want_s)):
        # a few ulps; sqrt near 0 magnifies the rounding of its argument by 1 / (2 * value)
        tol = 4 * eps * (1 + (1 / want if name != "alpha_bar" else 0))
        err = (got.double() - want).abs()
        assert (err <= tol).all(), f"{schedule} {name}: got {got.tolist()}, want {want.tolist()}"


def test_per_token_shapes_broadcast_elementwise():
    """(B, L) per-token levels give the same values as the flat points, in the same shape."""
    t = torch.tensor([[0.6, 0.28], [0.8, 0.0]], dtype=torch.float64)
    a, s = alpha_sigma(t, "vp-linear")
    assert a.shape == s.shape == (2, 2)
    torch.testing.assert_close(a, torch.tensor([[0.8, 0.96], [0.6, (1 - 1e-6) ** 0.5]], dtype=torch.float64))
    torch.testing.assert_close(s, torch.tensor([[0.6, 0.28], [0.8, 1e-3]], dtype=torch.float64))


def test_time_grids_closed_form():
    """K = 4: uniform 1 - k/4, quadratic (1 - k/4)^2, sqrt sqrt(1 - k/4), from t = 1 down to 0."""
    torch.testing.assert_close(time_grid(4, dtype=torch.float64),
                               torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(time_grid(4, "quadratic", dtype=torch.float64),
                               torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0], dtype=torch.float64))
    torch.testing.assert_close(time_grid(4, "sqrt", dtype=torch.float64),
                               torch.tensor([1.0, 0.75 ** 0.5, 0.5 ** 0.5, 0.5, 0.0], dtype=torch.float64))
