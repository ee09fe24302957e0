"""Small helpers shared by the kernels: block sizes, input checks, whether triton is installed."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
except Exception:  # triton missing: ops fall back to their PyTorch references
    triton = None
    HAS_TRITON = False


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_tensor(name: str, t, *, ndim=None, dtypes=None, device=None) -> None:
    """Raise TypeError/ValueError naming the argument, what was given and what is expected."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; move it with .to({str(device)!r})")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def num_warps_for(tile_elems: int) -> int:
    """Warps for a row-wise tile of `tile_elems` elements held in registers."""
    return 4 if tile_elems <= 2048 else (8 if tile_elems <= 8192 else 16)


def max_programs(device: torch.device, per_sm: int) -> int:
    """Programs for a persistent grid: `per_sm` per multiprocessor on CUDA; a few under the
    interpreter (more than one, so partial-sum reductions are exercised)."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
