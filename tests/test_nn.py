"""fastdiss.nn layers load the state_dict of the torch module they mirror and match its outputs and
gradients (inputs and parameters), under the 'auto' and 'triton' backends: on CPU that is the
PyTorch reference and the kernels under the interpreter, on a GPU the real kernels twice."""
import pytest
import torch

import fastdiss
from fastdiss import nn as fnn

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(params=["auto", "triton"])
def backend(request):
    prev = fastdiss.get_backend()
    fastdiss.set_backend(request.param)
    yield request.param
    fastdiss.set_backend(prev)


def randomize_(module):
    """Non-trivial parameters (torch initialises the biases to zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def grads(module, *inputs):
    return [t.grad for t in inputs] + [p.grad for _, p in sorted(module.named_parameters())]


def assert_all_close(got, ref, what):
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(g, r, **TOL, msg=lambda m: f"{what}[{i}]: {m}")


# ---------------------------------------------------------------- MultiheadAttention
MHA_CASES = {  # name: (kdim, vdim, batch_first, self_attention, bias)
    "self": (None, None, True, True, True),
    "self_seq_first": (None, None, False, True, True),
    "cross_same_dims": (None, None, True, False, True),
    "cross_kdim_vdim": (12, 20, True, False, True),
    "cross_kdim_seq_first_nobias": (12, 12, False, False, False),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_matches_torch(case, backend, device):
    kdim, vdim, batch_first, self_attn, bias = MHA_CASES[case]
    E, H, B, Lq = 32, 2, 3, 5
    Lk = Lq if self_attn else 7
    ref = randomize_(torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first,
                                                 device=device))
    ours = fnn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first, device=device)
    ours.load_state_dict(ref.state_dict())

    q = torch.randn(B, Lq, E, device=device)
    k = q if self_attn else torch.randn(B, Lk, kdim or E, device=device)
    v = q if self_attn else torch.randn(B, Lk, vdim or E, device=device)
    mask = torch.rand(B, Lk, device=device) < 0.4
    mask[:, 1] = False
    mask[0] = True  # batch row 0: every key is padding
    valid = torch.arange(1, B, device=device)
    g = torch.randn(B, Lq, E, device=device)

    def run(module, b):
        """Forward/backward on batch rows `b`; returns output (batch first) and all gradients."""
        module.zero_grad()
        leaves = [t[b].clone().requires_grad_() for t in ((q,) if self_attn else (q, k, v))]
        qq, kk, vv = (leaves * 3) if self_attn else leaves
        if not batch_first:
            qq, kk, vv = (t.transpose(0, 1) for t in (qq, kk, vv))
            if self_attn:
                kk = vv = qq
        out, w = module(qq, kk, vv, key_padding_mask=mask[b], need_weights=False)
        assert w is None
        out = out if batch_first else out.transpose(0, 1)
        (out[-len(valid):] * g[valid]).sum().backward()  # the fully padded row gets no gradient
        return out.detach(), grads(module, *leaves)

    ref_out, ref_grads = run(ref, valid)  # torch gives NaN for the fully padded row: leave it out
    out, our_grads = run(ours, torch.arange(B, device=device))
    torch.testing.assert_close(out[valid], ref_out, **TOL)
    assert torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[0], (ours.out_proj.bias if bias else torch.zeros(E, device=device)).detach().expand(Lq, E))
    n_in = 1 if self_attn else 3
    assert_all_close([gr[valid] for gr in our_grads[:n_in]] + our_grads[n_in:], ref_grads, "grads")
    for gr in our_grads[:n_in]:
        assert torch.all(gr[0] == 0)


def test_multihead_attention_causal(backend, device):
    E, H, B, L = 32, 4, 2, 6
    ref = randomize_(torch.nn.MultiheadAttention(E, H, batch_first=True, device=device))
    ours = fnn.MultiheadAttention(E, H, device=device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, L, E, device=device)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)  # torch: True = not allowed
    want = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(ours(x, x, x, is_causal=True)[0], want, **TOL)
    torch.testing.assert_close(ours(x, x, x, attn_mask=causal, is_causal=True)[0], want, **TOL)
    pad = torch.zeros(B, L, dtype=torch.bool, device=device)
    pad[1, -2:] = True
    want = ref(x, x, x, key_padding_mask=pad, attn_mask=causal, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(ours(x, x, x, key_padding_mask=pad, is_causal=True)[0], want, **TOL)


def test_multihead_attention_unbatched_and_default_init():
    E, H, L = 16, 2, 5
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True)
    ours = fnn.MultiheadAttention(E, H)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert torch.all(ours.in_proj_bias == 0) and torch.all(ours.out_proj.bias == 0)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(L, E)
    torch.testing.assert_close(ours(x, x, x)[0], ref(x, x, x, need_weights=False)[0], **TOL)


def test_multihead_attention_dropout_falls_back_to_sdpa():
    """Training with dropout > 0 uses SDPA (same random stream as torch); eval uses the kernel."""
    E, H, B, L = 16, 2, 2, 6
    ref = randomize_(torch.nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True))
    ours = fnn.MultiheadAttention(E, H, dropout=0.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, L, E)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, -3:] = True
    torch.manual_seed(1)
    want = ref(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    torch.manual_seed(1)
    got = ours(x, x, x, key_padding_mask=pad)[0]
    torch.testing.assert_close(got, want, **TOL)
    ref.eval()
    ours.eval()
    torch.testing.assert_close(ours(x, x, x, key_padding_mask=pad)[0],
                               ref(x, x, x, key_padding_mask=pad, need_weights=False)[0], **TOL)
    assert not torch.allclose(got, ours(x, x, x, key_padding_mask=pad)[0])


def test_multihead_attention_bad_inputs():
    m = fnn.MultiheadAttention(16, 2)
    x = torch.randn(2, 5, 16)
    with pytest.raises(NotImplementedError, match="key_padding_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="need_weights=False"):
        m(x, x, x, need_weights=True)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape .*\(2, 5\)"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key must have shape"):
        m(x, torch.randn(2, 5, 8), x)
    with pytest.raises(ValueError, match="divisible"):
        fnn.MultiheadAttention(10, 3)


# ---------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("shape,affine,bias", [(24, True, True), (24, False, False), (24, True, False),
                                               ((3, 8), True, True)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_torch(shape, affine, bias, with_residual, backend, device):
    ref = torch.nn.LayerNorm(shape, eps=1e-5, elementwise_affine=affine, bias=bias, device=device)
    if affine:
        randomize_(ref)
    ours = fnn.LayerNorm(shape, eps=1e-5, elementwise_affine=affine, bias=bias, device=device)
    ours.load_state_dict(ref.state_dict())
    dims = (shape,) if isinstance(shape, int) else shape
    x = torch.randn(2, 5, *dims, device=device)
    r = torch.randn(2, 5, *dims, device=device)
    g_y, g_h = torch.randn_like(x), torch.randn_like(x)

    def run(module, fused):
        module.zero_grad()
        xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        if not with_residual:
            y = module(xx)
            (y * g_y).sum().backward()
            return [y.detach()] + grads(module, xx)
        if fused:
            y, h = module(xx, residual=rr)
        else:
            h = xx + rr
            y = module(h)
        ((y * g_y).sum() + (h * g_h).sum()).backward()
        return [y.detach(), h.detach()] + grads(module, xx, rr)

    assert_all_close(run(ours, True), run(ref, False), "layer_norm")


def test_layer_norm_bad_inputs():
    ln = fnn.LayerNorm(8)
    with pytest.raises(ValueError, match="normalized_shape"):
        ln(torch.randn(2, 7))
    with pytest.raises(ValueError, match="residual"):
        ln(torch.randn(2, 8), residual=torch.randn(3, 8))


# ---------------------------------------------------------------- SelfCondProjection
@pytest.mark.parametrize("bias,with_add", [(True, True), (True, False), (False, True)])
def test_self_cond_projection_matches_linear(bias, with_add, backend, device):
    d_in, d_out = 12, 20
    ref = randomize_(torch.nn.Linear(2 * d_in, d_out, bias=bias, device=device))
    ours = fnn.SelfCondProjection(d_in, d_out, bias=bias, device=device)
    ours.load_state_dict(ref.state_dict())
    x_t, sc = torch.randn(2, 5, d_in, device=device), torch.randn(2, 5, d_in, device=device)
    add, g = torch.randn(2, 5, d_out, device=device), torch.randn(2, 5, d_out, device=device)

    def run(module, fused):
        module.zero_grad()
        xx, ss, aa = (t.clone().requires_grad_() for t in (x_t, sc, add))
        a = aa if with_add else None
        y = module(xx, ss, add=a) if fused else module(torch.cat([xx, ss], -1)) + (0 if a is None else a)
        (y * g).sum().backward()
        return [y.detach()] + grads(module, xx, ss) + ([aa.grad] if with_add else [])

    assert_all_close(run(ours, True), run(ref, False), "self_cond_projection")


def test_self_cond_projection_bad_inputs():
    m = fnn.SelfCondProjection(8, 4)
    with pytest.raises(ValueError, match="sc must be a tensor of shape"):
        m(torch.randn(2, 8), torch.randn(2, 7))


def test_import_fastdiss_exposes_nn_and_functional_like_torch():
    import subprocess
    import sys
    code = "import fastdiss; print(fastdiss.nn.MultiheadAttention.__name__, fastdiss.functional.attention.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["MultiheadAttention", "attention"]
