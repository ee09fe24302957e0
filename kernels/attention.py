"""Flash attention (forward + backward) with key padding masks, self- and cross-attention.

Numerics follow FlashAttention-2: one pass over the keys with an online softmax (exp2, with
log2(e) folded into the scale), fp32 accumulators, and only the per-row logsumexp saved for
the backward, which recomputes the probabilities block by block. The backward runs three
kernels and no atomics: delta = rowsum(O * dO), then dK/dV (one program per key block, looping
over query blocks) and dQ (one program per query block, looping over key blocks).

The dK/dV kernel computes S^T = K Q^T (keys x queries) rather than S = Q K^T, so that P^T and dS^T
are produced in the layout the dV and dK dots take as their first operand. The earlier form,
dot(trans(P), dO) with P = dot(Q, trans(K)), transposed a dot result in registers; with BLOCK_M = 32 <
BLOCK_N the first dot lowers to Ampere mma (M < 64) and the second to Hopper wgmma with that register
transpose as its operand. Exactly those configs gave wrong dK/dV in an H200 sweep (Triton 3.6), all
others were right, and the interpreter (no such lowering) was right for all. Now every dot of the
kernel has M = BLOCK_N and only loaded tiles (q, dO) are transposed, through shared memory (checked
in the compiled sm_90 code by tests/test_attention.py; not yet re-run on a GPU).

Masks. Padded keys (key_padding_mask True) and, with `is_causal`, keys after the query
(top-left aligned, as in SDPA with Lq == Lk) get score -inf before the running max. A query row
with no key left keeps l = 0: its output is 0, its logsumexp is stored as +inf so that the
backward recomputes p = exp(s - lse) = 0, hence zero gradients and never NaN.

Shapes. q (B, H, Lq, D), k and v (B, H, Lk, D), any Lq and Lk (ragged tails are masked), any
strides (views transposed from (B, L, H, D) run without copies). Head dims 1..128: the head dim
is padded to the next power of two (at least 16, the minimum tl.dot size) with masked loads, so
32, 64 and 128 run unpadded. fp32/fp16/bf16 inputs, fp32 accumulation; fp32 inputs use IEEE
fp32 dots (matching torch's default, TF32 off). Under the Triton interpreter the dot operands are
upcast to fp32 (its bf16 dot is wrong).

Layers: Triton kernels -> launchers (`attention_forward_triton`, `attention_backward_triton`)
-> ops torch.ops.fastdiss.attention_fwd / attention_bwd, registered by FusedOp (kernels/_op.py)
-> `attention()`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _backend

from ._op import FusedOp
from ._utils import FLOAT_DTYPES, HAS_TRITON, check_tensor, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_HEAD_DIM = 128
_MAX_GRID_Y = 65535  # CUDA limit on grid dim 1, where we put batch * heads
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# PyTorch reference: the CPU kernel, the test oracle and the benchmark baseline.
# ----------------------------------------------------------------------------------------------

def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 math for fp32/fp16/bf16 inputs; fp64 stays fp64 (the tests' oracle)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _keep_mask(q, k, key_padding_mask, is_causal):
    """Bool (B|1, 1, Lq|1, Lk) of keys each query may attend to, or None when all are allowed."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    keep = None
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
    if is_causal:
        causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        keep = causal if keep is None else keep & causal
    return keep


def _scores(q, k, scale, ct):
    return torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention_reference(q, k, v, key_padding_mask=None, is_causal=False, scale=None):
    """softmax(q k^T * scale + mask) v in the inputs' dtype (math in fp32, fp64 for fp64 inputs).

    Differentiable with plain autograd; rows without any key give 0 and zero gradients (no NaN:
    such rows are softmaxed over zeros and multiplied by 0 rather than softmaxed over -inf)."""
    scale = _default_scale(q, scale)
    ct = _compute_dtype(q)
    s = _scores(q, k, scale, ct)
    keep = _keep_mask(q, k, key_padding_mask, is_causal)
    if keep is None:
        p = torch.softmax(s, dim=-1)
    else:
        live = keep.any(dim=-1, keepdim=True)
        s = s.masked_fill(~keep, float("-inf")).masked_fill(~live, 0.0)
        p = torch.softmax(s, dim=-1) * live
    return torch.matmul(p, v.to(ct)).to(q.dtype)


