"""Self-conditioning input projection y = Linear([x_t ; sc]) (+ add) without the concatenation.

Forward: a tiled Triton matmul whose K loop runs twice, first over x_t against W[:, :d], then over
sc against W[:, d:], into one fp32 accumulator; bias and `add` (the time + position embeddings)
are added in the epilogue before the single downcast. The (tokens x 2d) concatenation and the
separate add pass are never materialised, which is what makes this memory-bound layer cheap.

`add` may have the output's shape (*, L, N) or any shape that broadcasts to it (e.g. a position
table (L, N), or (B, 1, N)); broadcast dims are read with stride 0, not expanded in memory.
Its gradient is the output gradient summed over the broadcast dims.

Backward (op fastdiss::self_cond_project_bwd): plain torch matmuls on views of the weight,
dx_t = g W[:, :d], dsc = g W[:, d:], dW = [g^T x_t, g^T sc], db = sum(g): cuBLAS already runs
these at full speed and nothing there needs a concatenation of the inputs.

fp32 inputs use IEEE fp32 dots unless torch allows TF32 for matmuls
(torch.backends.cuda.matmul.allow_tf32), as F.linear does. Under the Triton interpreter the dot
operands are upcast to fp32 (its bf16 dot is wrong).

Layers: Triton kernel -> launcher `self_cond_project_triton` -> ops
torch.ops.fastdiss.self_cond_project_fwd / self_cond_project_bwd, registered by FusedOp
(kernels/_op.py; the backward is two torch matmuls on every device) -> `self_cond_project()`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _backend

from ._op import FusedOp
from ._utils import FLOAT_DTYPES, HAS_TRITON, check_tensor, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl


# ----------------------------------------------------------------------------------------------
# PyTorch reference: the CPU kernel, the test oracle and the benchmark baseline.
# ----------------------------------------------------------------------------------------------

def self_cond_project_reference(x_t, sc, weight, bias=None, add=None):
    y = F.linear(torch.cat([x_t, sc], -1), weight, bias)
    return y if add is None else y + add


def _backward_torch(grad, x_t, sc, weight, has_bias):
    """(dx_t, dsc, dweight, dbias) with matmuls on the two halves of the weight."""
    d = x_t.shape[-1]
    N = weight.shape[0]
    g = grad.reshape(-1, N)
    dx = (g @ weight[:, :d]).reshape(x_t.shape)
    dsc = (g @ weight[:, d:]).reshape(sc.shape)
    gt = g.t()
    dw = torch.cat([gt @ x_t.reshape(-1, d), gt @ sc.reshape(-1, d)], dim=1)
    db = g.sum(0, dtype=torch.float32).to(grad.dtype) if has_bias else grad.new_empty(0)
    return dx, dsc, dw, db


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _accumulate_half(acc, A, W, rm, rn, M, N, K, stride_wn, w_col0,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc += A[rm, :K] @ W[rn, w_col0 : w_col0 + K]^T."""
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            a = tl.load(A + rm[:, None] * K + rk[None, :], mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(W + rn[None, :] * stride_wn + (w_col0 + rk)[:, None],
                        mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _sc_proj_fwd_kernel(X, S, W, Bias, Add, Y, M, N, K, L, stride_wn, stride_ab, stride_al, stride_an,
                            HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, UPCAST: tl.constexpr,
                            PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # 1D grid, column blocks fastest: the programs that share a row block of x_t / sc run
        # together, so those rows come from DRAM once (and W, being small, stays in L2)
        pid = tl.program_id(0).to(tl.int64)
        n_col_blocks = tl.cdiv(N, BLOCK_N)
        rm = (pid // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (pid % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _accumulate_half(acc, X, W, rm, rn, M, N, K, stride_wn, 0,
                               UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        acc = _accumulate_half(acc, S, W, rm, rn, M, N, K, stride_wn, K,
                               UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_ADD:  # add viewed as (M // L, L, N) with strides (stride_ab, stride_al, stride_an)
            a_row = (rm // L) * stride_ab + (rm % L) * stride_al
            acc += tl.load(Add + a_row[:, None] + rn[None, :] * stride_an, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def aot_specs():
    """(name, kernel, signature, constexprs, options) for ahead-of-time compilation checks, with
    the launcher's tile config for each dtype."""
    if not HAS_TRITON:
        return []
    specs = []
    for dt, prec in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "ieee")):
        sig = {"X": f"*{dt}", "S": f"*{dt}", "W": f"*{dt}", "Bias": f"*{dt}", "Add": f"*{dt}", "Y": f"*{dt}",
               "M": "i32", "N": "i32", "K": "i32", "L": "i32", "stride_wn": "i32", "stride_ab": "i32",
               "stride_al": "i32", "stride_an": "i32", "HAS_BIAS": "constexpr", "HAS_ADD": "constexpr",
               "UPCAST": "constexpr", "PRECISION": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        cfg = _GPU_CONFIG["fp32" if dt == "fp32" else "half"]
        const = {"HAS_BIAS": True, "HAS_ADD": True, "UPCAST": False, "PRECISION": prec,
                 "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": _block_k(dt == "fp32", 128)}
        options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        specs.append((f"sc_proj_fwd_{dt}_{prec}", _sc_proj_fwd_kernel, sig, const, options))
    return specs


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_GPU_CONFIG = {  # one tile config per dtype (no autotuning: the interpreter cannot run several)
    "fp32": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "half": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
}
_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)


def _config(dtype: torch.dtype) -> dict:
    if _backend.interpreter_enabled():
        return _INTERPRET_CONFIG
    return _GPU_CONFIG["fp32" if dtype == torch.float32 else "half"]


def _block_k(fp32: bool, d: int) -> int:
    return max(16, min(32 if fp32 else 64, next_pow2(d)))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _add_view(add, out_shape):
    """`add` broadcast to out_shape (*, L, N) and viewed as 3D (outer, L, N): (view, strides)."""
    L, N = out_shape[-2] if len(out_shape) >= 2 else 1, out_shape[-1]
    a = add.expand(out_shape)
    if len(out_shape) == 1:
        return a, (0, 0, a.stride(0))
    lead = a.shape[:-2]
    try:
        a3 = a.view(-1, L, N) if lead else a.unsqueeze(0)
    except RuntimeError:  # leading dims with incompatible strides: materialise once
        a3 = a.reshape(-1, L, N)
    return a3, a3.stride()


def self_cond_project_triton(x_t, sc, weight, bias=None, add=None, block_sizes: Optional[dict] = None):
    """Launch the fused projection. x_t, sc (*, d); weight (N, 2d); bias (N,); add broadcastable to (*, N)."""
    d = x_t.shape[-1]
    N = weight.shape[0]
    out_shape = (*x_t.shape[:-1], N)
    x2 = x_t.reshape(-1, d).contiguous()
    s2 = sc.reshape(-1, d).contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    M = x2.shape[0]
    y = torch.empty(out_shape, dtype=x_t.dtype, device=x_t.device)
    if M == 0 or N == 0:
        return y
    L = out_shape[-2] if len(out_shape) >= 2 else 1
    if add is not None:
        add, (s_ab, s_al, s_an) = _add_view(add, out_shape)
    else:
        s_ab = s_al = s_an = 0
    cfg = dict(_config(x_t.dtype), **(block_sizes or {}))
    block_k = _block_k(x_t.dtype == torch.float32, d)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _sc_proj_fwd_kernel[grid](
        x2, s2, weight, bias if bias is not None else x2, add if add is not None else x2, y,
        M, N, d, L, weight.stride(0), s_ab, s_al, s_an,
        HAS_BIAS=bias is not None, HAS_ADD=add is not None, UPCAST=_backend.interpreter_enabled(),
        PRECISION=_precision(x_t.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------

def _forward_fake(x_t, sc, weight, bias, add):
    return x_t.new_empty((*x_t.shape[:-1], weight.shape[0]))


def _backward_fake(grad, x_t, sc, weight, has_bias):
    return (torch.empty_like(x_t), torch.empty_like(sc), torch.empty_like(weight),
            grad.new_empty(weight.shape[0] if has_bias else 0))


def _setup_context(ctx, inputs, output):
    x_t, sc, weight, bias, add = inputs
    ctx.save_for_backward(x_t, sc, weight)
    ctx.has_bias = bias is not None
    ctx.add_shape = add.shape if add is not None else None


def _backward(ctx, grad):
    """(dx_t, dsc, dweight, dbias, dadd)."""
    x_t, sc, weight = ctx.saved_tensors
    dx, dsc, dw, db = self_cond_project_bwd(grad, x_t, sc, weight, ctx.has_bias, eager=ctx.eager)
    dadd = None
    if ctx.add_shape is not None and ctx.needs_input_grad[4]:
        dadd = grad.sum_to_size(ctx.add_shape)
    return dx, dsc, dw, (db if ctx.has_bias else None), dadd


self_cond_project_bwd = FusedOp(
    "self_cond_project_bwd", "(Tensor grad, Tensor x_t, Tensor sc, Tensor weight, bool has_bias)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    kernel=_backward_torch, reference=_backward_torch, fake=_backward_fake)
self_cond_project_fwd = FusedOp(
    "self_cond_project_fwd", "(Tensor x_t, Tensor sc, Tensor weight, Tensor? bias, Tensor? add) -> Tensor",
    kernel=self_cond_project_triton, reference=self_cond_project_reference, fake=_forward_fake,
).differentiable(_setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def self_cond_project(x_t, sc, weight, bias=None, add=None):
    """F.linear(cat([x_t, sc], -1), weight, bias) (+ add) without the concatenation.
    x_t, sc (*, d); weight (N, 2d); bias (N,); add (*, N) or broadcastable to it."""
    check_tensor("x_t", x_t, dtypes=FLOAT_DTYPES)
    if x_t.dim() < 1 or x_t.shape[-1] < 1:
        raise ValueError(f"x_t must have a non-empty last dim, got shape {tuple(x_t.shape)}")
    dt, dev = (x_t.dtype,), x_t.device
    check_tensor("sc", sc, dtypes=dt, device=dev)
    if sc.shape != x_t.shape:
        raise ValueError(f"sc must have the shape of x_t {tuple(x_t.shape)}, got {tuple(sc.shape)}")
    d = x_t.shape[-1]
    check_tensor("weight", weight, ndim=2, dtypes=dt, device=dev)
    if weight.shape[1] != 2 * d:
        raise ValueError(f"weight must have shape (N, {2 * d}) (2 x the last dim of x_t), got {tuple(weight.shape)}")
    N = weight.shape[0]
    out_shape = (*x_t.shape[:-1], N)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=dt, device=dev)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape ({N},) (the rows of weight), got {tuple(bias.shape)}")
    if add is not None:
        check_tensor("add", add, dtypes=dt, device=dev)
        try:
            ok = torch.broadcast_shapes(add.shape, out_shape) == torch.Size(out_shape)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"add must have the output's shape {tuple(out_shape)} or broadcast to it, "
                             f"got {tuple(add.shape)}")
    if not _backend.use_kernels(x_t):
        return self_cond_project_reference(x_t, sc, weight, bias, add)
    return self_cond_project_fwd.apply(x_t, sc, weight, bias, add)
