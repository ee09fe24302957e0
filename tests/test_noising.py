"""Noising (q_sample) and the fused embedding gather + LayerNorm + noising: Triton kernels
(interpreter on CPU) and the custom-op layer against a float64 reference, every schedule,
per-sequence and per-token t, opcheck, torch.compile, determinism and input checks."""
import pytest
import torch
import torch.nn.functional as F

import fastdiss
from fastdiss import functional as Fd
from fastdiss.kernels import noising as nz
from fastdiss.schedule import SCHEDULES, alpha_sigma

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# bf16: the Triton interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest): ~1 ulp.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
NOISE = 1.7


def close(actual, expected, dtype, name, scale=1.0):
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")


def noise_levels(B, L, per_token, device):
    """Random t in [0, 1] plus the ends and values outside (the schedule clamps them)."""
    t = torch.rand((B, L) if per_token else (B,), device=device)
    flat = t.view(-1)
    for i, v in enumerate((0.0, 1.0, -0.2, 1.3)[: flat.numel()]):
        flat[(i * 5) % flat.numel()] = v
    return t


def alpha_sigma64(t, B, L):
    """alpha, sigma as fastdiss.schedule computes them (fp32), broadcast to (B, L, 1) in float64."""
    return lambda schedule: [v.double().reshape(B, -1, 1) for v in alpha_sigma(t.float(), schedule)]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_kernels_match_float64(schedule, per_token, dtype, device):
    B, L, D = (3, 7, 33) if dtype == torch.float32 else (2, 3, 64)
    z0 = torch.randn(B, L, D, device=device).to(dtype)
    eps = torch.randn(B, L, D, device=device).to(dtype)
    t = noise_levels(B, L, per_token, device)
    a, s = alpha_sigma64(t, B, L)(schedule)
    out = nz.q_sample_forward_triton(z0, t, eps, schedule, NOISE, block_rows=4)
    close(out, a * z0.double() + s * NOISE * eps.double(), dtype, "x_t")
    g = torch.randn(B, L, D, device=device).to(dtype)
    dz0, deps = nz.q_sample_backward_triton(g, t, schedule, NOISE, block_rows=4)
    close(dz0, a * g.double(), dtype, "dz0")
    close(deps, s * NOISE * g.double(), dtype, "deps")
    only_eps = nz.q_sample_backward_triton(g, t, schedule, NOISE, need_dz0=False, block_rows=4)
    assert only_eps[0].numel() == 0 and torch.equal(only_eps[1], deps)


def test_q_sample_wide_rows_loop_over_blocks(device):
    """D above the 1024-wide column block: the kernel loops over column blocks."""
    z0, eps = torch.randn(2, 1, 1500, device=device), torch.randn(2, 1, 1500, device=device)
    t = torch.tensor([0.3, 0.8], device=device)
    a, s = alpha_sigma64(t, 2, 1)("cosine")
    out = nz.q_sample_forward_triton(z0, t, eps, "cosine", 1.0)
    close(out, a * z0.double() + s * eps.double(), torch.float32, "x_t")


def embed_reference(tokens, weight, t, eps, lnw, lnb, schedule, dz0, dxt, ln_eps=1e-5):
    """float64 (z0, x_t) and the gradients of weight, ln_weight, ln_bias, eps. z0 is rounded to
    the weight dtype before it is noised, as the kernel does (rounding passes gradients)."""
    leaves = [None if v is None else v.detach().double().requires_grad_() for v in (weight, lnw, lnb, eps)]
    wd, lnwd, lnbd, epsd = leaves
    z0 = F.layer_norm(wd[tokens], wd.shape[-1:], lnwd, lnbd, ln_eps)
    a, s = alpha_sigma64(t, *tokens.shape)(schedule)
    xt = a * z0.to(weight.dtype).double() + s * NOISE * epsd
    torch.autograd.backward([z0, xt], [dz0.double(), dxt.double()])
    return z0.detach(), xt.detach(), [None if v is None else v.grad for v in leaves]


