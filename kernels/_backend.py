"""Which implementation the ops use: Triton kernels or the PyTorch reference.

`auto` (default): Triton on CUDA tensors, PyTorch on CPU tensors.
`triton`: Triton everywhere; on CPU tensors the kernels run under the Triton interpreter,
          which must be switched on (TRITON_INTERPRET=1) before fastdiss is imported.
`torch`:  the pure-PyTorch reference everywhere.
Set with `fastdiss.set_backend(...)` or the environment variable FASTDISS_BACKEND.
It lives in the kernel package because the ops read it; fastdiss re-exports set_backend/get_backend.
"""
from __future__ import annotations

import os

import torch

from ._utils import HAS_TRITON

BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("FASTDISS_BACKEND", "auto").strip().lower() or "auto"
if _backend not in BACKENDS:
    raise ValueError(f"FASTDISS_BACKEND={_backend!r} is not one of {BACKENDS}; unset it or pick one of those")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return HAS_TRITON


def set_backend(name: str) -> None:
    """Choose the implementation used by fastdiss.functional / fastdiss.nn ops."""
    global _backend
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("backend 'triton' needs the triton package: pip install triton==3.7.1")
    _backend = name


def get_backend() -> str:
    return _backend


def use_triton(t: torch.Tensor) -> bool:
    """True if an op on tensor `t` should launch the Triton kernel (else: PyTorch reference)."""
    if _backend == "torch" or not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True
    if t.device.type == "cpu" and _backend == "triton":
        if not interpreter_enabled():
            raise RuntimeError(
                "backend 'triton' on CPU tensors runs the kernels under the Triton interpreter: set "
                "TRITON_INTERPRET=1 in the environment before importing fastdiss (or use set_backend('auto'))"
            )
        return True
    return False


def use_kernels(t: torch.Tensor) -> bool:
    """True if fastdiss ops should go through the registered custom ops (else plain PyTorch code).

    The custom ops themselves dispatch CUDA -> Triton, CPU -> reference (or Triton under the
    interpreter with backend 'triton'). With backend 'torch' we skip the op layer entirely.
    """
    return _backend != "torch"
