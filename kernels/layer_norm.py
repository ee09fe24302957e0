"""Fused (residual add +) LayerNorm over the last dim, forward and backward.

Forward: one program per block of ROWS rows, the whole row in registers (BLOCK_N = next power of
two of the row size). With a residual it computes h = x + residual, stores h (pre-LN blocks need
it for the next residual add) and normalises the stored h, so y and h are consistent to the bit.
Statistics (mean, 1/std) are fp32 and saved for the backward. Math is fp32 for every input dtype,
with one downcast on store.

Backward: a fixed number of programs, each owning a contiguous chunk of rows. Each writes dh for
its rows and one fp32 row of partial sums for dweight and dbias; one torch sum over programs
finishes them. No atomics, so the result is deterministic (and the interpreter can run it).
With a residual, the gradient reaching h (through y, plus the one flowing into the returned h)
is the gradient of both x and residual.

Dtypes: x and residual may differ (h and y take their promoted dtype, as `x + residual` does);
weight and bias may be fp32 with bf16/fp16 activations (autocast-style mixed precision).
Rows longer than MAX_FUSED_N run the PyTorch reference.

Layers: Triton kernels -> launchers (`layer_norm_forward_triton`, `layer_norm_backward_triton`)
-> ops torch.ops.fastdiss.layer_norm_fwd / layer_norm_bwd, registered by FusedOp (kernels/_op.py:
CUDA Triton, CPU the PyTorch reference, one autograd formula for the op and the eager CUDA path)
-> `layer_norm()`.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from . import _backend

from ._op import FusedOp
from ._utils import FLOAT_DTYPES, HAS_TRITON, check_tensor, max_programs, next_pow2, num_warps_for

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_FUSED_N = 16384      # one row lives in registers; beyond this the reference runs
_TILE_ELEMS = 4096       # rows per program = _TILE_ELEMS // BLOCK_N (power of two, <= _MAX_ROWS)
_MAX_ROWS = 32


# ----------------------------------------------------------------------------------------------
# PyTorch reference: the CPU kernel, the test oracle and the benchmark baseline.
# ----------------------------------------------------------------------------------------------

def _out_dtype(x, residual):
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def layer_norm_reference(x, weight, bias, eps=1e-5, residual=None):
    """F.layer_norm, with `residual`: (F.layer_norm(x + residual), x + residual).

    weight/bias of another dtype than the activations are applied in fp32 (mixed precision)."""
    h = x if residual is None else x + residual
    if (weight is not None and weight.dtype != h.dtype) or (bias is not None and bias.dtype != h.dtype):
        ct = torch.float64 if h.dtype == torch.float64 else torch.float32
        y = F.layer_norm(h.to(ct), h.shape[-1:], None if weight is None else weight.to(ct),
                         None if bias is None else bias.to(ct), eps).to(h.dtype)
    else:
        y = F.layer_norm(h, h.shape[-1:], weight, bias, eps)
    return y if residual is None else (y, h)


def _stats_reference(h, eps):
    hf = h.float()
    mean = hf.mean(-1)
    rstd = torch.rsqrt(hf.var(-1, unbiased=False) + eps)
    return mean.reshape(-1), rstd.reshape(-1)


def _backward_reference(dy, dh, hin, weight, mean, rstd, has_bias):
    """LayerNorm backward from the saved fp32 statistics, in fp32 (the CPU backward kernel)."""
    N = hin.shape[-1]
    xhat = (hin.float().reshape(-1, N) - mean[:, None]) * rstd[:, None]
    g = dy.float().reshape(-1, N)
    wg = g if weight is None else g * weight.float()
    dx = (wg - xhat * (wg * xhat).mean(-1, keepdim=True) - wg.mean(-1, keepdim=True)) * rstd[:, None]
    if dh is not None:
        dx = dx + dh.float().reshape(-1, N)
    dw = (g * xhat).sum(0) if weight is not None else hin.new_empty(0, dtype=torch.float32)
    db = g.sum(0) if has_bias else hin.new_empty(0, dtype=torch.float32)
    return dx.to(hin.dtype).reshape(hin.shape), dw, db


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _ln_fwd_kernel(X, R, W, B, Y, H, Mean, Rstd, n_rows, N, eps,
                       HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h_out = (h + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + offs, h_out, mask=mask)
            h = h_out.to(tl.float32)  # normalise exactly the h we return
        mean = tl.sum(h, axis=1) / N
        diff = tl.where(mask, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
        y = diff * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)

    @triton.jit
    def _ln_bwd_kernel(DY, DH, Hin, W, Mean, Rstd, DX, DW_part, DB_part, n_rows, N, rows_per_program,
                       HAS_DH: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program  # rows_per_program is a multiple of ROWS
        for r0 in range(0, rows_per_program, ROWS):
            rows = first + r0 + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows[:, None] * N + cols[None, :]
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            h = tl.load(Hin + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            wdy = dy
            if HAS_WEIGHT:
                wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DH:
                dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
        part = pid.to(tl.int64) * N + cols
        if HAS_WEIGHT:
            tl.store(DW_part + part, tl.sum(dw_acc, axis=0), mask=col_ok)
        if HAS_BIAS:
            tl.store(DB_part + part, tl.sum(db_acc, axis=0), mask=col_ok)


def aot_specs():
    """(name, kernel, signature, constexprs, options) for ahead-of-time compilation checks: a few
    representative dtype / feature combinations with the launcher's warps (each compile takes seconds)."""
    if not HAS_TRITON:
        return []

    def fwd_sig(dt, wdt):
        return {"X": f"*{dt}", "R": f"*{dt}", "W": f"*{wdt}", "B": f"*{wdt}", "Y": f"*{dt}", "H": f"*{dt}",
                "Mean": "*fp32", "Rstd": "*fp32", "n_rows": "i32", "N": "i32", "eps": "fp32",
                "HAS_RESIDUAL": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr",
                "ROWS": "constexpr", "BLOCK_N": "constexpr"}

    def bwd_sig(dt, wdt):
        return {"DY": f"*{dt}", "DH": f"*{dt}", "Hin": f"*{dt}", "W": f"*{wdt}", "Mean": "*fp32", "Rstd": "*fp32",
                "DX": f"*{dt}", "DW_part": "*fp32", "DB_part": "*fp32", "n_rows": "i32", "N": "i32",
                "rows_per_program": "i32", "HAS_DH": "constexpr", "HAS_WEIGHT": "constexpr",
                "HAS_BIAS": "constexpr", "ROWS": "constexpr", "BLOCK_N": "constexpr"}

    def spec(name, kernel, sig, const):
        return name, kernel, sig, const, {"num_warps": num_warps_for(const["ROWS"] * const["BLOCK_N"])}

    on = dict(HAS_WEIGHT=True, HAS_BIAS=True)
    off = dict(HAS_WEIGHT=False, HAS_BIAS=False)
    return [
        spec("ln_fwd_bf16_wfp32_residual", _ln_fwd_kernel, fwd_sig("bf16", "fp32"),
             dict(on, HAS_RESIDUAL=True, ROWS=4, BLOCK_N=1024)),
        spec("ln_fwd_fp32_noaffine", _ln_fwd_kernel, fwd_sig("fp32", "fp32"),
             dict(off, HAS_RESIDUAL=False, ROWS=1, BLOCK_N=8192)),
        spec("ln_bwd_bf16_wfp32_dh", _ln_bwd_kernel, bwd_sig("bf16", "fp32"),
             dict(on, HAS_DH=True, ROWS=32, BLOCK_N=128)),
        spec("ln_bwd_fp16_noaffine", _ln_bwd_kernel, bwd_sig("fp16", "fp16"),
             dict(off, HAS_DH=False, ROWS=1, BLOCK_N=8192)),
    ]


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _tile(N: int, block_rows: Optional[int]):
    """(ROWS, BLOCK_N, num_warps) for rows of N elements."""
    block_n = next_pow2(N)
    rows = block_rows if block_rows is not None else max(1, min(_MAX_ROWS, _TILE_ELEMS // block_n))
    if rows & (rows - 1):
        raise ValueError(f"block_rows must be a power of two, got {rows}")
    return rows, block_n, num_warps_for(rows * block_n)


@functools.lru_cache(maxsize=None)
def _check_fused_size(N: int):
    if N > MAX_FUSED_N:
        raise ValueError(f"layer_norm kernel: row size {N} exceeds MAX_FUSED_N={MAX_FUSED_N}")


def layer_norm_forward_triton(x, weight, bias, residual, eps: float, block_rows: Optional[int] = None):
    """Launch the forward kernel. Returns (y, h, mean, rstd); h is an empty tensor without residual."""
    N = x.shape[-1]
    _check_fused_size(N)
    x = x.contiguous()
    out_dtype = _out_dtype(x, residual)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    h = torch.empty(x.shape, dtype=out_dtype, device=x.device) if residual is not None else x.new_empty(0)
    n_rows = x.numel() // N if N else 0
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, h, mean, rstd
    rows, block_n, warps = _tile(N, block_rows)
    res = residual.contiguous() if residual is not None else x
    _ln_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x, res, weight if weight is not None else x, bias if bias is not None else x, y,
        h if residual is not None else y, mean, rstd, n_rows, N, float(eps),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ROWS=rows, BLOCK_N=block_n, num_warps=warps)
    return y, h, mean, rstd


def layer_norm_backward_triton(dy, dh, hin, weight, mean, rstd, has_bias: bool,
                               block_rows: Optional[int] = None, num_programs: Optional[int] = None):
    """Launch the backward kernel. `hin` is the normalised input (x, or h with a residual);
    `dh` the extra gradient on h (or None). Returns (dh_total, dweight, dbias); the parameter
    gradients are fp32 (the caller casts them) and empty when the parameter is absent."""
    N = hin.shape[-1]
    _check_fused_size(N)
    hin = hin.contiguous()
    dy = dy.contiguous()
    dx = torch.empty_like(hin)
    n_rows = hin.numel() // N if N else 0
    rows, block_n, warps = _tile(N, block_rows)
    n_blocks = triton.cdiv(n_rows, rows)
    programs = max(1, min(n_blocks, num_programs or max_programs(hin.device, 4)))
    rows_per_program = triton.cdiv(n_blocks, programs) * rows
    programs = triton.cdiv(n_rows, rows_per_program) if n_rows else 0
    # every program writes its whole partial row, so the buffers need no zeroing
    dw_part = torch.empty(programs if weight is not None else 0, N, dtype=torch.float32, device=hin.device)
    db_part = torch.empty(programs if has_bias else 0, N, dtype=torch.float32, device=hin.device)
    if programs:
        _ln_bwd_kernel[(programs,)](
            dy, dh.contiguous() if dh is not None else dy, hin, weight if weight is not None else hin,
            mean, rstd, dx, dw_part if weight is not None else dx, db_part if has_bias else dx,
            n_rows, N, rows_per_program,
            HAS_DH=dh is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias,
            ROWS=rows, BLOCK_N=block_n, num_warps=warps)
    dw = dw_part.sum(0) if weight is not None else dw_part.new_empty(0)
    db = db_part.sum(0) if has_bias else db_part.new_empty(0)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------

def _forward_reference(x, weight, bias, residual, eps):
    """The forward op's CPU kernel: (y, h, mean, rstd) like the launcher."""
    out = layer_norm_reference(x, weight, bias, eps, residual)
    y, h = out if residual is not None else (out, x.new_empty(0))
    mean, rstd = _stats_reference(h if residual is not None else x, eps)
    return y, h, mean, rstd


def _forward_fake(x, weight, bias, residual, eps):
    dtype = _out_dtype(x, residual)
    n_rows = math.prod(x.shape[:-1])
    h = x.new_empty(x.shape, dtype=dtype) if residual is not None else x.new_empty(0)
    return (x.new_empty(x.shape, dtype=dtype), h, x.new_empty(n_rows, dtype=torch.float32),
            x.new_empty(n_rows, dtype=torch.float32))


def _backward_fake(dy, dh, hin, weight, mean, rstd, has_bias):
    N = hin.shape[-1]
    dw = hin.new_empty(N if weight is not None else 0, dtype=torch.float32)
    db = hin.new_empty(N if has_bias else 0, dtype=torch.float32)
    return torch.empty_like(hin), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    y, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.set_materialize_grads(False)  # an unused h gets None, not a tensor of zeros to read
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, dh, _dmean, _drstd):
    """(dx, dweight, dbias, dresidual, None) from the gradients of y and h."""
    hin, weight, mean, rstd = ctx.saved_tensors
    if not ctx.has_residual or dh is None or dh.numel() == 0:
        dh = None
    if dy is None:  # only h was used
        dy = torch.zeros_like(hin)
    dx, dw, db = layer_norm_bwd(dy, dh, hin, weight, mean, rstd, ctx.has_bias, eager=ctx.eager)
    dweight = dw.to(weight.dtype) if weight is not None else None
    dbias = db.to(ctx.bias_dtype) if ctx.has_bias else None
    if not ctx.has_residual:
        return dx.to(ctx.x_dtype), dweight, dbias, None, None
    # d/dx (x + residual) = d/dresidual: the same gradient, in each input's dtype
    return dx.to(ctx.x_dtype), dweight, dbias, dx.to(ctx.res_dtype), None