@pytest.mark.parametrize("schedule,per_token,dtype,affine", [
    ("sqrt", False, torch.float32, True), ("sqrt", True, torch.float32, False),
    ("cosine", True, torch.float32, True), ("cosine", False, torch.float16, True),
    ("vp-linear", True, torch.float32, True), ("vp-linear", False, torch.bfloat16, True),
])
def test_embed_and_noise_kernels_match_float64(schedule, per_token, dtype, affine, device):
    B, L, V, D = 3, 7, 11, 33   # 21 tokens over 11 ids: repeated ids and unused rows
    tokens = torch.randint(0, V, (B, L), device=device)
    tokens[0, :3] = 4           # an id used several times in one sequence
    weight = torch.randn(V, D, device=device).to(dtype)
    lnw = (1 + 0.3 * torch.randn(D, device=device)) if affine else None
    lnb = 0.2 * torch.randn(D, device=device) if affine else None
    t = noise_levels(B, L, per_token, device)
    eps = torch.randn(B, L, D, device=device).to(dtype)
    z0, xt = nz.embed_and_noise_forward_triton(tokens, weight, t, eps, lnw, lnb, schedule, NOISE, 1e-5, block_rows=4)
    dz0 = torch.randn(B, L, D, device=device).to(dtype)
    dxt = torch.randn(B, L, D, device=device).to(dtype)
    z_ref, x_ref, (gw, glnw, glnb, geps) = embed_reference(tokens, weight, t, eps, lnw, lnb, schedule, dz0, dxt)
    close(z0, z_ref, dtype, "z0")
    close(xt, x_ref, dtype, "x_t", scale=2)
    dweight, dlnw, dlnb = nz.embed_and_noise_backward_triton(dz0, dxt, tokens, weight, t, lnw, affine, schedule,
                                                             1e-5, num_programs=3)
    _, deps = nz.q_sample_backward_triton(dxt, t, schedule, NOISE, need_dz0=False)
    close(dweight, gw, dtype, "dweight", scale=3)
    unused = torch.ones(V, dtype=torch.bool, device=device)
    unused[tokens.reshape(-1)] = False
    assert unused.any() and torch.equal(dweight[unused], torch.zeros_like(dweight[unused]))
    close(deps, geps, dtype, "deps")
    if affine:
        close(dlnw, glnw, torch.float32, "dln_weight", scale=10)
        close(dlnb, glnb, torch.float32, "dln_bias", scale=10)
    else:
        assert dlnw.numel() == 0 and dlnb.numel() == 0


