"""fastdiss: few-step self-conditioned embedding diffusion for sequence-to-sequence generation
(FastDiSS: Self-Conditioning Perturbation + Model-Aware Noise Scaling), with fused Triton
kernels and a C++/CUDA sampler."""
from __future__ import annotations

__version__ = "0.1.0"

from fastdiss.kernels._backend import get_backend, set_backend  # noqa: E402
from fastdiss import _ext  # noqa: E402,F401  (loads fastdiss._C if built; `fastdiss env` reports it)
from fastdiss import functional  # noqa: E402,F401
from fastdiss import nn  # noqa: E402,F401  (fastdiss.nn after `import fastdiss`, like torch.nn)

__all__ = ["__version__", "get_backend", "set_backend", "functional", "nn"]
