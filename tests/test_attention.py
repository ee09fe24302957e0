"""Flash attention: Triton launchers under the interpreter and the op layer (dispatch, opcheck, compile).

Accuracy rule (FlashAttention's): against a float64 oracle, our error may be at most twice the error
of plain PyTorch attention computed in the same dtype, plus a small per-dtype atol and one unit of
the dtype's precision relative to the value (the kernel rounds p to the input dtype before P^T dO and
rounds the result once more; on tensors this small PyTorch's max error can happen to be lower).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastdiss
from fastdiss.kernels import attention as A

pytestmark = pytest.mark.interpreter

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the interpreter runs all three (dots upcast to fp32)


# ---------------------------------------------------------------------------------------------- helpers

def make_qkv(B, H, Lq, Lk, D, dtype, layout="bhld", device="cpu"):
    """Random q, k, v; layout "blhd" gives views transposed from (B, L, H, D) like a projection's output."""
    def one(L):
        if layout == "blhd":
            return torch.randn(B, L, H, D, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, H, L, D, device=device).to(dtype)
    return one(Lq), one(Lk), one(Lk)


def make_mask(kind, B, Lk, device="cpu"):
    """None, random padding (~30%), or random padding with batch row 0 fully padded."""
    if kind == "none":
        return None
    mask = torch.rand(B, Lk, device=device) < 0.3
    mask[:, 0] = False  # keep at least one key in the other rows
    if kind == "full_row":
        mask[0] = True
    return mask


