"""Sampling engines: who runs the network part of fastdiss.sampling.Sampler.

    python      fastdiss.python_engine.PythonEngine: the eager K-step loop (the default)
    cpp         fastdiss.cpp_engine.CppEngine: exported AOTInductor graphs, all K steps in one C++ call
    cuda-graph  fastdiss.cuda_graphs.CUDAGraphEngine: the eager loop captured once per shape bucket and
                replayed (GPU only; falls back to the eager loop, with a warning, when capture fails)

An engine has two methods, and the Sampler keeps everything else (length prediction, candidates,
noise from its seeded generator, time grid, rounding, selection), so every engine sees the same inputs:
    encode(src, src_mask) -> EncoderState
    denoise(enc, x, tgt_mask, grid, *, clamp, time_shift, on_step) -> (x_{t_K}, x0 of the last step)
`x` is the initial x_{t_0}; None lets the engine draw noise_factor * randn itself. `on_step` (None
or a function) is called with the number of steps just done: after each step by an engine that
steps from Python, once with K by one that runs all steps in a single call.
"""
from __future__ import annotations

from fastdiss.python_engine import PythonEngine

ENGINES = ("python", "cpp", "cuda-graph")


def make_engine(engine, model, diffusion_cfg, **options):
    """The engine for Sampler(..., engine=...): a PythonEngine for None / "python", an engine object
    as is, else a new CppEngine (options: export_dir, check_weights) or CUDAGraphEngine (options:
    see CUDAGraphEngine)."""
    if engine is None or engine == "python":
        if options:
            raise ValueError(f"engine 'python' takes no options, got {sorted(options)}")
        return PythonEngine(model, diffusion_cfg)
    if not isinstance(engine, str):
        if not (callable(getattr(engine, "encode", None)) and callable(getattr(engine, "denoise", None))):
            raise TypeError(f"engine must be one of {ENGINES} or an object with encode() and denoise(), "
                            f"got {type(engine).__name__}")
        return engine
    if engine == "cpp":
        from fastdiss.cpp_engine import CppEngine   # imported on use: it loads torch.export machinery
        if "export_dir" not in options:
            raise ValueError("engine 'cpp' needs engine_options={'export_dir': DIR}, a folder written by "
                             "`fastdiss export --ckpt CKPT --out DIR` (or fastdiss.export.export_denoiser)")
        return CppEngine(options.pop("export_dir"), model=model, **options)
    if engine == "cuda-graph":
        from fastdiss.cuda_graphs import CUDAGraphEngine
        return CUDAGraphEngine(model, diffusion_cfg, **options)
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
