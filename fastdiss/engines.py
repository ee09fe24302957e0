"""Sampling engines: who runs the network part of fastdiss.sampling.Sampler.

    python      the reference loop in fastdiss/sampling.py (eager modules, one Python iteration per step)
    cpp         fastdiss.cpp_engine.CppEngine: exported AOTInductor graphs, all K steps in one C++ call
    cuda-graph  fastdiss.cuda_graphs.CUDAGraphEngine: the eager loop captured once per shape bucket and
                replayed (GPU only; falls back to the eager loop, with a warning, when capture fails)

An engine has two methods, and the Sampler keeps everything else (length prediction, candidates,
noise from its seeded generator, rounding, selection), so every engine sees the same inputs:
    encode(src, src_mask) -> EncoderState
    denoise(enc, x, tgt_mask, grid, *, clamp, time_shift) -> (x_{t_K}, x0 of the last step)
`x` is the initial x_{t_0}; None lets the engine draw noise_factor * randn itself.
"""
from __future__ import annotations

import torch

ENGINES = ("python", "cpp", "cuda-graph")


class PythonEngine:
    """The Python loop of sampling.denoise_step, as an engine (the benchmark's baseline and the
    CUDA-graph engine's eager fallback)."""

    name = "python"

    def __init__(self, model, diffusion_cfg):
        self.model = model
        self.schedule = diffusion_cfg.schedule
        self.noise_factor = float(diffusion_cfg.noise_factor)

    def encode(self, src, src_mask):
        return self.model.encode(src, src_mask)

    @torch.no_grad()
    def denoise(self, enc, x, tgt_mask, grid, *, clamp: bool = False, time_shift: float = 0.0):
        from fastdiss.sampling import denoise_step

        if x is None:
            x = self.noise_factor * torch.randn(enc.out.shape[0], tgt_mask.shape[1], self.model.cfg.d_latent,
                                                device=enc.out.device, dtype=enc.out.dtype)
        sc = torch.zeros_like(x)
        for k in range(grid.numel() - 1):
            x, sc = denoise_step(self.model, x, sc, grid[k], grid[k + 1], enc, tgt_mask, schedule=self.schedule,
                                 clamp=clamp, time_shift=time_shift)
        return x, sc


def make_engine(engine, model, diffusion_cfg, **options):
    """The engine for Sampler(..., engine=...): None for "python" (the Sampler's own loop), an engine
    object as is, else a new CppEngine (options: export_dir, check_weights) or CUDAGraphEngine
    (options: see CUDAGraphEngine)."""
    if engine is None or engine == "python":
        if options:
            raise ValueError(f"engine 'python' takes no options, got {sorted(options)}")
        return None
    if not isinstance(engine, str):
        if not (callable(getattr(engine, "encode", None)) and callable(getattr(engine, "denoise", None))):
            raise TypeError(f"engine must be one of {ENGINES} or an object with encode() and denoise(), "
                            f"got {type(engine).__name__}")
        return engine
    if engine == "cpp":
        from fastdiss.cpp_engine import CppEngine
        if "export_dir" not in options:
            raise ValueError("engine 'cpp' needs engine_options={'export_dir': DIR}, a folder written by "
                             "`fastdiss export --ckpt CKPT --out DIR` (or fastdiss.export.export_denoiser)")
        return CppEngine(options.pop("export_dir"), model=model, **options)
    if engine == "cuda-graph":
        from fastdiss.cuda_graphs import CUDAGraphEngine
        return CUDAGraphEngine(model, diffusion_cfg, **options)
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
