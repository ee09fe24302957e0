"""Fused (residual +) LayerNorm: Triton kernels (interpreter on CPU) and the custom-op layer
against a float64 reference, opcheck, torch.compile, determinism and input checks."""
import pytest
import torch
import torch.nn.functional as F

import fastdiss
from fastdiss import functional as Fd
from fastdiss.kernels import layer_norm as ln

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# bf16: the Triton interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest), so allow
# about one bf16 ulp (2^-7 relative) rather than half of one.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
SHAPES = [(1, 33), (3, 64), (7, 128), (2, 3, 5)]  # rows x hidden; (2, 3, 5): 6 rows of 5 in a 3D tensor


def close(actual, expected, dtype, name, scale=1.0):
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")


def make(shape, dtype, device, affine=True, residual=False, wdtype=None):
    x = torch.randn(shape, device=device).mul(2).add(0.5).to(dtype)
    r = torch.randn(shape, device=device).to(dtype) if residual else None
    N = shape[-1]
    wdtype = wdtype or dtype
    w = (1 + 0.5 * torch.randn(N, device=device)).to(wdtype) if affine else None
    b = (0.3 * torch.randn(N, device=device)).to(wdtype) if affine else None
    return x, r, w, b


def reference_with_grads(x, r, w, b, eps, dy, dh):
    """float64 outputs and gradients (autograd through F.layer_norm). Like `x + residual` in the
    inputs' dtype, h is rounded to that dtype before it is normalised (the rounding passes gradients)."""
    leaves = [None if v is None else v.detach().double().requires_grad_() for v in (x, r, w, b)]
    xd, rd, wd, bd = leaves
    h = xd if rd is None else (xd + rd).to(torch.promote_types(x.dtype, r.dtype)).double()
    y = F.layer_norm(h, h.shape[-1:], wd, bd, eps)
    outs, grads = [y], [dy.double()]
    if rd is not None and dh is not None:
        outs.append(h)
        grads.append(dh.double())
    torch.autograd.backward(outs, grads)
    return y.detach(), h.detach(), [None if v is None else v.grad for v in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_kernels_match_float64(dtype, shape, residual, device):
    affine = shape[-1] != 64  # the no-affine path on one size
    x, r, w, b = make(shape, dtype, device, affine, residual)
    y, h, mean, rstd = ln.layer_norm_forward_triton(x, w, b, r, 1e-5, block_rows=2)
    dy = torch.randn(shape, device=device).to(dtype)
    dh = torch.randn(shape, device=device).to(dtype) if residual else None
    y_ref, h_ref, (gx, gr, gw, gb) = reference_with_grads(x, r, w, b, 1e-5, dy, dh)
    close(y, y_ref, dtype, "y")
    if residual:
        close(h, h_ref, dtype, "h")
    # statistics of the h the kernel stored (the interpreter rounds fp32 -> bf16 toward zero, so a
    # bf16 h may differ from the round-to-nearest reference by one ulp; y and h are checked above)
    hd = (h if residual else x).double().reshape(-1, shape[-1])
    torch.testing.assert_close(mean.double(), hd.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(hd.var(-1, unbiased=False) + 1e-5), atol=1e-5, rtol=1e-5)

    # backward: against float64 autograd from the same normalised input the kernel saw
    hin = h if residual else x
    dx, dw, db = ln.layer_norm_backward_triton(dy, dh, hin, w, mean, rstd, b is not None, block_rows=2,
                                               num_programs=2)
    _, _, (gh, _, gw, gb) = reference_with_grads(hin, None, w, b, 1e-5, dy, None)
    close(dx, gh if dh is None else gh + dh.double(), dtype, "dx", scale=2)
    if affine:
        close(dw, gw, torch.float32, "dweight", scale=5)
        close(db, gb, torch.float32, "dbias", scale=5)
    else:
        assert dw.numel() == 0 and db.numel() == 0


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float16)])
def test_public_op_autograd(dtype, wdtype, residual, device, triton_backend):
    shape = (3, 7, 48)
    x, r, w, b = make(shape, dtype, device, True, residual, wdtype)
    xl, rl, wl, bl = (None if v is None else v.detach().requires_grad_() for v in (x, r, w, b))
    out = Fd.layer_norm(xl, wl, bl, eps=1e-6, residual=rl)
    dy = torch.randn(shape, device=device).to(dtype)
    dh = torch.randn(shape, device=device).to(dtype) if residual else None
    if residual:
        y, h = out
        torch.autograd.backward([y, h], [dy, dh])
    else:
        y = out
        y.backward(dy)
    y_ref, h_ref, (gx, gr, gw, gb) = reference_with_grads(x, r, w, b, 1e-6, dy, dh)
    assert y.dtype == dtype and xl.grad.dtype == dtype and wl.grad.dtype == wdtype
    close(y, y_ref, dtype, "y")
    close(xl.grad, gx, dtype, "dx", scale=2)
    close(wl.grad, gw, dtype, "dweight", scale=5)  # inherits the activations' rounding
    close(bl.grad, gb, dtype, "dbias", scale=5)
    if residual:
        close(h, h_ref, dtype, "h")
        close(rl.grad, gr, dtype, "dresidual", scale=2)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_autograd_function_matches_float64_and_op(dtype, wdtype, residual, device, triton_backend):
    """The op's autograd.Function (the eager CUDA path) against the float64 reference, and bitwise equal to the
    custom op on the same inputs; with a residual also when only y or only h gets a gradient."""
    shape = (3, 5, 37)
    x, r, w, b = make(shape, dtype, device, True, residual, wdtype)
    dy = torch.randn(shape, device=device).to(dtype)
    dh = torch.randn(shape, device=device).to(dtype) if residual else None

    def function(x, w, b, r):
        return ln.layer_norm_fwd.function.apply(x, w, b, r, 1e-5)[:2]

    def op(x, w, b, r):
        return torch.ops.fastdiss.layer_norm_fwd(x, w, b, r, 1e-5)[:2]

    def reference(x, w, b, r):  # float64; h rounded to the activations' dtype as the kernel stores it
        h = x if r is None else (x + r).to(dtype).double()
        return ln.layer_norm_reference(h, w, b, 1e-5), h

    def run(layer_norm, inputs, upstream):
        leaves = [None if v is None else v.detach().requires_grad_() for v in inputs]
        outs = layer_norm(*leaves)
        used = [(o, g) for o, g in zip(outs, upstream) if g is not None]
        wrt = [v for v in leaves if v is not None]
        grads = torch.autograd.grad([o for o, _ in used], wrt, [g for _, g in used], allow_unused=True)
        return outs[:2 if residual else 1], [torch.zeros_like(v) if g is None else g for v, g in zip(wrt, grads)]

    inputs = (x, w, b, r)
    names = ["dx", "dweight", "dbias", "dresidual"][:4 if residual else 3]
    for upstream in ([dy, dh], [dy, None], [None, dh]) if residual else ([dy, None],):
        fn_outs, fn_grads = run(function, inputs, upstream)
        op_outs, op_grads = run(op, inputs, upstream)
        ref_outs, ref_grads = run(reference, [None if v is None else v.double() for v in inputs],
                                  [None if g is None else g.double() for g in upstream])
        for name, a, o, e in zip(["y", "h"], fn_outs, op_outs, ref_outs):
            assert a.dtype == o.dtype and torch.equal(a, o), f"{name}: Function != op"
            close(a, e, dtype, name)
        for name, v, a, o, e in zip(names, (x, w, b, r), fn_grads, op_grads, ref_grads):
            assert a.dtype == v.dtype and torch.equal(a, o), f"{name}: Function != op"
            close(a, e, dtype, name, scale=5 if name in ("dweight", "dbias") else 2)