def test_embed_backward_is_deterministic(device):
    B, L, V, D = 4, 6, 5, 16
    tokens = torch.randint(0, V, (B, L), device=device)
    weight, t = torch.randn(V, D, device=device), torch.rand(B, L, device=device)
    lnw = torch.randn(D, device=device)
    dz0, dxt = torch.randn(B, L, D, device=device), torch.randn(B, L, D, device=device)
    runs = [nz.embed_and_noise_backward_triton(dz0, dxt, tokens, weight, t, lnw, True, "sqrt", 1e-5, num_programs=p)
            for p in (2, 2, 5)]
    for a, e in zip(runs[0], runs[1]):
        assert torch.equal(a, e)
    assert torch.equal(runs[0][0], runs[2][0])  # dweight: each row summed in token order, any split


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_ops_autograd(dtype, device, triton_backend):
    B, L, V, D = 2, 5, 9, 24
    tokens = torch.randint(0, V, (B, L), device=device)
    weight = torch.randn(V, D, device=device).to(dtype).requires_grad_()
    lnw = (1 + 0.3 * torch.randn(D, device=device)).requires_grad_()
    lnb = (0.2 * torch.randn(D, device=device)).requires_grad_()
    eps = torch.randn(B, L, D, device=device).to(dtype).requires_grad_()
    t = torch.rand(B, L, device=device)
    z0, xt = Fd.embed_and_noise(tokens, weight, t, eps, lnw, lnb, schedule="cosine", noise_factor=NOISE)
    dz0, dxt = torch.randn_like(z0), torch.randn_like(xt)
    torch.autograd.backward([z0, xt], [dz0, dxt])
    z_ref, x_ref, (gw, glnw, glnb, geps) = embed_reference(tokens, weight, t, eps, lnw, lnb, "cosine", dz0, dxt)
    close(z0, z_ref, dtype, "z0")
    close(xt, x_ref, dtype, "x_t", scale=2)
    close(weight.grad, gw, dtype, "dweight", scale=3)
    close(lnw.grad, glnw, dtype, "dln_weight", scale=10)
    close(lnb.grad, glnb, dtype, "dln_bias", scale=10)
    close(eps.grad, geps, dtype, "deps")

    z0b = z0.detach().requires_grad_()
    epsb = eps.detach().requires_grad_()
    ts = torch.rand(B, device=device, requires_grad=True)
    out = Fd.q_sample(z0b, ts, epsb, schedule="vp-linear", noise_factor=NOISE)
    g = torch.randn_like(out)
    out.backward(g)
    a, s = alpha_sigma64(ts.detach(), B, L)("vp-linear")
    close(out, a * z0b.double() + s * NOISE * epsb.double(), dtype, "q_sample")
    close(z0b.grad, a * g.double(), dtype, "dz0")
    close(epsb.grad, s * NOISE * g.double(), dtype, "deps")
    assert ts.grad is None  # t gets no gradient (documented)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_functions_match_float64_and_op(dtype, device, triton_backend):
    """The ops' autograd.Functions (the eager CUDA paths) against the float64 oracles
    above, and bitwise equal to the custom ops on the same inputs: every output and gradient, with
    both outputs of embed_and_noise used or only one, and q_sample with and without a gradient for eps."""
    B, L, V, D = 2, 5, 7, 19
    tokens = torch.randint(0, V, (B, L), device=device)
    weight = torch.randn(V, D, device=device).to(dtype)
    lnw, lnb = 1 + 0.3 * torch.randn(D, device=device), 0.2 * torch.randn(D, device=device)
    t = noise_levels(B, L, True, device)
    eps = torch.randn(B, L, D, device=device).to(dtype)
    dz0, dxt = torch.randn(B, L, D, device=device).to(dtype), torch.randn(B, L, D, device=device).to(dtype)

    def run(embed, upstream):
        leaves = [v.detach().requires_grad_() for v in (weight, lnw, lnb, eps)]
        w, lw, lb, e = leaves
        outs = embed(tokens, w, t, e, lw, lb, "vp-linear", NOISE, 1e-5)
        used = [(o, g) for o, g in zip(outs, upstream) if g is not None]
        grads = torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used], allow_unused=True)
        return [*outs, *(torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads))]

    names = ("z0", "x_t", "dweight", "dln_weight", "dln_bias", "deps")
    scales = (1, 2, 3, 10, 10, 1)
    for upstream in ([dz0, dxt], [None, dxt], [dz0, None]):
        fn = run(nz.embed_and_noise_fwd.function.apply, upstream)
        op = run(torch.ops.fastdiss.embed_and_noise_fwd, upstream)
        z_ref, x_ref, grads_ref = embed_reference(tokens, weight, t, eps, lnw, lnb, "vp-linear",
                                                  *(torch.zeros_like(dz0) if g is None else g for g in upstream))
        for name, scale, a, o, e in zip(names, scales, fn, op, [z_ref, x_ref, *grads_ref]):
            assert torch.equal(a, o), f"{name}: Function != op"
            close(a, e, dtype, name, scale=scale)
        assert fn[2].dtype == fn[5].dtype == dtype and fn[3].dtype == fn[4].dtype == torch.float32

    z0, g = torch.randn(B, L, D, device=device).to(dtype), torch.randn(B, L, D, device=device).to(dtype)
    a, s = alpha_sigma64(t, B, L)("cosine")
    for eps_grad in (True, False):
        results = []
        for q_sample in (nz.q_sample_fwd.function.apply, torch.ops.fastdiss.q_sample_fwd):
            zl, el = z0.detach().requires_grad_(), eps.detach().requires_grad_(eps_grad)
            out = q_sample(zl, t, el, "cosine", NOISE)
            out.backward(g)
            results.append((out, zl.grad, el.grad))
        (out, dz, de), (op_out, op_dz, op_de) = results
        assert torch.equal(out, op_out) and torch.equal(dz, op_dz), "q_sample: Function != op"
        close(out, a * z0.double() + s * NOISE * eps.double(), dtype, "q_sample")
        close(dz, a * g.double(), dtype, "q_sample dz0")
        if eps_grad:
            assert torch.equal(de, op_de), "q_sample deps: Function != op"
            close(de, s * NOISE * g.double(), dtype, "q_sample deps")
        else:
            assert de is None and op_de is None


