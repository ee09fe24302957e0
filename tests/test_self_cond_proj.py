"""Self-conditioning projection Linear([x_t ; sc]) + bias + add: the Triton kernel (interpreter on
CPU) and the custom-op layer against a float64 reference, opcheck, torch.compile, input checks."""
import pytest
import torch
import torch.nn.functional as F

import fastdiss
from fastdiss import functional as Fd
from fastdiss.kernels import self_cond_proj as scp

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative to outputs of size ~1; bf16 also absorbs the interpreter's round-toward-zero downcast
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def close(actual, expected, dtype, name, scale=1.0):
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")


def make(lead, d, N, dtype, device, bias=True, add_shape="full"):
    x = torch.randn(*lead, d, device=device).to(dtype)
    sc = torch.randn(*lead, d, device=device).to(dtype)
    w = (torch.randn(N, 2 * d, device=device) / (2 * d) ** 0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    shapes = {"full": (*lead, N), "positions": (lead[-1], N), "per_batch": (lead[0], *[1] * (len(lead) - 1), N),
              None: None}
    add = torch.randn(shapes[add_shape], device=device).to(dtype) if add_shape else None
    return x, sc, w, b, add


def reference(x, sc, w, b, add):
    """float64 output of F.linear(cat) + add, and a function giving every input's gradient."""
    leaves = [None if v is None else v.detach().double().requires_grad_() for v in (x, sc, w, b, add)]
    xd, sd, wd, bd, ad = leaves
    y = F.linear(torch.cat([xd, sd], -1), wd, bd)
    y = y if ad is None else y + ad

    def grads(g):
        y.backward(g.double())
        return [None if v is None else v.grad for v in leaves]
    return y.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d,N,bias,add_shape", [
    ((1,), 16, 16, True, None),             # one row
    ((3, 5), 33, 40, True, "full"),         # odd K and N, per-token add (time + position)
    ((2, 7), 64, 17, False, "positions"),   # add (L, N) broadcast over the batch
    ((2, 3, 5), 8, 70, True, "per_batch"),  # extra leading dim, add (2, 1, 1, N) -> (2, 3, 5, N)
    ((4, 3), 8, 20, True, "per_batch"),     # add (4, 1, N): one row per sequence, read with stride 0
])
def test_kernel_matches_float64(dtype, lead, d, N, bias, add_shape, device):
    x, sc, w, b, add = make(lead, d, N, dtype, device, bias, add_shape)
    y = scp.self_cond_project_triton(x, sc, w, b, add, block_sizes=dict(BLOCK_M=16, BLOCK_N=16))
    y_ref, _ = reference(x, sc, w, b, add)
    assert y.shape == y_ref.shape and y.dtype == dtype
    close(y, y_ref, dtype, "y")


def test_kernel_accepts_strided_inputs(device):
    """Non-contiguous x_t/sc and a weight slice with a row stride wider than 2d."""
    x = torch.randn(12, 2, device=device).t()               # (2, 12) transposed view
    sc = torch.randn(2, 24, device=device)[:, ::2]          # strided columns
    w_big = torch.randn(10, 30, device=device)
    w = w_big[:, 3:27]                                      # (10, 24), row stride 30
    y = scp.self_cond_project_triton(x, sc, w, None, None)
    close(y, F.linear(torch.cat([x, sc], -1).double(), w.double()), torch.float32, "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add_shape", ["full", "positions"])