def test_mixed_residual_dtype_promotes(device, triton_backend):
    x = torch.randn(4, 40, device=device, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 40, device=device, dtype=torch.float32, requires_grad=True)
    y, h = Fd.layer_norm(x, None, None, residual=r)
    assert y.dtype == h.dtype == torch.float32
    dy = torch.randn(4, 40, device=device)
    y.backward(dy)
    y_ref, h_ref, (gx, gr, _, _) = reference_with_grads(x, r, None, None, 1e-5, dy, None)
    close(y, y_ref, torch.float32, "y")
    close(h, h_ref, torch.float32, "h")
    assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == torch.float32
    close(r.grad, gr, torch.float32, "dresidual")
    close(x.grad, gr, torch.bfloat16, "dx")


def test_gradient_through_h_alone(device, triton_backend):
    """With only the returned h used, x and residual get exactly its gradient."""
    x, r, w, b = make((3, 20), torch.float32, device, True, True)
    x.requires_grad_(), r.requires_grad_(), w.requires_grad_()
    y, h = Fd.layer_norm(x, w, b, residual=r)
    dh = torch.randn_like(h)
    h.backward(dh)
    assert torch.equal(x.grad, dh) and torch.equal(r.grad, dh)
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_backends_agree(device, triton_backend):
    x, r, w, b = make((5, 24), torch.float32, device, True, True)
    fast = Fd.layer_norm(x, w, b, residual=r)
    fastdiss.set_backend("torch")
    slow = Fd.layer_norm(x, w, b, residual=r)
    for a, e in zip(fast, slow):
        close(a, e, torch.float32, "backend torch vs triton")


