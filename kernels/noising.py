"""Forward-process noising x_t = alpha(t) z0 + sigma(t) F eps with per-sequence or per-token noise
levels, and the fused embedding gather + LayerNorm + noising of the training path.

The schedules (sqrt, cosine, vp-linear) are evaluated inside the kernels from t, with the
constants and clamps of fastdiss/schedule.py, once per row (token) and broadcast over the latent
dim. Math is fp32 for every input dtype, with one downcast on store.

q_sample. Forward and backward are row-tiled elementwise kernels: dz0 = alpha g and
deps = sigma F g. t gets no gradient (the training path never differentiates through the noise
level; pass a detached t).

embed_and_noise. Forward: one program per block of tokens gathers E[token], normalises it
(LayerNorm, optional affine), stores z0 and x_t = q_sample(z0). Backward: every token of the
same vocabulary entry shares the same normalised row, and the LayerNorm backward is linear in
the incoming gradient, so we first sum dz = dz0 + alpha dx_t over the tokens of each entry and
then run the LayerNorm backward once per entry. Tokens are sorted (stably) by id and each program
owns a contiguous range of vocabulary rows: it walks each row's tokens in sorted order, writes
dE[v] (zero for unused rows) and one fp32 partial row for d ln_weight / d ln_bias. No atomics:
the gradients are deterministic. deps comes from the q_sample backward kernel.

Token ids are range-checked on CPU; on CUDA (no host sync) out-of-range ids read a zero row
instead of faulting, so validate ids upstream.

Layers: Triton kernels -> launchers (`q_sample_forward_triton`, `q_sample_backward_triton`,
`embed_and_noise_forward_triton`, `embed_and_noise_backward_triton`) -> ops
torch.ops.fastdiss.{q_sample_fwd, q_sample_bwd, embed_and_noise_fwd, embed_and_noise_bwd}, registered
by FusedOp (kernels/_op.py) -> `q_sample()`, `embed_and_noise()`.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from . import _backend
from . import schedule as _schedule
from .schedule import alpha_sigma, check_schedule

from ._op import FusedOp
from ._utils import FLOAT_DTYPES, HAS_TRITON, check_tensor, max_programs, next_pow2, num_warps_for

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_FUSED_D = 16384       # embed_and_noise keeps one embedding row in registers
_TILE_ELEMS = 4096
_MAX_ROWS = 32
_SCHEDULE_ID = {name: i for i, name in enumerate(_schedule.SCHEDULES)}  # sqrt 0, cosine 1, vp-linear 2


# ----------------------------------------------------------------------------------------------
# PyTorch reference: the CPU kernel, the test oracle and the benchmark baseline.
# ----------------------------------------------------------------------------------------------

def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _expand_t(t, z0):
    """Noise levels (B,) or (B, L) as (B, L|1, 1) in the compute dtype."""
    if t.dim() == 1:          # per sequence (B,)
        t = t[:, None]
    return t[..., None].to(_compute_dtype(z0))


def q_sample_reference(z0, t, eps, schedule="sqrt", noise_factor=1.0):
    a, s = alpha_sigma(_expand_t(t, z0), schedule)
    ct = _compute_dtype(z0)
    return (a * z0.to(ct) + s * noise_factor * eps.to(ct)).to(z0.dtype)


def embed_and_noise_reference(tokens, weight, t, eps, ln_weight=None, ln_bias=None,
                              schedule="sqrt", noise_factor=1.0, ln_eps=1e-5):
    """Returns (z0, x_t): z0 = LayerNorm(weight[tokens]), x_t = q_sample(z0, t, eps)."""
    ct = _compute_dtype(weight)
    z0 = F.layer_norm(weight[tokens].to(ct), weight.shape[-1:], None if ln_weight is None else ln_weight.to(ct),
                      None if ln_bias is None else ln_bias.to(ct), ln_eps).to(weight.dtype)
    return z0, q_sample_reference(z0, t, eps, schedule, noise_factor)


def _q_sample_backward_reference(grad, t, schedule, noise_factor, need_dz0, need_deps):
    a, s = alpha_sigma(_expand_t(t, grad), schedule)
    g = grad.to(_compute_dtype(grad))
    dz0 = (a * g).to(grad.dtype) if need_dz0 else grad.new_empty(0)
    deps = (s * noise_factor * g).to(grad.dtype) if need_deps else grad.new_empty(0)
    return dz0, deps


def _embed_backward_reference(dz0, dxt, tokens, weight, t, ln_weight, has_ln_bias, schedule, ln_eps):
    """(dweight, dln_weight fp32, dln_bias fp32) of embed_and_noise, from the output gradients."""
    D = weight.shape[-1]
    a, _ = alpha_sigma(_expand_t(t, dxt), schedule)
    dz = a * dxt.float()
    if dz0 is not None:
        dz = dz + dz0.float()
    dz = dz.reshape(-1, D)
    rows = weight[tokens.reshape(-1)].float()
    mean = rows.mean(-1, keepdim=True)
    rstd = torch.rsqrt(rows.var(-1, unbiased=False, keepdim=True) + ln_eps)
    xhat = (rows - mean) * rstd
    wdz = dz if ln_weight is None else dz * ln_weight.float()
    drow = (wdz - xhat * (wdz * xhat).mean(-1, keepdim=True) - wdz.mean(-1, keepdim=True)) * rstd
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    dweight.index_add_(0, tokens.reshape(-1), drow)
    dlnw = (dz * xhat).sum(0) if ln_weight is not None else weight.new_empty(0, dtype=torch.float32)
    dlnb = dz.sum(0) if has_ln_bias else weight.new_empty(0, dtype=torch.float32)
    return dweight.to(weight.dtype), dlnw, dlnb


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:
    _SQRT_SHIFT = tl.constexpr(_schedule.SQRT_SHIFT)
    _COSINE_S = tl.constexpr(_schedule.COSINE_S)
    _COSINE_DEN = tl.constexpr(1 + _schedule.COSINE_S)
    _HALF_PI = tl.constexpr(math.pi / 2)
    _COSINE_F0 = tl.constexpr(math.cos(_schedule.COSINE_S / (1 + _schedule.COSINE_S) * math.pi / 2) ** 2)
    _MIN_AB = tl.constexpr(_schedule.MIN_ALPHA_BAR)
    _MAX_AB = tl.constexpr(_schedule.MAX_ALPHA_BAR)

    @triton.jit
    def _alpha_sigma(t, SCHEDULE: tl.constexpr):
        """alpha(t), sigma(t) in fp32, as fastdiss.schedule.alpha_sigma (same clamps)."""
        t = tl.minimum(tl.maximum(t, 0.0), 1.0)
        if SCHEDULE == 0:    # sqrt: alpha_bar = 1 - sqrt(t + s)
            ab = 1.0 - tl.sqrt(t + _SQRT_SHIFT)
        elif SCHEDULE == 1:  # cosine
            c = tl.cos((t + _COSINE_S) / _COSINE_DEN * _HALF_PI)
            ab = c * c / _COSINE_F0
        else:                # vp-linear: alpha = sqrt(1 - t^2), sigma = t
            ab = 1.0 - t * t
        ab = tl.minimum(tl.maximum(ab, _MIN_AB), _MAX_AB)
        return tl.sqrt(ab), tl.sqrt(1.0 - ab)

    @triton.jit
    def _row_alpha_sigma(T, rows, row_ok, L, SCHEDULE: tl.constexpr, T_PER_TOKEN: tl.constexpr):
        """alpha, sigma of token rows (flattened b * L + l) from t (B,) or (B, L)."""
        if T_PER_TOKEN:
            t_idx = rows
        else:
            t_idx = rows // L
        t = tl.load(T + t_idx, mask=row_ok, other=0.0).to(tl.float32)
        return _alpha_sigma(t, SCHEDULE)

    @triton.jit
    def _q_sample_fwd_kernel(Z0, T, EPS, OUT, n_rows, L, D, noise_factor,
                             SCHEDULE: tl.constexpr, T_PER_TOKEN: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        alpha, sigma = _row_alpha_sigma(T, rows, row_ok, L, SCHEDULE, T_PER_TOKEN)
        a = alpha[:, None]
        s = (sigma * noise_factor)[:, None]
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            offs = rows[:, None] * D + cols[None, :]
            z = tl.load(Z0 + offs, mask=mask, other=0.0).to(tl.float32)
            e = tl.load(EPS + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(OUT + offs, (a * z + s * e).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _q_sample_bwd_kernel(G, T, DZ0, DEPS, n_rows, L, D, noise_factor,
                             SCHEDULE: tl.constexpr, T_PER_TOKEN: tl.constexpr,
                             NEED_DZ0: tl.constexpr, NEED_DEPS: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        alpha, sigma = _row_alpha_sigma(T, rows, row_ok, L, SCHEDULE, T_PER_TOKEN)
        a = alpha[:, None]
        s = (sigma * noise_factor)[:, None]
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            offs = rows[:, None] * D + cols[None, :]
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
            if NEED_DZ0:
                tl.store(DZ0 + offs, (a * g).to(DZ0.dtype.element_ty), mask=mask)
            if NEED_DEPS:
                tl.store(DEPS + offs, (s * g).to(DEPS.dtype.element_ty), mask=mask)

    @triton.jit
    def _embed_noise_fwd_kernel(TOK, E, LNW, LNB, T, EPS, Z0, XT, n_rows, L, V, D, ln_eps, noise_factor,
                                SCHEDULE: tl.constexpr, T_PER_TOKEN: tl.constexpr,
                                HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
                                ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        tok = tl.load(TOK + rows, mask=row_ok, other=0).to(tl.int64)
        tok_ok = row_ok & (tok >= 0) & (tok < V)  # out-of-range ids read zeros, never fault
        x = tl.load(E + tok[:, None] * D + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        mask = row_ok[:, None] & col_ok[None, :]
        mean = tl.sum(x, axis=1) / D
        diff = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / D + ln_eps)
        z = diff * rstd[:, None]
        if HAS_LNW:
            z = z * tl.load(LNW + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_LNB:
            z = z + tl.load(LNB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        z_out = z.to(Z0.dtype.element_ty)
        tl.store(Z0 + offs, z_out, mask=mask)
        alpha, sigma = _row_alpha_sigma(T, rows, row_ok, L, SCHEDULE, T_PER_TOKEN)
        e = tl.load(EPS + offs, mask=mask, other=0.0).to(tl.float32)
        xt = alpha[:, None] * z_out.to(tl.float32) + (sigma * noise_factor)[:, None] * e  # noise the stored z0
        tl.store(XT + offs, xt.to(XT.dtype.element_ty), mask=mask)

    @triton.jit
    def _embed_ln_bwd_kernel(DZ0, DXT, T, PERM, SEG, E, LNW, DE, DLNW_part, DLNB_part,
                             V, L, D, vocab_per_program, ln_eps,
                             SCHEDULE: tl.constexpr, T_PER_TOKEN: tl.constexpr, HAS_DZ0: tl.constexpr,
                             HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        if HAS_LNW:
            w = tl.load(LNW + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        v_first = pid.to(tl.int64) * vocab_per_program
        for i in range(0, vocab_per_program):
            v = v_first + i
            v_ok = v < V
            seg_lo = tl.load(SEG + v, mask=v_ok, other=0)
            seg_hi = tl.load(SEG + v + 1, mask=v_ok, other=0)
            # sum dz = dz0 + alpha dx_t over this entry's tokens, in sorted (deterministic) order
            g = tl.zeros([BLOCK_D], dtype=tl.float32)
            for j in range(seg_lo, seg_hi):
                r = tl.load(PERM + j)
                if T_PER_TOKEN:
                    t_idx = r
                else:
                    t_idx = r // L
                alpha, _ = _alpha_sigma(tl.load(T + t_idx).to(tl.float32), SCHEDULE)
                gz = alpha * tl.load(DXT + r * D + cols, mask=col_ok, other=0.0).to(tl.float32)
                if HAS_DZ0:
                    gz += tl.load(DZ0 + r * D + cols, mask=col_ok, other=0.0).to(tl.float32)
                g += gz
            # LayerNorm backward of row v (statistics recomputed from E[v])
            x = tl.load(E + v * D + cols, mask=col_ok & v_ok, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / D
            diff = tl.where(col_ok, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + ln_eps)
            xhat = diff * rstd
            wg = g
            if HAS_LNW:
                wg = g * w
            c1 = tl.sum(xhat * wg, axis=0) / D
            c2 = tl.sum(wg, axis=0) / D
            dx = (wg - (xhat * c1 + c2)) * rstd
            tl.store(DE + v * D + cols, dx.to(DE.dtype.element_ty), mask=col_ok & v_ok)
            if HAS_LNW:
                dw_acc += g * xhat
            if HAS_LNB:
                db_acc += g
        part = pid.to(tl.int64) * D + cols
        if HAS_LNW:
            tl.store(DLNW_part + part, dw_acc, mask=col_ok)
        if HAS_LNB:
            tl.store(DLNB_part + part, db_acc, mask=col_ok)


def aot_specs():
    """(name, kernel, signature, constexprs, options) for ahead-of-time compilation checks: each
    schedule once and each kernel in a representative dtype, with the launcher's warps."""
    if not HAS_TRITON:
        return []
    specs = []
    for dt, sched, per_token in (("fp32", 0, False), ("bf16", 1, True), ("fp16", 2, True)):
        sig = {"Z0": f"*{dt}", "T": "*fp32", "EPS": f"*{dt}", "OUT": f"*{dt}", "n_rows": "i32", "L": "i32",
               "D": "i32", "noise_factor": "fp32", "SCHEDULE": "constexpr", "T_PER_TOKEN": "constexpr",
               "ROWS": "constexpr", "BLOCK_D": "constexpr"}
        specs.append((f"q_sample_fwd_{dt}_{_schedule.SCHEDULES[sched]}", _q_sample_fwd_kernel, sig,
                      {"SCHEDULE": sched, "T_PER_TOKEN": per_token, "ROWS": 32, "BLOCK_D": 128},
                      {"num_warps": num_warps_for(32 * 128)}))
    dt = "bf16"
    sig = {"G": f"*{dt}", "T": "*fp32", "DZ0": f"*{dt}", "DEPS": f"*{dt}", "n_rows": "i32", "L": "i32",
           "D": "i32", "noise_factor": "fp32", "SCHEDULE": "constexpr", "T_PER_TOKEN": "constexpr",
           "NEED_DZ0": "constexpr", "NEED_DEPS": "constexpr", "ROWS": "constexpr", "BLOCK_D": "constexpr"}
    specs.append((f"q_sample_bwd_{dt}", _q_sample_bwd_kernel, sig,
                  {"SCHEDULE": 1, "T_PER_TOKEN": True, "NEED_DZ0": True, "NEED_DEPS": True,
                   "ROWS": 16, "BLOCK_D": 256}, {"num_warps": num_warps_for(16 * 256)}))
    sig = {"TOK": "*i64", "E": f"*{dt}", "LNW": "*fp32", "LNB": "*fp32", "T": "*fp32", "EPS": f"*{dt}",
           "Z0": f"*{dt}", "XT": f"*{dt}", "n_rows": "i32", "L": "i32", "V": "i32", "D": "i32",
           "ln_eps": "fp32", "noise_factor": "fp32", "SCHEDULE": "constexpr", "T_PER_TOKEN": "constexpr",
           "HAS_LNW": "constexpr", "HAS_LNB": "constexpr", "ROWS": "constexpr", "BLOCK_D": "constexpr"}
    specs.append((f"embed_noise_fwd_{dt}", _embed_noise_fwd_kernel, sig,
                  {"SCHEDULE": 0, "T_PER_TOKEN": True, "HAS_LNW": True, "HAS_LNB": True,
                   "ROWS": 32, "BLOCK_D": 128}, {"num_warps": num_warps_for(32 * 128)}))
    sig = {"DZ0": f"*{dt}", "DXT": f"*{dt}", "T": "*fp32", "PERM": "*i64", "SEG": "*i64", "E": f"*{dt}",
           "LNW": "*fp32", "DE": f"*{dt}", "DLNW_part": "*fp32", "DLNB_part": "*fp32", "V": "i32", "L": "i32",
           "D": "i32", "vocab_per_program": "i32", "ln_eps": "fp32", "SCHEDULE": "constexpr",
           "T_PER_TOKEN": "constexpr", "HAS_DZ0": "constexpr", "HAS_LNW": "constexpr",
           "HAS_LNB": "constexpr", "BLOCK_D": "constexpr"}
    specs.append((f"embed_ln_bwd_{dt}", _embed_ln_bwd_kernel, sig,
                  {"SCHEDULE": 1, "T_PER_TOKEN": False, "HAS_DZ0": True, "HAS_LNW": True, "HAS_LNB": True,
                   "BLOCK_D": 128}, {"num_warps": _embed_bwd_warps(128)}))
    return specs


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _embed_bwd_warps(block_d: int) -> int:
    return 1 if block_d <= 256 else (4 if block_d <= 2048 else 8)