def test_embed_gradient_through_one_output(device, triton_backend):
    """Only z0 or only x_t used: the other output's gradient counts as zero."""
    tokens = torch.randint(0, 6, (2, 4), device=device)
    weight = torch.randn(6, 16, device=device, requires_grad=True)
    eps = torch.randn(2, 4, 16, device=device, requires_grad=True)
    t = torch.rand(2, device=device)
    g = torch.randn(2, 4, 16, device=device)
    for which in (0, 1):
        weight.grad = eps.grad = None
        Fd.embed_and_noise(tokens, weight, t, eps, schedule="sqrt", noise_factor=NOISE)[which].backward(g)
        zero = torch.zeros_like(g)
        _, _, (gw, _, _, geps) = embed_reference(tokens, weight, t, eps, None, None, "sqrt",
                                                 g if which == 0 else zero, g if which == 1 else zero)
        close(weight.grad, gw, torch.float32, f"dweight via output {which}", scale=3)
        if which == 0:
            assert eps.grad is None or torch.equal(eps.grad, torch.zeros_like(eps))
        else:
            close(eps.grad, geps, torch.float32, "deps")


def test_backends_agree(device, triton_backend):
    tokens = torch.randint(0, 7, (2, 4), device=device)
    weight, t = torch.randn(7, 16, device=device), torch.rand(2, device=device)
    eps = torch.randn(2, 4, 16, device=device)
    fast = Fd.embed_and_noise(tokens, weight, t, eps, schedule="sqrt", noise_factor=NOISE)
    fast_q = Fd.q_sample(fast[0], t, eps, "sqrt", NOISE)
    fastdiss.set_backend("torch")
    slow = Fd.embed_and_noise(tokens, weight, t, eps, schedule="sqrt", noise_factor=NOISE)
    for a, e in zip((*fast, fast_q), (*slow, Fd.q_sample(slow[0], t, eps, "sqrt", NOISE))):
        close(a, e, torch.float32, "backend torch vs triton")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_opcheck(backend, device, triton_backend):
    fastdiss.set_backend(backend)
    B, L, V, D = 2, 3, 6, 8
    z0 = torch.randn(B, L, D, requires_grad=True, device=device)
    eps = torch.randn(B, L, D, requires_grad=True, device=device)
    for t in (torch.rand(B, device=device), torch.rand(B, L, device=device)):
        torch.library.opcheck(torch.ops.fastdiss.q_sample_fwd.default, (z0, t, eps, "cosine", 2.0))
    g = torch.randn(B, L, D, device=device)
    torch.library.opcheck(torch.ops.fastdiss.q_sample_bwd.default, (g, torch.rand(B, device=device), "sqrt", 2.0,
                                                                   True, True))
    tokens = torch.randint(0, V, (B, L), device=device)
    weight = torch.randn(V, D, requires_grad=True, device=device)
    lnw = torch.randn(D, device=device, requires_grad=True)
    lnb = torch.randn(D, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastdiss.embed_and_noise_fwd.default,
                          (tokens, weight, torch.rand(B, L, device=device), eps, lnw, lnb, "vp-linear", 2.0, 1e-5))
    torch.library.opcheck(torch.ops.fastdiss.embed_and_noise_fwd.default,
                          (tokens, weight, torch.rand(B, device=device), eps, None, None, "sqrt", 1.0, 1e-5))
    torch.library.opcheck(torch.ops.fastdiss.embed_and_noise_bwd.default,
                          (g, torch.randn(B, L, D, device=device), tokens, weight.detach(),
                           torch.rand(B, device=device), lnw.detach(), True, "cosine", 1e-5))


