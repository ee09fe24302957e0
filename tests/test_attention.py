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


def keep_mask(mask, causal, Lq, Lk):
    """Bool (B|1, 1, Lq, Lk): True where a query may attend to a key (written here, not taken from A)."""
    keep = torch.ones(1, 1, Lq, Lk, dtype=torch.bool)
    if mask is not None:
        keep = keep.to(mask.device) & ~mask[:, None, None, :]
    if causal:
        keep = keep & torch.ones(Lq, Lk, dtype=torch.bool, device=keep.device).tril()
    return keep


def oracle_attention(q, k, v, mask, causal, scale):
    """The float64 oracle, written out independently of the module: exp(s - rowmax) / rowsum over the
    kept keys, 0 for rows without any key; differentiable (no NaN gradients for masked entries)."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    keep = keep_mask(mask, causal, q.shape[-2], k.shape[-2]).to(s.device)
    m = torch.where(keep, s, float("-inf")).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(keep, torch.exp(torch.where(keep, s, m) - m), torch.zeros_like(s))
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("bhqk,bhkd->bhqd", p, v)


def naive_attention(q, k, v, mask, causal, scale):
    """Plain PyTorch attention with every op in the inputs' dtype: the 'PyTorch error' baseline."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is None and not causal:
        return torch.matmul(torch.softmax(s, -1), v)
    keep = keep_mask(mask, causal, q.shape[-2], k.shape[-2]).to(q.device)
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
    ref = grads_of(lambda a, b, c: oracle_attention(a, b, c, mask, causal, scale), *f64, do.double())
    base = grads_of(lambda a, b, c: naive_attention(a, b, c, mask, causal, scale), q, k, v, do)
    for name, ours, b, r in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), base, ref):
        assert_close_to_oracle(name, ours, b, r, ATOL[dtype])

    s = torch.einsum("bhqd,bhkd->bhqk", *f64[:2]) * scale
    s = s.masked_fill(~keep_mask(mask, causal, q.shape[-2], k.shape[-2]).to(s.device), float("-inf"))
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


# On CUDA only the 16-bit dtypes: fp32 takes IEEE dots without tensor cores (not the lowering at fault),
# and at 32x128 needs 180 KB of shared memory, more than an sm_80 GPU has.
FORCED_DTYPES = [torch.float16, torch.bfloat16] if torch.cuda.is_available() else DTYPES


@pytest.mark.parametrize("dtype", FORCED_DTYPES, ids=str)
@pytest.mark.parametrize("config", [(32, 64, 4, 2), (32, 128, 8, 2)], ids=lambda c: "x".join(map(str, c[:2])))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_with_query_blocks_smaller_than_key_blocks(config, causal, dtype, device, monkeypatch):
    """BLOCK_M = 32 < BLOCK_N gave wrong dK/dV on an H200 (the only configs whose dK/dV dots took a
    register transpose of an mma-v2 result into a wgmma operand). Forced here on every device, head dim
    128 as in that sweep; the dQ and delta kernels run with the same BLOCK_M."""
    monkeypatch.setattr(A, "_bwd_config", lambda head_dim: config)
    L = 70
    q, k, v = make_qkv(2, 1, 40 if not causal else L, L, 128, dtype, "blhd", device)
    check_against_oracle(q, k, v, make_mask("random", 2, L, device), causal, 128 ** -0.5)