def _tile(D: int, block_rows: Optional[int], whole_row: bool):
    """(ROWS, BLOCK_D, num_warps); whole_row keeps the full row in one tile (the LayerNorm)."""
    block_d = next_pow2(D) if whole_row else min(next_pow2(D), 1024)
    rows = block_rows if block_rows is not None else max(1, min(_MAX_ROWS, _TILE_ELEMS // block_d))
    if rows & (rows - 1):
        raise ValueError(f"block_rows must be a power of two, got {rows}")
    return rows, block_d, num_warps_for(rows * block_d)


def _t_layout(t):
    """(t contiguous, per_token flag) for t of shape (B,) or (B, L)."""
    return t.contiguous(), t.dim() == 2


def q_sample_forward_triton(z0, t, eps, schedule: str, noise_factor: float, block_rows: Optional[int] = None):
    B, L, D = z0.shape
    z0, eps = z0.contiguous(), eps.contiguous()
    t, per_token = _t_layout(t)
    out = torch.empty_like(z0)
    n_rows = B * L
    if n_rows == 0 or D == 0:
        return out
    rows, block_d, warps = _tile(D, block_rows, whole_row=False)
    _q_sample_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        z0, t, eps, out, n_rows, L, D, float(noise_factor),
        SCHEDULE=_SCHEDULE_ID[schedule], T_PER_TOKEN=per_token, ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return out


def q_sample_backward_triton(grad, t, schedule: str, noise_factor: float, need_dz0: bool = True,
                             need_deps: bool = True, block_rows: Optional[int] = None):
    """(dz0, deps) = (alpha g, sigma F g); an output not asked for is an empty tensor."""
    B, L, D = grad.shape
    grad = grad.contiguous()
    t, per_token = _t_layout(t)
    dz0 = torch.empty_like(grad) if need_dz0 else grad.new_empty(0)
    deps = torch.empty_like(grad) if need_deps else grad.new_empty(0)
    n_rows = B * L
    if n_rows == 0 or D == 0 or not (need_dz0 or need_deps):
        return dz0, deps
    rows, block_d, warps = _tile(D, block_rows, whole_row=False)
    _q_sample_bwd_kernel[(triton.cdiv(n_rows, rows),)](
        grad, t, dz0 if need_dz0 else grad, deps if need_deps else grad, n_rows, L, D, float(noise_factor),
        SCHEDULE=_SCHEDULE_ID[schedule], T_PER_TOKEN=per_token, NEED_DZ0=need_dz0, NEED_DEPS=need_deps,
        ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return dz0, deps


def _check_token_range(tokens, V):
    if tokens.device.type == "cpu" and tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"tokens must be ids in [0, {V}) (the rows of weight), got values in [{lo}, {hi}]")


def embed_and_noise_forward_triton(tokens, weight, t, eps, ln_weight, ln_bias, schedule: str,
                                   noise_factor: float, ln_eps: float, block_rows: Optional[int] = None):
    B, L = tokens.shape
    V, D = weight.shape
    if D > MAX_FUSED_D:
        raise ValueError(f"embed_and_noise kernel: embedding dim {D} exceeds MAX_FUSED_D={MAX_FUSED_D}")
    _check_token_range(tokens, V)
    tokens, weight, eps = tokens.contiguous(), weight.contiguous(), eps.contiguous()
    t, per_token = _t_layout(t)
    z0 = torch.empty(B, L, D, dtype=weight.dtype, device=weight.device)
    xt = torch.empty_like(z0)
    n_rows = B * L
    if n_rows == 0:
        return z0, xt
    rows, block_d, warps = _tile(D, block_rows, whole_row=True)
    _embed_noise_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        tokens, weight, ln_weight if ln_weight is not None else weight, ln_bias if ln_bias is not None else weight,
        t, eps, z0, xt, n_rows, L, V, D, float(ln_eps), float(noise_factor),
        SCHEDULE=_SCHEDULE_ID[schedule], T_PER_TOKEN=per_token,
        HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None,
        ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return z0, xt


def embed_and_noise_backward_triton(dz0, dxt, tokens, weight, t, ln_weight, has_ln_bias: bool, schedule: str,
                                    ln_eps: float, num_programs: Optional[int] = None):
    """(dweight, dln_weight, dln_bias) from the gradients of z0 (or None) and x_t.
    dln_* are fp32 (the caller casts) and empty when the parameter is absent."""
    B, L = tokens.shape
    V, D = weight.shape
    if D > MAX_FUSED_D:
        raise ValueError(f"embed_and_noise kernel: embedding dim {D} exceeds MAX_FUSED_D={MAX_FUSED_D}")
    weight, dxt = weight.contiguous(), dxt.contiguous()
    dz0 = dz0.contiguous() if dz0 is not None else None
    t, per_token = _t_layout(t)
    flat = tokens.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    seg = torch.searchsorted(sorted_ids, torch.arange(V + 1, device=flat.device, dtype=sorted_ids.dtype))
    programs = max(1, min(V, num_programs or max_programs(weight.device, 16)))
    vocab_per_program = max(1, triton.cdiv(V, programs))
    programs = triton.cdiv(V, vocab_per_program)
    dweight = torch.empty_like(weight)
    # every program writes its whole partial row, so the buffers need no zeroing
    dlnw_part = torch.empty(programs if ln_weight is not None else 0, D, dtype=torch.float32, device=weight.device)
    dlnb_part = torch.empty(programs if has_ln_bias else 0, D, dtype=torch.float32, device=weight.device)
    block_d = next_pow2(D)
    if programs:
        _embed_ln_bwd_kernel[(programs,)](
            dz0 if dz0 is not None else dxt, dxt, t, perm, seg, weight, ln_weight if ln_weight is not None else weight,
            dweight, dlnw_part if ln_weight is not None else dweight, dlnb_part if has_ln_bias else dweight,
            V, L, D, vocab_per_program, float(ln_eps),
            SCHEDULE=_SCHEDULE_ID[schedule], T_PER_TOKEN=per_token, HAS_DZ0=dz0 is not None,
            HAS_LNW=ln_weight is not None, HAS_LNB=has_ln_bias, BLOCK_D=block_d,
            num_warps=_embed_bwd_warps(block_d))
    dlnw = dlnw_part.sum(0) if ln_weight is not None else dlnw_part.new_empty(0)
    dlnb = dlnb_part.sum(0) if has_ln_bias else dlnb_part.new_empty(0)
    return dweight, dlnw, dlnb


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------

def _q_sample_fwd_fake(z0, t, eps, schedule, noise_factor):
    return torch.empty_like(z0)


def _q_sample_bwd_fake(grad, t, schedule, noise_factor, need_dz0, need_deps):
    return (torch.empty_like(grad) if need_dz0 else grad.new_empty(0),
            torch.empty_like(grad) if need_deps else grad.new_empty(0))


def _q_sample_setup_context(ctx, inputs, output):
    z0, t, eps, schedule, noise_factor = inputs
    ctx.save_for_backward(t)
    ctx.schedule, ctx.noise_factor = schedule, noise_factor


def _q_sample_backward(ctx, grad):
    """(dz0, None, deps, None, None)."""
    (t,) = ctx.saved_tensors
    need_dz0, _, need_deps = ctx.needs_input_grad[:3]
    dz0, deps = q_sample_bwd(grad, t, ctx.schedule, ctx.noise_factor, need_dz0, need_deps, eager=ctx.eager)
    return (dz0 if need_dz0 else None), None, (deps if need_deps else None), None, None


def _embed_and_noise_forward_reference(tokens, weight, t, eps, ln_weight, ln_bias, schedule, noise_factor, ln_eps):
    _check_token_range(tokens, weight.shape[0])
    return embed_and_noise_reference(tokens, weight, t, eps, ln_weight, ln_bias, schedule, noise_factor, ln_eps)


def _embed_fwd_fake(tokens, weight, t, eps, ln_weight, ln_bias, schedule, noise_factor, ln_eps):
    shape = (*tokens.shape, weight.shape[-1])
    return weight.new_empty(shape), weight.new_empty(shape)


def _embed_bwd_fake(dz0, dxt, tokens, weight, t, ln_weight, has_ln_bias, schedule, ln_eps):
    D = weight.shape[-1]
    return (torch.empty_like(weight), weight.new_empty(D if ln_weight is not None else 0, dtype=torch.float32),
            weight.new_empty(D if has_ln_bias else 0, dtype=torch.float32))


def _embed_setup_context(ctx, inputs, output):
    tokens, weight, t, eps, ln_weight, ln_bias, schedule, noise_factor, ln_eps = inputs
    ctx.save_for_backward(tokens, weight, t, ln_weight)
    ctx.has_ln_bias = ln_bias is not None
    ctx.ln_dtypes = (None if ln_weight is None else ln_weight.dtype, None if ln_bias is None else ln_bias.dtype)
    ctx.schedule, ctx.noise_factor, ctx.ln_eps = schedule, noise_factor, ln_eps
    ctx.set_materialize_grads(False)  # an unused z0 gets None, not a tensor of zeros to read


def _embed_backward(ctx, dz0, dxt):
    """Gradients of all nine inputs."""
    tokens, weight, t, ln_weight = ctx.saved_tensors
    if dxt is None:  # only z0 was used
        dxt = weight.new_zeros((*tokens.shape, weight.shape[-1]))
    _, need_weight, _, need_eps, need_lnw, need_lnb = ctx.needs_input_grad[:6]
    deps = None
    if need_eps:
        _, deps = q_sample_bwd(dxt, t, ctx.schedule, ctx.noise_factor, False, True, eager=ctx.eager)
    dweight = dlnw = dlnb = None
    if need_weight or need_lnw or need_lnb:
        dweight, dlnw, dlnb = embed_and_noise_bwd(dz0, dxt, tokens, weight, t, ln_weight, ctx.has_ln_bias,
                                                  ctx.schedule, ctx.ln_eps, eager=ctx.eager)
        dweight = dweight if need_weight else None
        dlnw = dlnw.to(ctx.ln_dtypes[0]) if need_lnw else None
        dlnb = dlnb.to(ctx.ln_dtypes[1]) if need_lnb else None
    return None, dweight, None, deps, dlnw, dlnb, None, None, None


q_sample_bwd = FusedOp(
    "q_sample_bwd", "(Tensor grad, Tensor t, str schedule, float noise_factor, bool need_dz0, bool need_deps)"
    " -> (Tensor, Tensor)",
    kernel=q_sample_backward_triton, reference=_q_sample_backward_reference, fake=_q_sample_bwd_fake)
q_sample_fwd = FusedOp(
    "q_sample_fwd", "(Tensor z0, Tensor t, Tensor eps, str schedule, float noise_factor) -> Tensor",
    kernel=q_sample_forward_triton, reference=q_sample_reference, fake=_q_sample_fwd_fake,
).differentiable(_q_sample_setup_context, _q_sample_backward)
embed_and_noise_bwd = FusedOp(
    "embed_and_noise_bwd", "(Tensor? dz0, Tensor dxt, Tensor tokens, Tensor weight, Tensor t, Tensor? ln_weight, "
    "bool has_ln_bias, str schedule, float ln_eps) -> (Tensor, Tensor, Tensor)",
    kernel=embed_and_noise_backward_triton, reference=_embed_backward_reference, fake=_embed_bwd_fake, device_arg=3)
embed_and_noise_fwd = FusedOp(
    "embed_and_noise_fwd", "(Tensor tokens, Tensor weight, Tensor t, Tensor eps, Tensor? ln_weight, Tensor? ln_bias, "
    "str schedule, float noise_factor, float ln_eps) -> (Tensor, Tensor)",
    kernel=embed_and_noise_forward_triton, reference=_embed_and_noise_forward_reference, fake=_embed_fwd_fake,
    device_arg=1,
).differentiable(_embed_setup_context, _embed_backward)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _check_scalars(schedule, noise_factor, **nonneg):
    check_schedule(schedule)
    if isinstance(noise_factor, bool) or not isinstance(noise_factor, numbers.Real):
        raise TypeError(f"noise_factor must be a real number, got {type(noise_factor).__name__} {noise_factor!r}")
    for name, v in nonneg.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
            raise ValueError(f"{name} must be a non-negative real number, got {v!r}")


def _check_t(t, B, L, device):
    check_tensor("t", t, ndim=(1, 2), dtypes=FLOAT_DTYPES + (torch.float64,), device=device)
    if tuple(t.shape) not in ((B,), (B, L)):
        raise ValueError(f"t must have shape ({B},) (per sequence) or ({B}, {L}) (per token), got {tuple(t.shape)}")


def q_sample(z0, t, eps, schedule="sqrt", noise_factor=1.0):
    """x_t = alpha(t) z0 + sigma(t) * noise_factor * eps for z0, eps (B, L, D) and t (B,) or (B, L).
    Differentiable in z0 and eps; t gets no gradient."""
    check_tensor("z0", z0, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, D = z0.shape
    _check_t(t, B, L, z0.device)
    check_tensor("eps", eps, dtypes=(z0.dtype,), device=z0.device)
    if eps.shape != z0.shape:
        raise ValueError(f"eps must have the shape of z0 {tuple(z0.shape)}, got {tuple(eps.shape)}")
    _check_scalars(schedule, noise_factor)
    if not _backend.use_kernels(z0):
        return q_sample_reference(z0, t.detach(), eps, schedule, noise_factor)
    return q_sample_fwd.apply(z0, t.detach(), eps, schedule, float(noise_factor))


def embed_and_noise(tokens, weight, t, eps, ln_weight=None, ln_bias=None, schedule="sqrt",
                    noise_factor=1.0, ln_eps=1e-5):
    """(z0, x_t): z0 = LayerNorm(weight[tokens]) (B, L, D), x_t = q_sample(z0, t, eps).
    Differentiable in weight, ln_weight, ln_bias and eps; t gets no gradient."""
    check_tensor("tokens", tokens, ndim=2, dtypes=(torch.int64,))
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=tokens.device)
    B, L = tokens.shape
    V, D = weight.shape
    _check_t(t, B, L, weight.device)
    check_tensor("eps", eps, dtypes=(weight.dtype,), device=weight.device)
    if tuple(eps.shape) != (B, L, D):
        raise ValueError(f"eps must have shape ({B}, {L}, {D}) (tokens' shape + embedding dim), got {tuple(eps.shape)}")
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p is not None:
            check_tensor(name, p, dtypes=FLOAT_DTYPES, device=weight.device)
            if tuple(p.shape) != (D,):
                raise ValueError(f"{name} must have shape ({D},) (the embedding dim), got {tuple(p.shape)}")
    _check_scalars(schedule, noise_factor, ln_eps=ln_eps)
    if not _backend.use_kernels(weight) or D > MAX_FUSED_D:
        return embed_and_noise_reference(tokens, weight, t.detach(), eps, ln_weight, ln_bias, schedule, noise_factor,
                                         ln_eps)
    return embed_and_noise_fwd.apply(tokens, weight, t.detach(), eps, ln_weight, ln_bias, schedule,
                                     float(noise_factor), float(ln_eps))