layer_norm_bwd = FusedOp(
    "layer_norm_bwd", "(Tensor dy, Tensor? dh, Tensor hin, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias)"
    " -> (Tensor, Tensor, Tensor)",
    kernel=layer_norm_backward_triton, reference=_backward_reference, fake=_backward_fake, device_arg=2)
layer_norm_fwd = FusedOp(
    "layer_norm_fwd", "(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    kernel=layer_norm_forward_triton, reference=_forward_reference, fake=_forward_fake,
).differentiable(_setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def _validate(x, weight, bias, eps, residual):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dim to normalise over, got shape {tuple(x.shape)}")
    N = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, dtypes=FLOAT_DTYPES, device=x.device)
            if tuple(p.shape) != (N,):
                raise ValueError(f"{name} must have shape ({N},) (the last dim of x), got {tuple(p.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative real number, got {eps!r}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES, device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dim (weight/bias optional); with `residual`, returns
    (layer_norm(x + residual), x + residual) from one kernel."""
    _validate(x, weight, bias, eps, residual)
    if not _backend.use_kernels(x) or x.shape[-1] > MAX_FUSED_N:
        return layer_norm_reference(x, weight, bias, eps, residual)
    y, h, _, _ = layer_norm_fwd.apply(x, weight, bias, residual, float(eps))
    return y if residual is None else (y, h)
