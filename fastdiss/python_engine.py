"""engine="python": the K-step DDIM loop in eager PyTorch, written once.

    x_{t_0} = F eps                                   t_0 = 1 > t_1 > ... > t_K = 0 (schedule.time_grid)
    for k = 1..K:   x_{t_k}, x0_hat = denoise_step(x_{t_{k-1}}, sc, t_{k-1}, t_k)    sc = previous x0_hat

The Sampler's default engine, the CUDA-graph engine's captured body and eager fallback, and the
reference the C++ loop (csrc/sampler) is tested against all run this loop. `step_schedule` gives
the per-step values of a grid, which the C++ loop receives instead of deriving them itself.
"""
from __future__ import annotations

import torch

from fastdiss import functional
from fastdiss.schedule import alpha_sigma


def network_time(t, time_shift: float):
    """Time fed to the network: t + time_shift (1 - t). time_shift = 1 always feeds t = 1
    (DINOISER's condition-enhanced sampling); 0 feeds the true time."""
    return t + time_shift * (1.0 - t) if time_shift else t


def clamp_to_embeddings(model, x0_hat):
    """Snap each x0_hat vector to its nearest (highest-logit) target embedding norm(E)[argmax]."""
    emb = model.target_embeddings().to(x0_hat.dtype)
    return emb[(x0_hat @ emb.t()).argmax(-1)]


def denoise_step(model, x_t, sc, t_now, t_next, enc, tgt_mask=None, *, schedule="sqrt", clamp=False,
                 time_shift=0.0):
    """One DDIM step from t_now to t_next < t_now: a pure function of its tensor inputs.

    x_t, sc: (B, L, d_e); t_now, t_next: 0-dim tensors; returns (x_{t_next}, x0_hat): network call,
    optional clamp, ddim_step (the C++ loop does the same with the fused ddim_step_clamp op)."""
    B, L, _ = x_t.shape
    x0_hat = model(x_t, sc, network_time(t_now, time_shift).expand(B), enc, tgt_mask)
    if clamp:
        x0_hat = clamp_to_embeddings(model, x0_hat)
    a_t, s_t = alpha_sigma(t_now, schedule)
    a_s, s_s = alpha_sigma(t_next, schedule)
    per_token = [v.expand(B, L).contiguous().float() for v in (a_t, s_t, a_s, s_s)]   # the op wants fp32 schedules
    return functional.ddim_step(x0_hat, x_t, *per_token), x0_hat


def step_schedule(grid: torch.Tensor, schedule: str, time_shift: float):
    """(t_net (K,), alpha (K+1,), sigma (K+1,)) float32 on the CPU for a time grid: the values
    denoise_step computes per grid point, from the same 0-dim ops, so a loop given these tables
    (the C++ one) sees the Python loop's numbers bit for bit."""
    grid = grid.detach().to("cpu", torch.float32)
    t_net = torch.stack([network_time(grid[k], time_shift) for k in range(grid.numel() - 1)])
    pairs = [alpha_sigma(grid[k], schedule) for k in range(grid.numel())]
    return (t_net.float(), torch.stack([a for a, _ in pairs]).float(), torch.stack([s for _, s in pairs]).float())


class PythonEngine:
    """The eager loop as a Sampler engine (see fastdiss.engines for the interface)."""

    name = "python"

    def __init__(self, model, diffusion_cfg):
        self.model = model
        self.schedule = diffusion_cfg.schedule
        self.noise_factor = float(diffusion_cfg.noise_factor)

    def encode(self, src, src_mask):
        return self.model.encode(src, src_mask)

    @torch.no_grad()
    def denoise(self, enc, x, tgt_mask, grid, *, clamp: bool = False, time_shift: float = 0.0, on_step=None):
        """K = len(grid) - 1 steps from x = x_{t_0} (None: noise_factor * randn from the default
        generator) -> (x_{t_K}, x0 of the last step). on_step(1) after each step, when given."""
        if x is None:
            x = self.noise_factor * torch.randn(enc.out.shape[0], tgt_mask.shape[1], self.model.cfg.d_latent,
                                                device=enc.out.device, dtype=enc.out.dtype)
        sc = torch.zeros_like(x)   # no self-conditioning signal at the first step
        for k in range(grid.numel() - 1):
            x, sc = denoise_step(self.model, x, sc, grid[k], grid[k + 1], enc, tgt_mask, schedule=self.schedule,
                                 clamp=clamp, time_shift=time_shift)
            if on_step is not None:
                on_step(1)
        return x, sc