def test_weight_grads_are_deterministic(device):
    x, r, w, b = make((21, 40), torch.float32, device, True, True)
    y, h, mean, rstd = ln.layer_norm_forward_triton(x, w, b, r, 1e-5)
    dy = torch.randn(21, 40, device=device)
    first = ln.layer_norm_backward_triton(dy, None, h, w, mean, rstd, True, block_rows=2, num_programs=3)
    again = ln.layer_norm_backward_triton(dy, None, h, w, mean, rstd, True, block_rows=2, num_programs=3)
    for a, e in zip(first, again):
        assert torch.equal(a, e)
    other = ln.layer_norm_backward_triton(dy, None, h, w, mean, rstd, True, block_rows=4, num_programs=2)
    for a, e in zip(first, other):
        close(a, e, torch.float32, "different program split")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_opcheck(backend, device, triton_backend):
    fastdiss.set_backend(backend)
    x, r, w, b = make((3, 5, 16), torch.float32, device, True, True)
    args_fwd = [(x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), r.requires_grad_(), 1e-5),
                (x, None, None, None, 1e-5)]
    for args in args_fwd:
        torch.library.opcheck(torch.ops.fastdiss.layer_norm_fwd.default, args)
    y, h, mean, rstd = torch.ops.fastdiss.layer_norm_fwd(x.detach(), w.detach(), b.detach(), r.detach(), 1e-5)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastdiss.layer_norm_bwd.default, (dy, torch.randn_like(h), h, w.detach(),
                                                                     mean, rstd, True))
    torch.library.opcheck(torch.ops.fastdiss.layer_norm_bwd.default, (dy, None, h, None, mean, rstd, False))


def test_torch_compile_fullgraph(device, triton_backend):
    torch._dynamo.reset()

    def block(x, r, w, b):
        y, h = Fd.layer_norm(x, w, b, residual=r)
        return (Fd.layer_norm(y * 2, w, None) * h).sum()

    x, r, w, b = make((2, 3, 24), torch.float32, device, True, True)
    leaves_c = [v.detach().requires_grad_() for v in (x, r, w, b)]
    leaves_e = [v.detach().requires_grad_() for v in (x, r, w, b)]
    out_c = torch.compile(block, fullgraph=True)(*leaves_c)
    out_c.backward()
    fastdiss.set_backend("torch")
    out_e = block(*leaves_e)
    out_e.backward()
    close(out_c, out_e, torch.float32, "compiled loss")
    for a, e in zip(leaves_c, leaves_e):
        close(a.grad, e.grad, torch.float32, "compiled grad", scale=2)


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(2, 4, dtype=torch.int64)), TypeError, "x has dtype torch.int64"),
    (dict(x=torch.ones(2, 0)), ValueError, "non-empty last dim"),
    (dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(4,\)"),
    (dict(bias=torch.ones(4, dtype=torch.int32)), TypeError, "bias has dtype torch.int32"),
    (dict(residual=torch.ones(2, 5)), ValueError, r"residual must have the shape of x \(2, 4\)"),
    (dict(eps=-1.0), ValueError, "eps must be a non-negative real number, got -1.0"),
    (dict(eps="1e-5"), ValueError, "eps must be"),
])
def test_input_validation(kwargs, exc, needle):
    args = dict(x=torch.ones(2, 4), weight=torch.ones(4), bias=torch.zeros(4), eps=1e-5, residual=None)
    args.update(kwargs)
    with pytest.raises(exc, match=needle):
        Fd.layer_norm(args["x"], args["weight"], args["bias"], eps=args["eps"], residual=args["residual"])