@pytest.mark.slow
def test_dkdv_kernel_never_transposes_a_dot_result_in_registers():
    """The compiled sm_90 code (no GPU needed) of the dK/dV kernel at BLOCK_M = 32, BLOCK_N = 64: no
    `tt.trans` may take a tensor in an MMA accumulator layout. That register transpose, from an mma-v2
    result into a wgmma A operand, is the pattern that gave wrong dK/dV on the H200; the interpreter
    cannot show it, so this checks the compiler's output instead."""
    pytest.importorskip("triton")
    script = (
        "import json\n"
        "from fastdiss.kernels import attention as A\n"
        "from fastdiss.kernels._aot import make_signature, compile_for\n"
        "const = dict(HAS_MASK=True, IS_CAUSAL=False, BLOCK_D=128, DOT_F32=False, PRECISION='tf32',"
        " BLOCK_M=32, BLOCK_N=64)\n"
        "ptrs = {n: 'bf16' for n in ('Q', 'K', 'V', 'DO', 'DK', 'DV')}\n"
        "ptrs.update(Mask='u8', LSE='fp32', Delta='fp32')\n"
        "sig = make_signature(A._attn_bwd_dkdv_kernel, const, ptrs, {'qk_scale': 'fp32', 'scale': 'fp32'})\n"
        "c = compile_for(A._attn_bwd_dkdv_kernel, sig, const, 90, dict(num_warps=4, num_stages=2))\n"
        "print(json.dumps(c.asm['ttgir']))\n")
    import json
    import os
    import re
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiler, not the interpreter
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ir = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "warp_group_dot" in ir or "tt.dot" in ir
    bad = [line.strip() for line in ir.splitlines() if re.search(r"\btt\.trans\b.*:\s*tensor<[^>]*#mma", line)]
    assert not bad, "register transpose of an MMA result:\n" + "\n".join(bad)


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
    for name, op in (("attention_forward_triton", A.attention_fwd), ("attention_backward_triton", A.attention_bwd)):
        assert op.kernel is getattr(A, name)
        monkeypatch.setattr(op, "kernel", lambda *a, _real=op.kernel, _name=name: calls.append(_name) or _real(*a))
    backend("triton")
    q, k, v = make_qkv(2, 2, 6, 11, 32, torch.float32, "blhd", device)
    mask = make_mask("full_row", 2, 11, device)
    do = torch.randn(2, 2, 6, 32, device=device)
    ref = grads_of(lambda a, b, c: oracle_attention(a, b, c, mask, False, 32 ** -0.5),
                   *(t.double() for t in (q, k, v)), do.double())
    routes = {"public": lambda a, b, c: fastdiss.functional.attention(a, b, c, key_padding_mask=mask),
              "op": lambda a, b, c: torch.ops.fastdiss.attention_fwd(a, b, c, mask, False, 32 ** -0.5)[0]}
    for route, fn in routes.items():
        calls.clear()
        ours = grads_of(fn, q, k, v, do)
        assert calls == ["attention_forward_triton", "attention_backward_triton"], route
        for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{route} {name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk,mask_kind,causal", [(5, 19, "full_row", False), (13, 13, "random", True)])
def test_autograd_function_matches_fp64_and_op(dtype, Lq, Lk, mask_kind, causal, backend, device):
    """The op's autograd.Function (the eager CUDA path) against the fp64 oracle, and bitwise equal to the
    custom op on the same inputs; rows whose keys are all padding give exactly 0 and no NaN."""
    backend("triton")
    q, k, v = make_qkv(2, 2, Lq, Lk, 24, dtype, "blhd", device)
    mask = make_mask(mask_kind, 2, Lk, device)
    scale = 24 ** -0.5
    do = torch.randn(2, 2, Lq, 24, device=device).to(dtype)
    ours = grads_of(lambda a, b, c: A.attention_fwd.function.apply(a, b, c, mask, causal, scale)[0], q, k, v, do)
    op = grads_of(lambda a, b, c: torch.ops.fastdiss.attention_fwd(a, b, c, mask, causal, scale)[0], q, k, v, do)
    ref = grads_of(lambda a, b, c: oracle_attention(a, b, c, mask, causal, scale),
                   *(t.double() for t in (q, k, v)), do.double())
    base = grads_of(lambda a, b, c: naive_attention(a, b, c, mask, causal, scale), q, k, v, do)
    for name, a, o, r, b in zip(("o", "dq", "dk", "dv"), ours, op, ref, base):
        assert a.dtype == dtype and torch.equal(a, o), f"{name}: Function != op"
        assert_close_to_oracle(name, a, b, r, ATOL[dtype])
    if mask_kind == "full_row":
        assert (ours[0][0] == 0).all() and (ours[1][0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["auto", "torch"])
def test_cpu_paths_match_fp64_without_nan(backend, name, dtype):
    """backend auto: op with the reference CPU kernels; torch: plain autograd through the reference.
    Both against the independent float64 oracle, not against attention_reference itself."""
    backend(name)
    q, k, v = make_qkv(2, 3, 7, 9, 16, dtype)
    mask = make_mask("full_row", 2, 9)
    do = torch.randn(2, 3, 7, 16).to(dtype)
    ours = grads_of(lambda a, b, c: fastdiss.functional.attention(a, b, c, mask), q, k, v, do)
    ref = grads_of(lambda a, b, c: oracle_attention(a, b, c, mask, False, 16 ** -0.5),
                   *(t.double() for t in (q, k, v)), do.double())
    base = grads_of(lambda a, b, c: naive_attention(a, b, c, mask, False, 16 ** -0.5), q, k, v, do)
    for label, a, b, r in zip(("o", "dq", "dk", "dv"), ours, base, ref):
        assert a.dtype == dtype
        assert_close_to_oracle(label, a, b, r, ATOL[dtype])
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
    want = grads_of(lambda a, b, c: oracle_attention(a, b, c, mask, False, 16 ** -0.5).sum(dim=1),
                    *(t.double() for t in (q, k, v)), do.double())
    for label, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label}: {m}")


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