def test_torch_compile_fullgraph(device, triton_backend):
    torch._dynamo.reset()

    def train_step(tokens, weight, t, eps, lnw):
        z0, xt = Fd.embed_and_noise(tokens, weight, t, eps, lnw, None, schedule="cosine", noise_factor=2.0)
        x2 = Fd.q_sample(z0, t, eps, schedule="cosine", noise_factor=2.0)
        return (xt * x2).sum() + z0.square().sum()

    tokens = torch.randint(0, 7, (2, 5), device=device)
    inputs = (torch.randn(7, 16, device=device), torch.rand(2, 5, device=device),
              torch.randn(2, 5, 16, device=device), torch.randn(16, device=device))
    leaves_c = [v.clone().requires_grad_(i != 1) for i, v in enumerate(inputs)]
    leaves_e = [v.clone().requires_grad_(i != 1) for i, v in enumerate(inputs)]
    out_c = torch.compile(train_step, fullgraph=True, backend="aot_eager")(tokens, *leaves_c)
    out_c.backward()
    fastdiss.set_backend("torch")
    out_e = train_step(tokens, *leaves_e)
    out_e.backward()
    close(out_c, out_e, torch.float32, "compiled loss")
    for i, (a, e) in enumerate(zip(leaves_c, leaves_e)):
        if i != 1:
            close(a.grad, e.grad, torch.float32, "compiled grad", scale=2)


def _q_args(**kw):
    args = dict(z0=torch.ones(2, 3, 4), t=torch.rand(2), eps=torch.ones(2, 3, 4), schedule="sqrt", noise_factor=1.0)
    args.update(kw)
    return args


def _e_args(**kw):
    args = dict(tokens=torch.zeros(2, 3, dtype=torch.int64), weight=torch.ones(5, 4), t=torch.rand(2),
                eps=torch.ones(2, 3, 4), ln_weight=None, ln_bias=None, schedule="sqrt", noise_factor=1.0, ln_eps=1e-5)
    args.update(kw)
    return args


@pytest.mark.parametrize("fn,kwargs,exc,needle", [
    ("q", dict(z0=torch.ones(2, 4)), ValueError, r"z0 must have 3 dims, got shape \(2, 4\)"),
    ("q", dict(z0=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError, "z0 has dtype torch.int32"),
    ("q", dict(t=torch.rand(3)), ValueError, r"t must have shape \(2,\) \(per sequence\) or \(2, 3\)"),
    ("q", dict(t=torch.zeros(2, dtype=torch.int64)), TypeError, "t has dtype torch.int64"),
    ("q", dict(eps=torch.ones(2, 3, 5)), ValueError, r"eps must have the shape of z0 \(2, 3, 4\)"),
    ("q", dict(eps=torch.ones(2, 3, 4, dtype=torch.float16)), TypeError, "eps has dtype torch.float16"),
    ("q", dict(schedule="linear"), ValueError, "unknown noise schedule 'linear'"),
    ("q", dict(noise_factor="2"), TypeError, "noise_factor must be a real number, got str"),
    ("e", dict(tokens=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "tokens has dtype torch.int32"),
    ("e", dict(tokens=torch.zeros(6, dtype=torch.int64)), ValueError, "tokens must have 2 dims"),
    ("e", dict(weight=torch.ones(5, 4, 1)), ValueError, "weight must have 2 dims"),
    ("e", dict(eps=torch.ones(2, 3, 5)), ValueError, r"eps must have shape \(2, 3, 4\)"),
    ("e", dict(ln_weight=torch.ones(3)), ValueError, r"ln_weight must have shape \(4,\)"),
    ("e", dict(ln_bias=torch.ones(4, dtype=torch.int64)), TypeError, "ln_bias has dtype torch.int64"),
    ("e", dict(ln_eps=-1.0), ValueError, "ln_eps must be a non-negative real number"),
    ("e", dict(tokens=torch.full((2, 3), 5, dtype=torch.int64)), ValueError, r"tokens must be ids in \[0, 5\)"),
])
def test_input_validation(fn, kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        if fn == "q":
            Fd.q_sample(**_q_args(**kwargs))
        else:
            Fd.embed_and_noise(**_e_args(**kwargs))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (interpreter) path; CUDA skips the check (no host sync)")
def test_out_of_range_tokens_rejected_by_triton_path(triton_backend):
    needle = r"tokens must be ids in \[0, 5\) \(the rows of weight\), got values in \[-1, 0\]"
    with pytest.raises(ValueError, match=needle):
        Fd.embed_and_noise(**_e_args(tokens=torch.tensor([[0, -1, 0], [0, 0, 0]])))
