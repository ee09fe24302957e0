"""Rounding cross-entropy: Triton launchers, the chunked PyTorch kernel, the op layer (dispatch,
opcheck, torch.compile) and the public function, all against a float64 reference. On CPU the
launchers run under the Triton interpreter (conftest); on a GPU machine the same tests run the real
kernels on CUDA tensors."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiss
from fastdiss.kernels import rounding_ce as rc

# (rtol, atol relative to the largest reference magnitude) per input dtype
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 2e-3), torch.bfloat16: (4e-2, 1e-2)}


def assert_close(name, got, ref, dtype):
    """Every element within tolerance; on failure report the mismatch count and the worst index."""
    rtol, atol = TOL[dtype]
    got, ref = got.double(), ref.double()
    atol = atol * max(1.0, ref.abs().max().item())
    err = (got - ref).abs()
    bad = ~(err <= atol + rtol * ref.abs())
    if bad.any():
        worst = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(f"{name}: {int(bad.sum())}/{ref.numel()} mismatched; worst at {worst}: "
                             f"got {got[worst].item():.6g}, expected {ref[worst].item():.6g}")


def make_inputs(n, vocab, d, dtype, device="cpu", ignore_index=-100, ignore_frac=0.25):
    x = torch.randn(n, d).to(device, dtype)
    emb = (torch.randn(vocab, d) / d ** 0.25).to(device, dtype)
    t = torch.randint(0, vocab, (n,))
    t[torch.rand(n) < ignore_frac] = ignore_index
    return x, emb, t.to(device)


def reference_grads(x, emb, t, grad_loss, ignore_index=-100):
    """float64 per-token loss and (dx, dE) for a given upstream gradient of the per-token loss."""
    xd = x.double().requires_grad_()
    ed = emb.double().requires_grad_()
    loss = rc.rounding_cross_entropy_reference(xd, ed, t, ignore_index, reduction="none")
    loss.backward(grad_loss.double())
    return loss.detach(), xd.grad, ed.grad


@pytest.fixture
def backend():
    """Set a backend for one test and restore the previous one afterwards."""
    prev = fastdiss.get_backend()
    yield fastdiss.set_backend
    fastdiss.set_backend(prev)


# ---------------------------------------------------------------- Triton launchers (interpreter)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,vocab,d,splits,chunk", [(13, 37, 24, None, 0), (1, 100, 16, 3, 48),
                                                    (21, 100, 40, 2, 16)])
def test_triton_launchers_match_reference(dtype, n, vocab, d, splits, chunk, device):
    x, emb, t = make_inputs(n, vocab, d, dtype, device)
    t[0] = 0  # the first and last vocabulary rows are targets (edges of the tiles)
    if n > 1:
        t[-1] = vocab - 1
    g = torch.randn(n, device=device)
    ref_loss, ref_dx, ref_de = reference_grads(x, emb, t, g)

    loss, lse = rc._triton_forward(x, emb, t, -100, num_splits=splits)
    assert loss.dtype == torch.float32 and lse.shape == (n,)
    assert_close("loss", loss, ref_loss, dtype)
    assert torch.all(loss[t == -100] == 0)
    ref_lse = torch.logsumexp(x.double() @ emb.double().t(), dim=-1)
    assert_close("lse", lse, ref_lse, dtype)

    dx, de = rc._triton_backward(g, x, emb, t, lse, -100, chunk)
    assert dx.dtype == dtype and de.dtype == dtype
    assert_close("dx", dx, ref_dx, dtype)
    assert_close("dE", de, ref_de, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cpu_kernel_matches_reference(dtype, device):
    x, emb, t = make_inputs(17, 37, 12, dtype, device)
    g = torch.randn(17, device=device)
    ref_loss, ref_dx, ref_de = reference_grads(x, emb, t, g)
    loss, lse = rc._chunked_forward(x, emb, t, -100, 10)
    assert_close("loss", loss, ref_loss, dtype)
    dx, de = rc._chunked_backward(g, x, emb, t, lse, -100, 10)
    assert_close("dx", dx, ref_dx, dtype)
    assert_close("dE", de, ref_de, dtype)


# ---------------------------------------------------------------- public function and op layer
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_autograd_function_matches_reference_and_op(dtype, backend, device):
    """The op's autograd.Function (the eager CUDA path) against the float64 reference, and bitwise equal to
    the custom op on the same inputs (per-token loss, dx, dE), with ignored tokens and a chunked backward."""
    backend("triton")
    x, emb, t = make_inputs(13, 37, 24, dtype, device)
    assert (t == -100).any() and (t != -100).any()
    g = torch.randn(13, device=device)
    results = []
    for rounding_ce in (lambda *a: rc.rounding_ce_fwd.function.apply(*a)[0],
                        lambda *a: torch.ops.fastdiss.rounding_ce_fwd(*a)[0]):
        xl, el = x.detach().requires_grad_(), emb.detach().requires_grad_()
        loss = rounding_ce(xl, el, t, -100, 16)
        results.append((loss, *torch.autograd.grad(loss, (xl, el), g)))
    ref = reference_grads(x, emb, t, g)
    for name, ours, op, r in zip(("loss", "dx", "dE"), results[0], results[1], ref):
        assert torch.equal(ours, op), f"{name}: Function != op"
        assert_close(name, ours, r, dtype)
    loss, dx, de = results[0]
    assert loss.dtype == torch.float32 and dx.dtype == de.dtype == dtype
    assert torch.all(loss[t == -100] == 0) and torch.all(dx[t == -100] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["auto", "triton"])
def test_public_function_reductions(reduction, name, backend, device):
    backend(name)
    x, emb, t = make_inputs(2 * 7, 37, 16, torch.float32, device)
    x = x.view(2, 7, 16).requires_grad_()
    emb.requires_grad_()
    t = t.view(2, 7)
    loss = rc.rounding_cross_entropy(x, emb, t, reduction=reduction, chunk_size=8)
    xd, ed = x.detach().double().requires_grad_(), emb.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy((xd @ ed.t()).view(-1, 37), t.view(-1), reduction=reduction)
    ref = ref.view(2, 7) if reduction == "none" else ref
    assert loss.shape == ref.shape and loss.dtype == torch.float32
    assert_close("loss", loss.detach(), ref.detach(), torch.float32)
    g = torch.randn(ref.shape, device=device)
    loss.backward(g)
    ref.backward(g.double())
    assert_close("dx", x.grad, xd.grad, torch.float32)
    assert_close("dE", emb.grad, ed.grad, torch.float32)


@pytest.mark.parametrize("name", ["auto", "triton", "torch"])
def test_all_ignored_gives_zero_not_nan(name, backend, device):
    backend(name)
    x = torch.randn(5, 8, device=device, requires_grad=True)
    emb = torch.randn(11, 8, device=device, requires_grad=True)
    t = torch.full((5,), -100, device=device)
    loss = fastdiss.functional.rounding_cross_entropy(x, emb, t)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0) and torch.all(emb.grad == 0)
    assert fastdiss.functional.rounding_cross_entropy(x, emb, t, reduction="sum").item() == 0.0


def test_ignore_index_that_is_a_vocabulary_id(device):
    """ignore_index may be a real id (e.g. the pad id): those tokens contribute nothing."""
    x, emb, t = make_inputs(12, 20, 8, torch.float32, device, ignore_index=3, ignore_frac=0.4)
    t[0] = 3
    x.requires_grad_()
    loss = fastdiss.functional.rounding_cross_entropy(x, emb, t, ignore_index=3, reduction="sum")
    keep = t != 3
    ref = torch.nn.functional.cross_entropy(x[keep].double() @ emb.double().t(), t[keep], reduction="sum")
    assert_close("loss", loss.detach(), ref.detach(), torch.float32)
    loss.backward()
    assert torch.all(x.grad[~keep] == 0) and torch.all(x.grad[keep].abs().sum(-1) > 0)


def test_mixed_dtypes_promote_and_grads_keep_dtypes(device):
    x = torch.randn(6, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
    emb = torch.randn(13, 8, device=device, requires_grad=True)
    t = torch.randint(0, 13, (6,), device=device)
    loss = fastdiss.functional.rounding_cross_entropy(x, emb, t)
    ref = torch.nn.functional.cross_entropy(x.double() @ emb.double().t(), t)
    assert_close("loss", loss.detach(), ref.detach(), torch.float32)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and emb.grad.dtype == torch.float32


def test_opcheck_forward_and_backward_ops(device):
    x, emb, t = make_inputs(9, 21, 8, torch.float32, device)
    x.requires_grad_()
    emb.requires_grad_()
    torch.library.opcheck(torch.ops.fastdiss.rounding_ce_fwd.default, (x, emb, t, -100, 8))
    loss, lse = torch.ops.fastdiss.rounding_ce_fwd(x.detach(), emb.detach(), t, -100, 8)
    torch.library.opcheck(torch.ops.fastdiss.rounding_ce_bwd.default,
                          (torch.randn(9, device=device), x.detach(), emb.detach(), t, lse, -100, 8))


def test_torch_compile_fullgraph(device):
    """Dynamo + AOTAutograd trace through the op via its fake and autograd registrations; the
    compiled backward runs our backward op. aot_eager: inductor passes too but only adds ~50 s of
    C++ codegen on 2 cores."""
    x, emb, t = make_inputs(10, 23, 8, torch.float32, device)
    x.requires_grad_()
    emb.requires_grad_()

    def loss_fn(x, emb, t):
        return fastdiss.functional.rounding_cross_entropy(x, emb, t)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(x, emb, t)
    dx, de = torch.autograd.grad(loss, (x, emb))
    ref = loss_fn(x, emb, t)
    rdx, rde = torch.autograd.grad(ref, (x, emb))
    assert_close("loss", loss.detach(), ref.detach(), torch.float32)
    assert_close("dx", dx, rdx, torch.float32)
    assert_close("dE", de, rde, torch.float32)


# ---------------------------------------------------------------- memory bound
class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in bytes) any ATen op returns, including the interpreter's
    byte-storage copies of kernel arguments."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel() * o.element_size())
        return out


@pytest.mark.parametrize("path", ["chunked", "triton"])
def test_memory_stays_tokens_times_chunk(path, device):
    """No tensor of tokens x vocab is ever created: largest allocation <= tokens x chunk (fp32)."""
    n, vocab, d, chunk = 64, 160, 8, 16
    x, emb, t = make_inputs(n, vocab, d, torch.float32, device)
    fwd = rc._chunked_forward if path == "chunked" else rc._triton_forward
    bwd = rc._chunked_backward if path == "chunked" else rc._triton_backward
    with _LargestAllocation() as mode:
        loss, lse = fwd(x, emb, t, -100, chunk) if path == "chunked" else fwd(x, emb, t, -100)
        dx, de = bwd(torch.randn(n, device=device), x, emb, t, lse, -100, chunk)
    assert mode.largest <= 4 * max(n * chunk, vocab * d, n * d) < 4 * n * vocab
    ref_loss, ref_dx, _ = reference_grads(x, emb, t, torch.ones(n, device=device))
    assert_close("loss", loss, ref_loss, torch.float32)


def test_auto_chunk_bounds_the_buffer(monkeypatch):
    monkeypatch.setattr(rc, "_CHUNK_BUDGET", 256)
    assert rc._auto_chunk(64, 1000, 1) == 4
    assert rc._auto_chunk(64, 1000, 16) == 16
    assert rc._auto_chunk(2, 50, 16) == 64  # never wider than the vocabulary rounded to a tile
    x, emb, t = make_inputs(64, 160, 8, torch.float32)
    with _LargestAllocation() as mode:
        _, lse = rc._chunked_forward(x, emb, t, -100, 0)
        rc._chunked_backward(torch.randn(64), x, emb, t, lse, -100, 0)
    assert mode.largest <= 4 * max(256, 160 * 8)


# ---------------------------------------------------------------- input validation
def test_bad_inputs_raise_clear_errors():
    f = fastdiss.functional.rounding_cross_entropy
    x, emb, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="x0_hat"):
        f(x.long(), emb, t)
    with pytest.raises(TypeError, match="targets"):
        f(x, emb, t.float())
    with pytest.raises(ValueError, match="embedding"):
        f(x, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match="embedding"):
        f(x, torch.randn(10, 8, 1), t)
    with pytest.raises(ValueError, match="targets must have shape"):
        f(x, emb, t[:3])
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\).*got 10"):
        f(x, emb, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match="got -1"):
        f(x, emb, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="reduction"):
        f(x, emb, t, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        f(x, emb, t, ignore_index=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        rc.rounding_cross_entropy(x, emb, t, chunk_size=0)
    with pytest.raises(ValueError, match="embedding is on meta"):
        f(x, emb.to("meta"), t)
