"""Rounding cross-entropy: CE(x0_hat @ embedding^T, targets) without the (tokens x vocab) logits.

The diffusion LM rounds its predicted clean embeddings x0_hat to tokens through logits against the
(normalised) embedding table. With 32k tokens per batch and an 8k vocabulary the fp32 logits alone
are 1 GiB, and F.cross_entropy keeps a second copy for backward. Here nothing of size tokens x vocab
ever exists:

- forward (Triton): one program per (block of tokens, slice of the vocabulary) streams vocabulary
  tiles, computes the logits tile with tl.dot and folds it into an online logsumexp in fp32. The
  per-slice results are merged with one small logsumexp; only `lse` (fp32, per token) is saved.
  The target logit is a (tokens x d) gather, done in PyTorch.
- backward: per vocabulary chunk of W columns, a Triton kernel recomputes the logits tile and writes
  dlogits = (softmax - onehot) * dloss into an (tokens x W) buffer; two cuBLAS matmuls then give
  dx += dlogits @ E[chunk] and dE[chunk] = dlogits^T @ x. Each vocabulary row of dE is written
  exactly once, so there are no atomics and the result is deterministic. Peak extra memory is
  O(tokens x W), with W picked so that buffer stays near 2^24 elements.

The CPU kernel is the same chunked algorithm in PyTorch (memory-bounded too);
`rounding_cross_entropy_reference` is the plain full-logits version used as the oracle and by the
'torch' backend.

Ops: torch.ops.fastdiss.rounding_ce_fwd(x, E, targets, ignore_index, chunk_size) -> (loss, lse),
     torch.ops.fastdiss.rounding_ce_bwd(grad_loss, x, E, targets, lse, ignore_index, chunk_size)
     -> (dx, dE), registered by FusedOp (kernels/_op.py). `loss` is per token (fp32, 0 where
     ignored); reductions happen in PyTorch on top.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend
from ._op import FusedOp
from ._utils import FLOAT_DTYPES, HAS_TRITON, check_tensor

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["rounding_cross_entropy", "rounding_cross_entropy_reference", "aot_specs"]

REDUCTIONS = ("mean", "sum", "none")
_CHUNK_BUDGET = 1 << 24  # elements of the (tokens x chunk) dlogits buffer / CPU logits chunk


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _logits_tile(X, E, rows, cols, row_mask, col_mask, D, stride_xn, stride_en,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """fp32 (BLOCK_M, BLOCK_N) tile of X[rows] @ E[cols]^T, looping over the model dim."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xn
        e_ptrs = E + cols.to(tl.int64)[None, :] * stride_en
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            x = tl.load(x_ptrs + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            e = tl.load(e_ptrs + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:  # the interpreter's dot is wrong for bf16
                x = x.to(tl.float32)
                e = e.to(tl.float32)
            acc = tl.dot(x, e, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _ce_lse_fwd_kernel(X, E, LSE_PART, N, V, D, stride_xn, stride_en, cols_per_split,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """LSE_PART[split, row] = logsumexp over this split's vocabulary columns of x[row] . E[col]."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        v_lo = pid_s * cols_per_split
        v_hi = tl.minimum(v_lo + cols_per_split, V)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_N):
            cols = v0 + tl.arange(0, BLOCK_N)
            col_mask = cols < v_hi
            logits = _logits_tile(X, E, rows, cols, row_mask, col_mask, D, stride_xn, stride_en,
                                  BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
            logits = tl.where(col_mask[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))  # finite: every tile has a valid column
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m_i = m_new
        tl.store(LSE_PART + pid_s.to(tl.int64) * N + rows, m_i + tl.log(s_i), mask=row_mask)

    @triton.jit
    def _ce_dlogits_kernel(X, E, LSE, TGT, SCALE, DL, N, V, D, v_start, width,
                           stride_xn, stride_en, stride_dl,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """DL[row, j] = (softmax(logits)[row, v_start + j] - onehot) * SCALE[row] for j < width."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = v_start + local
        col_mask = (local < width) & (cols < V)
        logits = _logits_tile(X, E, rows, cols, row_mask, col_mask, D, stride_xn, stride_en,
                              BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
        scale = tl.load(SCALE + rows, mask=row_mask, other=0.0)  # 0 for ignored tokens
        tgt = tl.load(TGT + rows, mask=row_mask, other=-1)
        p = tl.exp(logits - lse[:, None])
        onehot = tl.where(cols.to(tl.int64)[None, :] == tgt[:, None], 1.0, 0.0)
        dl = (p - onehot) * scale[:, None]
        ptrs = DL + rows.to(tl.int64)[:, None] * stride_dl + local[None, :]
        tl.store(ptrs, dl.to(DL.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _gpu_config(dtype: torch.dtype) -> dict:
    """GEMM-sized tiles; fp32 uses BLOCK_K=32 so 3 pipeline stages fit A100's shared memory."""
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32 if dtype == torch.float32 else 64,
                num_warps=8, num_stages=3)


def _config(dtype: torch.dtype) -> dict:
    """Tiny tiles under the interpreter (its cost is per program step), else the GPU tiles."""
    if _backend.interpreter_enabled():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    return _gpu_config(dtype)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting (tf32 only if the user allowed it)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _auto_chunk(n_tokens: int, vocab: int, multiple: int) -> int:
    """Vocabulary chunk width so the (tokens x chunk) buffer stays near _CHUNK_BUDGET elements."""
    width = max(multiple, min(vocab, _CHUNK_BUDGET // max(n_tokens, 1)))
    width = -(-width // multiple) * multiple
    return min(width, -(-vocab // multiple) * multiple)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _target_logits(x: torch.Tensor, embedding: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """x[i] . E[targets[i]] in fp32 (ignored targets are clamped; their loss is zeroed later)."""
    rows = embedding[targets.clamp(0, embedding.shape[0] - 1)]
    return (x.float() * rows.float()).sum(-1)


def _triton_forward(x, embedding, targets, ignore_index: int, chunk_size: int = 0, num_splits: int | None = None):
    """(loss per token, lse per token), both fp32 (N,). `chunk_size` is the backward's (the forward
    streams the whole vocabulary); `num_splits` overrides the vocab split."""
    N, D = x.shape
    V = embedding.shape[0]
    cfg = _config(x.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if N == 0:
        z = x.new_zeros(0, dtype=torch.float32)
        return z, z.clone()
    grid_m = triton.cdiv(N, bm)
    n_tiles = triton.cdiv(V, bn)
    if num_splits is None:  # enough programs to fill the GPU twice over
        num_splits = min(n_tiles, max(1, triton.cdiv(2 * _num_sms(x.device), grid_m)))
    cols_per_split = triton.cdiv(n_tiles, max(1, min(int(num_splits), n_tiles))) * bn
    num_splits = triton.cdiv(V, cols_per_split)  # every split non-empty
    lse_part = torch.empty(num_splits, N, device=x.device, dtype=torch.float32)
    _ce_lse_fwd_kernel[(grid_m, num_splits)](
        x, embedding, lse_part, N, V, D, x.stride(0), embedding.stride(0), cols_per_split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], UPCAST=_backend.interpreter_enabled(),
        PRECISION=_precision(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    lse = lse_part[0] if num_splits == 1 else torch.logsumexp(lse_part, dim=0)
    loss = torch.where(targets != ignore_index, lse - _target_logits(x, embedding, targets), 0.0)
    return loss, lse


def _token_scale(grad_loss, targets, ignore_index: int) -> torch.Tensor:
    return torch.where(targets != ignore_index, grad_loss.float(), 0.0).contiguous()


def _triton_backward(grad_loss, x, embedding, targets, lse, ignore_index: int, chunk_size: int):
    N, D = x.shape
    V = embedding.shape[0]
    dE = torch.empty_like(embedding)
    if N == 0:
        return torch.zeros_like(x), dE.zero_()
    cfg = _config(x.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    width = _auto_chunk(N, V, bn) if chunk_size <= 0 else -(-chunk_size // bn) * bn
    scale = _token_scale(grad_loss, targets, ignore_index)
    dl_buf = torch.empty(N, min(width, -(-V // bn) * bn), device=x.device, dtype=x.dtype)
    dx = torch.zeros(N, D, device=x.device, dtype=torch.float32)
    for v0 in range(0, V, width):
        w = min(width, V - v0)
        _ce_dlogits_kernel[(triton.cdiv(N, bm), triton.cdiv(w, bn))](
            x, embedding, lse, targets, scale, dl_buf, N, V, D, v0, w,
            x.stride(0), embedding.stride(0), dl_buf.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], UPCAST=_backend.interpreter_enabled(),
            PRECISION=_precision(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        dl = dl_buf[:, :w]
        e_chunk = embedding[v0:v0 + w]
        if dx.dtype == x.dtype:
            dx.addmm_(dl, e_chunk)
        else:
            dx += torch.mm(dl, e_chunk)
        torch.mm(dl.t(), x, out=dE[v0:v0 + w])
    return dx.to(x.dtype), dE


# ----------------------------------------------------------------------------------------------
# PyTorch: chunked CPU kernel (memory-bounded, same algorithm) and the plain reference
# ----------------------------------------------------------------------------------------------
def _chunked_forward(x, embedding, targets, ignore_index: int, chunk_size: int):
    N = x.shape[0]
    V = embedding.shape[0]
    width = _auto_chunk(N, V, 1) if chunk_size <= 0 else chunk_size
    xf = x.float()
    m = torch.full((N,), float("-inf"), dtype=torch.float32, device=x.device)
    s = torch.zeros(N, dtype=torch.float32, device=x.device)
    for v0 in range(0, V, width):
        logits = xf @ embedding[v0:v0 + width].float().t()
        m_new = torch.maximum(m, logits.amax(dim=1))
        s = s * torch.exp(m - m_new) + torch.exp(logits - m_new[:, None]).sum(dim=1)
        m = m_new
    lse = m + torch.log(s)
    loss = torch.where(targets != ignore_index, lse - _target_logits(x, embedding, targets), 0.0)
    return loss, lse


def _chunked_backward(grad_loss, x, embedding, targets, lse, ignore_index: int, chunk_size: int):
    N, D = x.shape
    V = embedding.shape[0]
    width = _auto_chunk(N, V, 1) if chunk_size <= 0 else chunk_size
    scale = _token_scale(grad_loss, targets, ignore_index)
    xf = x.float()
    dx = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    dE = torch.empty_like(embedding)
    cols = torch.arange(width, device=x.device)
    for v0 in range(0, V, width):
        e_chunk = embedding[v0:v0 + width].float()
        w = e_chunk.shape[0]
        dl = torch.exp(xf @ e_chunk.t() - lse[:, None])
        dl -= (targets[:, None] == v0 + cols[None, :w]).float()
        dl *= scale[:, None]
        dx.addmm_(dl, e_chunk)
        dE[v0:v0 + w] = (dl.t() @ xf).to(embedding.dtype)
    return dx.to(x.dtype), dE


def rounding_cross_entropy_reference(x0_hat, embedding, targets, ignore_index=-100, reduction="mean"):
    """Full logits + F.cross_entropy in fp32 (or float64 for float64 inputs): the test oracle and
    the 'torch' backend. Same conventions as the fused op: fp32 loss, 'mean' over non-ignored
    tokens and 0 (not NaN) when every token is ignored."""
    dtype = torch.float64 if x0_hat.dtype == torch.float64 else torch.float32
    logits = x0_hat.reshape(-1, x0_hat.shape[-1]).to(dtype) @ embedding.to(dtype).t()
    t = targets.reshape(-1)
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none")
    return _reduce(loss, t, ignore_index, reduction, targets.shape)


def _reduce(loss, targets, ignore_index, reduction, shape):
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------
def _forward_fake(x, embedding, targets, ignore_index, chunk_size):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


def _backward_fake(grad_loss, x, embedding, targets, lse, ignore_index, chunk_size):
    return torch.empty_like(x), torch.empty_like(embedding)


def _setup_context(ctx, inputs, output):
    x, embedding, targets, ignore_index, chunk_size = inputs
    _, lse = output
    ctx.save_for_backward(x, embedding, targets, lse)
    ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_loss, _grad_lse):
    """(dx, dE, None, None, None)."""
    x, embedding, targets, lse = ctx.saved_tensors
    dx, dE = rounding_ce_bwd(grad_loss, x, embedding, targets, lse, ctx.ignore_index, ctx.chunk_size, eager=ctx.eager)
    return dx, dE, None, None, None


rounding_ce_bwd = FusedOp(
    "rounding_ce_bwd", "(Tensor grad_loss, Tensor x, Tensor embedding, Tensor targets, Tensor lse, int ignore_index, "
    "int chunk_size) -> (Tensor, Tensor)",
    kernel=_triton_backward, reference=_chunked_backward, fake=_backward_fake, device_arg=1)
rounding_ce_fwd = FusedOp(
    "rounding_ce_fwd", "(Tensor x, Tensor embedding, Tensor targets, int ignore_index, int chunk_size)"
    " -> (Tensor, Tensor)",
    kernel=_triton_forward, reference=_chunked_forward, fake=_forward_fake,
).differentiable(_setup_context, _backward)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _compute_dtype(x0_hat, embedding) -> torch.dtype:
    """Like F.linear: the autocast dtype when autocast is on, else the wider of the two dtypes."""
    dev = x0_hat.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x0_hat.dtype, embedding.dtype)


def _check_target_range(targets, vocab: int, ignore_index: int) -> None:
    """Eager-only (needs the values): skipped while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling() or targets.numel() == 0:
        return
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"targets must be in [0, {vocab}) (the embedding has {vocab} rows) or equal "
                         f"ignore_index={ignore_index}; got {value}")


def rounding_cross_entropy(x0_hat, embedding, targets, ignore_index=-100, reduction="mean", *,
                           chunk_size=None):
    """Cross-entropy of logits = x0_hat @ embedding.T against `targets`, never forming the logits.

    x0_hat (..., d) float; embedding (V, d) float; targets (...) int64 in [0, V) or ignore_index.
    reduction: 'mean' (over non-ignored tokens; 0 if all are ignored), 'sum' or 'none' (shape of
    targets). The loss is fp32 whatever the input dtype; math runs in the autocast dtype when
    autocast is on, else in the wider input dtype. chunk_size: vocabulary columns per backward
    chunk (None = automatic, about 2^24 / tokens), the knob that bounds memory.
    """
    check_tensor("x0_hat", x0_hat, dtypes=FLOAT_DTYPES)
    check_tensor("embedding", embedding, ndim=2, dtypes=FLOAT_DTYPES, device=x0_hat.device)
    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32), device=x0_hat.device)
    if x0_hat.dim() < 1:
        raise ValueError("x0_hat must have shape (..., d), got a 0-dim tensor")
    d = x0_hat.shape[-1]
    if embedding.shape[1] != d or embedding.shape[0] == 0:
        raise ValueError(f"embedding must have shape (V >= 1, {d}) to match x0_hat (..., {d}); "
                         f"got {tuple(embedding.shape)}")
    if tuple(targets.shape) != tuple(x0_hat.shape[:-1]):
        raise ValueError(f"targets must have shape x0_hat.shape[:-1] = {tuple(x0_hat.shape[:-1])}; "
                         f"got {tuple(targets.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    V = embedding.shape[0]
    _check_target_range(targets, V, ignore_index)

    dtype = _compute_dtype(x0_hat, embedding)
    x = x0_hat.reshape(-1, d).to(dtype).contiguous()
    emb = embedding.to(dtype).contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    if not _backend.use_kernels(x):
        return rounding_cross_entropy_reference(x, emb, t, ignore_index, reduction).reshape(
            targets.shape if reduction == "none" else ())
    loss, _ = rounding_ce_fwd.apply(x, emb, t, ignore_index, chunk_size or 0)
    return _reduce(loss, t, ignore_index, reduction, targets.shape)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs
# ----------------------------------------------------------------------------------------------
def aot_specs() -> list:
    """(name, kernel, signature, constexprs, launch options) for each Triton kernel at the GPU
    tiles the launchers use, per input dtype (fp32 in both tf32 and ieee precision)."""
    if not HAS_TRITON:
        return []
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ty = _TL_NAME[dtype]
        cfg = _gpu_config(dtype)
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        for precision in (("tf32", "ieee") if dtype == torch.float32 else ("tf32",)):
            const = dict(cfg, UPCAST=False, PRECISION=precision)
            tag = f"{ty}_{precision}" if dtype == torch.float32 else ty
            fwd_sig = {"X": f"*{ty}", "E": f"*{ty}", "LSE_PART": "*fp32", "N": "i32", "V": "i32",
                       "D": "i32", "stride_xn": "i32", "stride_en": "i32", "cols_per_split": "i32"}
            bwd_sig = {"X": f"*{ty}", "E": f"*{ty}", "LSE": "*fp32", "TGT": "*i64", "SCALE": "*fp32",
                       "DL": f"*{ty}", "N": "i32", "V": "i32", "D": "i32", "v_start": "i32",
                       "width": "i32", "stride_xn": "i32", "stride_en": "i32", "stride_dl": "i32"}
            for name, fn, sig in (("lse_fwd", _ce_lse_fwd_kernel, fwd_sig),
                                  ("dlogits", _ce_dlogits_kernel, bwd_sig)):
                sig = dict(sig, **{k: "constexpr" for k in const})
                specs.append((f"{name}_{tag}", fn, sig, dict(const), dict(options)))
    return specs