def naive_attention(q, k, v, mask, causal, scale):
    """Plain PyTorch attention with every op in the inputs' dtype: the 'PyTorch error' baseline."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = A._keep_mask(q, k, mask, causal)
    if keep is None:
        return torch.matmul(torch.softmax(s, -1), v)
    live = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~live, 0.0)
    return torch.matmul(torch.softmax(s, -1) * live, v)


def grads_of(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def assert_close_to_oracle(name, ours, baseline, oracle, atol):
    """Every element: |ours - oracle| <= 2 * max|baseline - oracle| + atol + eps(dtype) * |oracle|.
    Prints the mismatch count and the worst indices."""
    assert torch.isfinite(ours).all(), f"{name}: {(~torch.isfinite(ours)).sum().item()} non-finite values"
    err = (ours.double() - oracle).abs()
    base = (baseline.double() - oracle).abs().max().item()
    tol = 2 * base + atol + torch.finfo(ours.dtype).eps * oracle.abs()
    bad = err > tol
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        worst = (err - tol).argmax()
        raise AssertionError(f"{name}: {bad.sum().item()}/{err.numel()} elements off; worst err "
                             f"{err.flatten()[worst].item():.3g} > tol {tol.flatten()[worst].item():.3g} "
                             f"(PyTorch same-dtype max err {base:.3g}); first bad indices {idx}")


def check_against_oracle(q, k, v, mask, causal, scale):
    """Run the Triton forward + backward launchers and compare o, lse, dq, dk, dv with the fp64 oracle."""
    dtype = q.dtype
    do = torch.randn(q.shape[:3] + (v.shape[-1],), device=q.device).to(dtype)
    o, lse = A.attention_forward_triton(q, k, v, mask, causal, scale)
    dq, dk, dv = A.attention_backward_triton(do, q, k, v, o, lse, mask, causal, scale)
    assert o.shape == q.shape and o.dtype == dtype and dq.dtype == dtype

    f64 = [t.double() for t in (q, k, v)]
    ref = grads_of(lambda a, b, c: A.attention_reference(a, b, c, mask, causal, scale), *f64, do.double())
    base = grads_of(lambda a, b, c: naive_attention(a, b, c, mask, causal, scale), q, k, v, do)
    for name, ours, b, r in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), base, ref):
        assert_close_to_oracle(name, ours, b, r, ATOL[dtype])

    s = A._scores(*f64[:2], scale, torch.float64)
    keep = A._keep_mask(q, k, mask, causal)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    live = torch.isfinite(lse_ref)
    assert torch.equal(torch.isinf(lse), ~live), "lse must be +inf exactly for rows without keys"
    torch.testing.assert_close(lse[live].double(), lse_ref[live], rtol=1e-5, atol=1e-5)
    if mask is not None and bool(mask.all(1).any()):
        dead = mask.all(1)
        for name, t in (("o", o), ("dq", dq)):
            assert (t[dead] == 0).all(), f"{name} must be exactly 0 for rows whose keys are all padding"


# ---------------------------------------------------------------------------------------------- launchers

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,Lq,Lk,D,mask_kind,layout", [
    (2, 2, 5, 7, 32, "random", "bhld"),       # odd lengths, cross-attention
    (1, 1, 1, 1, 32, "none", "bhld"),         # a single query and key
    (2, 2, 17, 33, 64, "full_row", "blhd"),   # a fully padded row, transposed views, several key blocks
    (2, 1, 33, 17, 64, "none", "blhd"),       # more queries than keys
])
def test_launchers_match_fp64(dtype, B, H, Lq, Lk, D, mask_kind, layout, device):
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype, layout, device)
    check_against_oracle(q, k, v, make_mask(mask_kind, B, Lk, device), False, 1.0 / math.sqrt(D))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,D,mask_kind", [(33, 32, "random"), (17, 64, "none")])
def test_launchers_causal(dtype, L, D, mask_kind, device):
    q, k, v = make_qkv(2, 2, L, L, D, dtype, device=device)
    check_against_oracle(q, k, v, make_mask(mask_kind, 2, L, device), True, 1.0 / math.sqrt(D))


@pytest.mark.parametrize("D,dtype", [(128, torch.bfloat16), (40, torch.float32), (8, torch.float16)], ids=str)
def test_launchers_other_head_dims(D, dtype, device):
    """128 (the largest), and head dims that are padded to a power of two inside the kernel."""
    q, k, v = make_qkv(1, 2, 17, 20, D, dtype, "blhd", device)
    check_against_oracle(q, k, v, make_mask("random", 1, 20, device), False, 0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Lq,Lk,D,causal", [(257, 300, 64, False), (300, 300, 128, True), (1000, 77, 64, False)])
def test_launchers_gpu_sizes(dtype, Lq, Lk, D, causal, device):
    """Real kernels at model-like sizes: many blocks, the GPU block configs, tensor-core dots."""
    q, k, v = make_qkv(3, 4, Lq, Lk, D, dtype, "blhd", device)
    check_against_oracle(q, k, v, make_mask("full_row", 3, Lk, device), causal, 1.0 / math.sqrt(D))


def test_launcher_matches_sdpa_and_keeps_layout(device):
    """Equal to F.scaled_dot_product_attention with the boolean mask ~key_padding_mask; the output of
    (B, L, H, D)-transposed inputs keeps that layout so merging heads back is free."""
    q, k, v = make_qkv(2, 2, 9, 19, 32, torch.float32, "blhd", device)
    mask = make_mask("random", 2, 19, device)
    o, _ = A.attention_forward_triton(q, k, v, mask, False, 1 / math.sqrt(32))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :])
    torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-5)
    assert o.transpose(1, 2).is_contiguous()
    q, k, v = make_qkv(1, 2, 21, 21, 32, torch.float32, device=device)
    o, _ = A.attention_forward_triton(q, k, v, None, True, 1 / math.sqrt(32))
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)
    assert o.is_contiguous()


# ---------------------------------------------------------------------------------------------- op layer

@pytest.fixture
def backend():
    """Set the backend for one test and restore the previous one afterwards."""
    before = fastdiss.get_backend()
    yield fastdiss.set_backend
    fastdiss.set_backend(before)


def test_opcheck_cpu_kernels(backend):
    backend("auto")
    q, k, v = make_qkv(2, 2, 5, 7, 16, torch.float32, "blhd")
    mask = make_mask("full_row", 2, 7)
    for args in ((q, k, v, mask, False, 0.25), (q, k[:, :, :5], v[:, :, :5], None, True, 0.25)):
        fwd_args = tuple(t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
                         else t for t in args)
        torch.library.opcheck(torch.ops.fastdiss.attention_fwd.default, fwd_args)
        o, lse = torch.ops.fastdiss.attention_fwd(*args)
        do = torch.randn_like(o)
        torch.library.opcheck(torch.ops.fastdiss.attention_bwd.default, (do, *args[:3], o, lse, *args[3:]))


def test_backend_triton_runs_the_launchers(backend, monkeypatch, device):
    """The public function (eager CUDA: an autograd.Function; otherwise the op) and the op itself both
    run the Triton launchers, forward and backward, and agree with the reference."""
    calls = []
    for name in ("attention_forward_triton", "attention_backward_triton"):
        real = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    backend("triton")
    q, k, v = make_qkv(2, 2, 6, 11, 32, torch.float32, "blhd", device)
    mask = make_mask("full_row", 2, 11, device)
    do = torch.randn(2, 2, 6, 32, device=device)
    ref = grads_of(lambda a, b, c: A.attention_reference(a, b, c, mask), q, k, v, do)
    routes = {"public": lambda a, b, c: fastdiss.functional.attention(a, b, c, key_padding_mask=mask),
              "op": lambda a, b, c: torch.ops.fastdiss.attention_fwd(a, b, c, mask, False, 32 ** -0.5)[0]}
    for route, fn in routes.items():
        calls.clear()
        ours = grads_of(fn, q, k, v, do)
        assert calls == ["attention_forward_triton", "attention_backward_triton"], route
        for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{route} {name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk,mask_kind,causal", [(5, 19, "full_row", False), (13, 13, "random", True)])
def test_autograd_function_matches_fp64_and_op(dtype, Lq, Lk, mask_kind, causal, backend, device):
    """_FlashAttentionFunction (the eager CUDA path) against the fp64 oracle, and bitwise equal to the
    custom op on the same inputs; rows whose keys are all padding give exactly 0 and no NaN."""
    backend("triton")
    q, k, v = make_qkv(2, 2, Lq, Lk, 24, dtype, "blhd", device)
    mask = make_mask(mask_kind, 2, Lk, device)
    scale = 24 ** -0.5
    do = torch.randn(2, 2, Lq, 24, device=device).to(dtype)
    ours = grads_of(lambda a, b, c: A._FlashAttentionFunction.apply(a, b, c, mask, causal, scale), q, k, v, do)
    op = grads_of(lambda a, b, c: torch.ops.fastdiss.attention_fwd(a, b, c, mask, causal, scale)[0], q, k, v, do)
    ref = grads_of(lambda a, b, c: A.attention_reference(a, b, c, mask, causal, scale),
                   *(t.double() for t in (q, k, v)), do.double())
    base = grads_of(lambda a, b, c: naive_attention(a, b, c, mask, causal, scale), q, k, v, do)
    for name, a, o, r, b in zip(("o", "dq", "dk", "dv"), ours, op, ref, base):
        assert a.dtype == dtype and torch.equal(a, o), f"{name}: Function != op"
        assert_close_to_oracle(name, a, b, r, ATOL[dtype])
    if mask_kind == "full_row":
        assert (ours[0][0] == 0).all() and (ours[1][0] == 0).all()


@pytest.mark.parametrize("name", ["auto", "torch"])
def test_cpu_paths_match_reference_without_nan(backend, name):
    """backend auto: op with the reference CPU kernels; torch: plain autograd through the reference."""
    backend(name)
    q, k, v = make_qkv(2, 3, 7, 9, 16, torch.bfloat16)
    mask = make_mask("full_row", 2, 9)
    do = torch.randn(2, 3, 7, 16).to(torch.bfloat16)
    ours = grads_of(lambda a, b, c: fastdiss.functional.attention(a, b, c, mask), q, k, v, do)
    ref = grads_of(lambda a, b, c: A.attention_reference(a, b, c, mask),
                   *(t.double() for t in (q, k, v)), do.double())
    for label, a, r in zip(("o", "dq", "dk", "dv"), ours, ref):
        assert torch.isfinite(a).all(), label
        torch.testing.assert_close(a.double(), r, rtol=2e-2, atol=2e-2, msg=lambda m: f"{label}: {m}")
    assert (ours[0][0] == 0).all() and (ours[1][0] == 0).all()


def test_torch_compile_fullgraph_cpu(backend):
    backend("auto")
    torch._dynamo.reset()

    def block(q, k, v, mask):
        return fastdiss.functional.attention(q, k, v, key_padding_mask=mask).sum(dim=1)

    compiled = torch.compile(block, fullgraph=True)
    q, k, v = make_qkv(2, 2, 5, 8, 16, torch.float32, "blhd")
    mask = make_mask("random", 2, 8)
    do = torch.randn(2, 5, 16)
    got = grads_of(lambda a, b, c: compiled(a, b, c, mask), q, k, v, do)
    want = grads_of(lambda a, b, c: A.attention_reference(a, b, c, mask).sum(dim=1), q, k, v, do)
    for label, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label}: {m}")


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("change,exc,words", [
    (lambda q, k, v, m: (q[0], k, v, m, False), ValueError, "q must have 4 dims"),
    (lambda q, k, v, m: (q, k.half(), v, m, False), TypeError, "k has dtype torch.float16"),
    (lambda q, k, v, m: (q.double(), k.double(), v.double(), m, False), TypeError, "q has dtype torch.float64"),
    (lambda q, k, v, m: (q, k[:, :1], v[:, :1], m, False), ValueError, "k must have shape"),
    (lambda q, k, v, m: (q, k, v[:, :, :3], m, False), ValueError, "v must have the shape of k"),
    (lambda q, k, v, m: (q, k, v, m.int(), False), TypeError, "key_padding_mask has dtype torch.int32"),
    (lambda q, k, v, m: (q, k, v, m[:, :3], False), ValueError, "key_padding_mask must have shape (B, Lk)"),
    (lambda q, k, v, m: (q, k, v, m, True), ValueError, "is_causal=True needs Lq == Lk"),
    (lambda q, k, v, m: (q, k, v, m, 1), TypeError, "is_causal must be a bool"),
])
def test_bad_inputs_raise_clear_errors(change, exc, words):
    q, k, v = make_qkv(2, 2, 3, 5, 16, torch.float32)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        fastdiss.functional.attention(*change(q, k, v, make_mask("random", 2, 5)))
    big = torch.randn(1, 1, 2, A.MAX_HEAD_DIM + 1)
    with pytest.raises(ValueError, match="head dim"):
        fastdiss.functional.attention(big, big, big)