def _empty_like_layout(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """New (B, H, L, D) tensor laid out like `t`: (B, L, H, D) memory when `t` is a view transposed
    from a projection's output (so the caller's transpose+reshape back is free), else contiguous.
    Shared by the real kernels and the fake (meta) kernels so their strides always agree."""
    B, H, L, D = t.shape if shape is None else shape
    dtype = t.dtype if dtype is None else dtype
    if t.stride(1) < t.stride(2):
        return torch.empty(B, L, H, D, dtype=dtype, device=t.device).transpose(1, 2)
    return torch.empty(B, H, L, D, dtype=dtype, device=t.device)


def attention_forward_reference(q, k, v, key_padding_mask, is_causal, scale):
    """(o, lse) as the forward op returns them: lse (B, H, Lq) fp32, natural log, +inf for rows
    without keys."""
    ct = _compute_dtype(q)
    s = _scores(q, k, scale, ct)
    keep = _keep_mask(q, k, key_padding_mask, is_causal)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    p = torch.exp(s - lse[..., None])
    o = _empty_like_layout(q, (q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))
    o.copy_(torch.matmul(p, v.to(ct)))
    return o, lse.float()


def attention_backward_reference(do, q, k, v, o, lse, key_padding_mask, is_causal, scale):
    """(dq, dk, dv) from the saved (o, lse), with the same formulas as the Triton backward."""
    ct = _compute_dtype(q)
    do_, q_, k_, v_ = do.to(ct), q.to(ct), k.to(ct), v.to(ct)
    p = torch.exp(_scores(q, k, scale, ct) - lse.to(ct)[..., None])
    keep = _keep_mask(q, k, key_padding_mask, is_causal)
    if keep is not None:
        p = p.masked_fill(~keep, 0.0)
    delta = (o.to(ct) * do_).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-1, -2), do_)
    ds = p * (torch.matmul(do_, v_.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, k_) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q_) * scale
    outs = []
    for g, like in ((dq, q), (dk, k), (dv, v)):
        buf = _empty_like_layout(like)
        buf.copy_(g)
        outs.append(buf)
    return tuple(outs)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, Mask, O, LSE,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mn,
        stride_ob, stride_oh, stride_om, stride_od,
        H, Lq, Lk, head_dim, qk_scale,
        HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One program per (query block, batch*head): online softmax over all key blocks."""
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < Lq
        d_ok = offs_d < head_dim

        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
        Mask += b * stride_mb

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = Lk
        if IS_CAUSAL:
            hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < Lk
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            keep = col_ok
            if HAS_MASK:
                pad = tl.load(Mask + cols * stride_mn, mask=col_ok, other=1)
                keep = keep & (pad == 0)
            keep2 = keep[None, :] & row_ok[:, None]
            if IS_CAUSAL:
                keep2 = keep2 & (cols[None, :] <= offs_m[:, None])
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 domain
            s = tl.where(keep2, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: avoid -inf - -inf
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            p_lo = p.to(v.dtype)
            if DOT_F32:
                p_lo = p_lo.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p_lo, v, input_precision=PRECISION)
            m_i = m_new

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)

    @triton.jit
    def _attn_bwd_delta_kernel(
        O, DO, Delta,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_dob, stride_doh, stride_dom, stride_dod,
        H, Lq, head_dim,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """delta = rowsum(O * dO) in fp32, the softmax-backward correction term."""
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < Lq)[:, None] & (offs_d < head_dim)[None, :]
        o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=mask, other=0.0).to(tl.float32)
        tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, Mask, DO, LSE, Delta, DK, DV,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mn,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        H, Lq, Lk, head_dim, qk_scale, scale,
        HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One program per (key block, batch*head): dV = P^T dO and dK = dS^T Q over all query blocks."""
        start_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < Lk
        d_ok = offs_d < head_dim
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        keep_n = col_ok
        if HAS_MASK:
            pad = tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=col_ok, other=1)
            keep_n = keep_n & (pad == 0)
        Q += b * stride_qb + h * stride_qh
        DO += b * stride_dob + h * stride_doh
        LSE += bh.to(tl.int64) * Lq
        Delta += bh.to(tl.int64) * Lq

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = 0
        if IS_CAUSAL:
            lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M  # earlier queries see none of these keys
        for start_m in range(lo, Lq, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < Lq
            qd_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
            do = tl.load(DO + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
            lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            # Transposed (key x query) tiles: no dot result is transposed in registers (module notes).
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            pt = tl.math.exp2(st - lse[None, :] * 1.4426950408889634)
            keep = keep_n[:, None] & row_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (offs_n[:, None] <= rows[None, :])
            pt = tl.where(keep, pt, 0.0)
            pt_lo = pt.to(DO.dtype.element_ty)
            if DOT_F32:
                pt_lo = pt_lo.to(tl.float32)
            dv += tl.dot(pt_lo, do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dst_lo = dst.to(Q.dtype.element_ty)
            if DOT_F32:
                dst_lo = dst_lo.to(tl.float32)
            dk += tl.dot(dst_lo, q, input_precision=PRECISION)

        dk = dk * scale
        tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, Mask, DO, LSE, Delta, DQ,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mn,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        H, Lq, Lk, head_dim, qk_scale, scale,
        HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One program per (query block, batch*head): dQ = dS K over all key blocks."""
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < Lq
        d_ok = offs_d < head_dim
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=qd_mask, other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=qd_mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
        Mask += b * stride_mb

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = Lk
        if IS_CAUSAL:
            hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < Lk
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            keep = col_ok
            if HAS_MASK:
                pad = tl.load(Mask + cols * stride_mn, mask=col_ok, other=1)
                keep = keep & (pad == 0)
            keep2 = keep[None, :] & row_ok[:, None]
            if IS_CAUSAL:
                keep2 = keep2 & (cols[None, :] <= offs_m[:, None])
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(keep2, tl.math.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            ds_lo = ds.to(K.dtype.element_ty)
            if DOT_F32:
                ds_lo = ds_lo.to(tl.float32)
            dq += tl.dot(ds_lo, k, input_precision=PRECISION)

        dq = dq * scale
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots for fp32 inputs (torch's default: TF32 off); the setting is ignored for 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _fwd_config(Lq: int, head_dim: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Interpreter: 16x16 blocks so tiny tests loop.
    GPU (swept on an H200, bf16 with padding masks, L = 32..1024): 64x64 tiles, 4 warps, 3 stages was
    fastest for head dims 64 and 128; 128x64 tiles were 15-25% slower at L >= 512, 8 warps up to 2x
    slower. Short query sets get smaller query tiles."""
    if _backend.interpreter_enabled():
        return 16, 16, 1, 1
    return min(64, max(16, next_pow2(Lq))), 64, 4, 3


def _bwd_config(head_dim: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) shared by the dK/dV and dQ kernels.
    GPU: 64x64, 4 warps, 2 stages was fastest on an H200 for head dims 64 and 128 (8 warps: 2.2x slower
    at head dim 128), timed before the dK/dV kernel moved to transposed tiles. BLOCK_M=32 < BLOCK_N,
    which gave wrong dK/dV then, is valid now (module notes); tests/test_attention.py forces it."""
    if _backend.interpreter_enabled():
        return 16, 16, 1, 1
    return 64, 64, 4, 2


def _mask_args(key_padding_mask, fallback):
    """Kernel pointer and strides for the mask; bool is read as uint8 (a free view)."""
    if key_padding_mask is None:
        return fallback, 0, 0
    m = key_padding_mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def _check_grid(B: int, H: int) -> None:
    if B * H > _MAX_GRID_Y:
        raise ValueError(f"batch * heads = {B * H} exceeds the kernel grid limit {_MAX_GRID_Y}; split the batch")


def attention_forward_triton(q, k, v, key_padding_mask, is_causal, scale):
    """Launch the forward kernel: returns (o, lse) with lse (B, H, Lq) fp32 natural-log."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = _empty_like_layout(q)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    _check_grid(B, H)
    block_m, block_n, num_warps, num_stages = _fwd_config(Lq, D)
    mask, smb, smn = _mask_args(key_padding_mask, q)
    grid = (triton.cdiv(Lq, block_m), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, mask, o, lse,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *o.stride(),
        H, Lq, Lk, D, scale * _LOG2E,
        HAS_MASK=key_padding_mask is not None, IS_CAUSAL=bool(is_causal),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        DOT_F32=_backend.interpreter_enabled(), PRECISION=_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


def attention_backward_triton(do, q, k, v, o, lse, key_padding_mask, is_causal, scale):
    """Launch delta, dK/dV and dQ kernels: returns (dq, dk, dv) in the inputs' dtype."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq, dk, dv = _empty_like_layout(q), _empty_like_layout(k), _empty_like_layout(v)
    if Lq == 0 or Lk == 0 or B * H * D == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _check_grid(B, H)
    block_m, block_n, num_warps, num_stages = _bwd_config(D)
    block_d = _block_d(D)
    mask, smb, smn = _mask_args(key_padding_mask, q)
    common = dict(HAS_MASK=key_padding_mask is not None, IS_CAUSAL=bool(is_causal),
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  DOT_F32=_backend.interpreter_enabled(), PRECISION=_precision(q.dtype),
                  num_warps=num_warps, num_stages=num_stages)

    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(Lq, block_m), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Lq, D,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8,
    )
    _attn_bwd_dkdv_kernel[(triton.cdiv(Lk, block_n), B * H)](
        q, k, v, mask, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *do.stride(), *dk.stride(), *dv.stride(),
        H, Lq, Lk, D, scale * _LOG2E, scale, **common,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(Lq, block_m), B * H)](
        q, k, v, mask, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), smb, smn, *do.stride(), *dq.stride(),
        H, Lq, Lk, D, scale * _LOG2E, scale, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ops: CUDA -> Triton; CPU -> reference (Triton under the interpreter with backend 'triton')
# ----------------------------------------------------------------------------------------------

def _forward_fake(q, k, v, key_padding_mask, is_causal, scale):
    B, H, Lq, _ = q.shape
    return _empty_like_layout(q), q.new_empty(B, H, Lq, dtype=torch.float32)


def _backward_fake(do, q, k, v, o, lse, key_padding_mask, is_causal, scale):
    return _empty_like_layout(q), _empty_like_layout(k), _empty_like_layout(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, is_causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, key_padding_mask, ctx.is_causal, ctx.scale, eager=ctx.eager)
    return dq, dk, dv, None, None, None


attention_bwd = FusedOp(
    "attention_bwd", "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? key_padding_mask, "
    "bool is_causal, float scale) -> (Tensor, Tensor, Tensor)",
    kernel=attention_backward_triton, reference=attention_backward_reference, fake=_backward_fake, device_arg=1)
attention_fwd = FusedOp(
    "attention_fwd", "(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool is_causal, float scale)"
    " -> (Tensor, Tensor)",
    kernel=attention_forward_triton, reference=attention_forward_reference, fake=_forward_fake,
).differentiable(_setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------

def _validate(q, k, v, key_padding_mask, is_causal, scale):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, device=q.device)
    check_tensor("v", v, ndim=4, device=q.device)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must have shape (B={B}, H={H}, Lk, D={D}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)} (same head dim as q), got {tuple(v.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[-1]) must be in 1..{MAX_HEAD_DIM}, got {D}")
    Lk = k.shape[2]
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,), device=q.device)
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must have shape (B, Lk) = ({B}, {Lk}), "
                             f"got {tuple(key_padding_mask.shape)}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and Lq != Lk:
        raise ValueError(f"is_causal=True needs Lq == Lk (self-attention), got Lq={Lq}, Lk={Lk}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def attention(q, k, v, key_padding_mask=None, is_causal=False, scale=None):
    """Scaled dot-product attention, equal to F.scaled_dot_product_attention with the mask
    `~key_padding_mask` (and causal top-left), except that rows with no key give 0 (not NaN).

    q (B, H, Lq, D); k, v (B, H, Lk, D); key_padding_mask bool (B, Lk), True = padding."""
    _validate(q, k, v, key_padding_mask, is_causal, scale)
    scale = _default_scale(q, scale)
    if _backend.use_kernels(q):
        return attention_fwd.apply(q, k, v, key_padding_mask, is_causal, scale)[0]
    return attention_reference(q, k, v, key_padding_mask, is_causal, scale)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/test_aot.py builds each for sm_80 and sm_90)
# ----------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specs():
    """[(name, kernel, signature, constexprs, options)] for the configs the launchers pick on GPU."""
    from ._aot import make_signature

    specs = []
    for dtype, head_dim, causal, has_mask in ((torch.bfloat16, 64, False, True), (torch.float16, 128, False, True),
                                              (torch.bfloat16, 64, True, False), (torch.float32, 64, False, True)):
        t = _TRITON_DTYPE[dtype]
        tag = f"{t}_d{head_dim}{'_causal' if causal else ''}{'_mask' if has_mask else ''}"
        block_d = _block_d(head_dim)
        flags = dict(HAS_MASK=has_mask, IS_CAUSAL=causal, BLOCK_D=block_d, DOT_F32=False, PRECISION=_precision(dtype))
        floats = {"qk_scale": "fp32", "scale": "fp32"}
        ptrs = {"Q": t, "K": t, "V": t, "DO": t, "O": t, "DQ": t, "DK": t, "DV": t,
                "Mask": "u8", "LSE": "fp32", "Delta": "fp32"}

        bm, bn, warps, stages = _fwd_config(1024, head_dim)
        const = dict(flags, BLOCK_M=bm, BLOCK_N=bn)
        specs.append((f"attn_fwd_{tag}", _attn_fwd_kernel,
                      make_signature(_attn_fwd_kernel, const, ptrs, floats), const,
                      dict(num_warps=warps, num_stages=stages)))
        bm, bn, warps, stages = _bwd_config(head_dim)
        const = dict(flags, BLOCK_M=bm, BLOCK_N=bn)
        for name, kern in (("dkdv", _attn_bwd_dkdv_kernel), ("dq", _attn_bwd_dq_kernel)):
            specs.append((f"attn_bwd_{name}_{tag}", kern, make_signature(kern, const, ptrs, floats), const,
                          dict(num_warps=warps, num_stages=stages)))
        const = dict(BLOCK_M=bm, BLOCK_D=block_d)
        name = f"attn_bwd_delta_{t}_d{head_dim}"
        if all(spec[0] != name for spec in specs):
            specs.append((name, _attn_bwd_delta_kernel, make_signature(_attn_bwd_delta_kernel, const, ptrs, floats),
                          const, dict(num_warps=4 if block_d <= 64 else 8)))
    return specs