def test_public_op_autograd(dtype, add_shape, device, triton_backend):
    x, sc, w, b, add = make((2, 5), 24, 36, dtype, device, True, add_shape)
    leaves = [v.detach().requires_grad_() for v in (x, sc, w, b, add)]
    y = Fd.self_cond_project(*leaves)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, grads = reference(x, sc, w, b, add)
    close(y, y_ref, dtype, "y")
    for name, leaf, expected in zip(("dx_t", "dsc", "dweight", "dbias", "dadd"), leaves, grads(g)):
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype, name
        close(leaf.grad, expected, dtype, name, scale=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_function_matches_float64_and_op(dtype, device, triton_backend):
    """The op's autograd.Function (the eager CUDA path) against the float64 reference, and bitwise equal
    to the custom op on the same inputs (same launcher, same torch-matmul backward); an `add` that
    needs no gradient gets none, and a broadcast one gets the output gradient summed over batches."""
    x, sc, w, b, add = make((2, 5), 13, 21, dtype, device, True, "positions")
    g = torch.randn(2, 5, 21, device=device).to(dtype)
    for add_grad in (True, False):
        results = []
        for project in (scp.self_cond_project_fwd.function.apply, torch.ops.fastdiss.self_cond_project_fwd):
            leaves = [v.detach().requires_grad_(v is not add or add_grad) for v in (x, sc, w, b, add)]
            y = project(*leaves)
            y.backward(g)
            results.append((y, [leaf.grad for leaf in leaves]))
        (y, grads), (op_y, op_grads) = results
        y_ref, ref_grads = reference(x, sc, w, b, add)
        assert torch.equal(y, op_y), "y: Function != op"
        close(y, y_ref, dtype, "y")
        names = ("dx_t", "dsc", "dweight", "dbias", "dadd") if add_grad else ("dx_t", "dsc", "dweight", "dbias")
        for name, v, a, o, e in zip(names, (x, sc, w, b, add), grads, op_grads, ref_grads(g)):
            assert a.shape == v.shape and a.dtype == dtype and torch.equal(a, o), f"{name}: Function != op"
            close(a, e, dtype, name, scale=3)
        if not add_grad:
            assert grads[4] is None and op_grads[4] is None


def test_no_bias_no_add_and_backends_agree(device, triton_backend):
    x, sc, w, _, _ = make((3, 4), 8, 12, torch.float32, device, False, None)
    fast = Fd.self_cond_project(x, sc, w)
    fastdiss.set_backend("torch")
    close(fast, Fd.self_cond_project(x, sc, w), torch.float32, "backend torch vs triton")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_opcheck(backend, device, triton_backend):
    fastdiss.set_backend(backend)
    x, sc, w, b, add = (v.requires_grad_() for v in make((2, 3), 8, 16, torch.float32, device, True, "full"))
    torch.library.opcheck(torch.ops.fastdiss.self_cond_project_fwd.default, (x, sc, w, b, add))
    torch.library.opcheck(torch.ops.fastdiss.self_cond_project_fwd.default, (x, sc, w, None, None))
    torch.library.opcheck(torch.ops.fastdiss.self_cond_project_bwd.default,
                          (torch.randn(2, 3, 16, device=device), x.detach(), sc.detach(), w.detach(), True))


def test_torch_compile_fullgraph(device, triton_backend):
    torch._dynamo.reset()

    def decoder_input(x, sc, w, b, pos, temb):
        return Fd.self_cond_project(x, sc, w, b, add=temb + pos).square().sum()

    x, sc, w, b, temb = make((2, 5), 8, 16, torch.float32, device, True, "full")
    pos = torch.randn(5, 16, device=device)
    leaves_c = [v.clone().requires_grad_() for v in (x, sc, w, b, pos, temb)]
    leaves_e = [v.clone().requires_grad_() for v in (x, sc, w, b, pos, temb)]
    out_c = torch.compile(decoder_input, fullgraph=True, backend="aot_eager")(*leaves_c)
    out_c.backward()
    fastdiss.set_backend("torch")
    out_e = decoder_input(*leaves_e)
    out_e.backward()
    close(out_c, out_e, torch.float32, "compiled loss")
    for a, e in zip(leaves_c, leaves_e):
        close(a.grad, e.grad, torch.float32, "compiled grad", scale=2)


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(x_t=None), TypeError, "x_t must be a torch.Tensor, got NoneType"),
    (dict(sc=torch.ones(2, 3, 5)), ValueError, r"sc must have the shape of x_t \(2, 3, 4\)"),
    (dict(sc=torch.ones(2, 3, 4, dtype=torch.float16)), TypeError, "sc has dtype torch.float16"),
    (dict(weight=torch.ones(6, 4)), ValueError, r"weight must have shape \(N, 8\)"),
    (dict(weight=torch.ones(6, 8, 1)), ValueError, "weight must have 2 dims"),
    (dict(bias=torch.ones(5)), ValueError, r"bias must have shape \(6,\)"),
    (dict(add=torch.ones(3, 6, 1)), ValueError, r"add must have the output's shape \(2, 3, 6\) or broadcast"),
    (dict(add=torch.ones(2, 3, 6, dtype=torch.float64)), TypeError, "add has dtype torch.float64"),
])
def test_input_validation(kwargs, exc, needle):
    args = dict(x_t=torch.ones(2, 3, 4), sc=torch.ones(2, 3, 4), weight=torch.ones(6, 8), bias=None, add=None)
    args.update(kwargs)
    with pytest.raises(exc, match=needle):
        Fd.self_cond_project(args["x_t"], args["sc"], args["weight"], bias=args["bias"], add=args["add"])
