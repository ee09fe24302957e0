"""Property tests: every op of fastdiss.functional against a float64 oracle written here, on shapes,
lengths, padding patterns, dtypes, layouts and options drawn by hypothesis (issue 8, item 4).

The Triton kernels run under the interpreter (backend 'triton' on CPU tensors); ddim_step runs the
C++ op when the extension is built. Each example is tiny because the interpreter costs milliseconds
per program. Examples are derandomized so CI sees the same cases every run; a failure prints the
drawn arguments, which replay with `@example(...)`.

Tolerances are per dtype: the kernels compute in fp32 and round once on store, so the bound is a
few units in the last place of the output dtype (relative) plus a small absolute term for values
near zero. bf16 is looser also because the interpreter rounds fp32 -> bf16 toward zero.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdiss
from fastdiss import functional as Fd
from fastdiss.schedule import SCHEDULES, alpha_sigma

pytestmark = pytest.mark.interpreter

PROPERTY = settings(max_examples=20, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (atol, rtol) of outputs rounded once from fp32; ops that round intermediates scale these up.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2)}


@pytest.fixture(autouse=True, scope="module")
def triton_on_cpu():
    """Backend 'triton': CPU tensors go through the Triton kernels under the interpreter."""
    before = fastdiss.get_backend()
    fastdiss.set_backend("triton")
    yield
    fastdiss.set_backend(before)


# ---------------------------------------------------------------------------------------------- helpers

def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    """Fresh normal values (never zeros) rounded to `dtype`."""
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def check(name, got, want, dtype, scale=1.0, mag=None):
    """|got - want| <= scale * (atol + rtol * mag) elementwise (mag: |want| unless given), else report
    the count and the worst element."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    atol, rtol = TOL[dtype]
    g, w = got.double(), want.double()
    err = (g - w).abs()
    bad = ~(err <= scale * (atol + rtol * (w.abs() if mag is None else mag)))   # NaN counts as bad
    if bool(bad.any()):
        i = int(torch.where(bad.reshape(-1), err.reshape(-1).nan_to_num(float("inf")),
                            torch.zeros(())).argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{name} ({dtype}): {int(bad.sum())}/{err.numel()} elements out of tolerance; "
                             f"worst at {idx}: got {g.reshape(-1)[i].item():.6g}, want {w.reshape(-1)[i].item():.6g}")


def leaves(*tensors):
    """Leaf copies that require grad (None passes through)."""
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def grads64(fn, inputs, upstream):
    """Outputs and input gradients of `fn` evaluated in float64 on the same (rounded) inputs."""
    xs = leaves(*[None if t is None else t.double() for t in inputs])
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [u.double() for u in upstream])
    return [o.detach() for o in outs], [None if x is None else x.grad for x in xs]


def grads_op(fn, inputs, upstream):
    xs = leaves(*inputs)
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, list(upstream))
    return [o.detach() for o in outs], [None if x is None else x.grad for x in xs]


def padding_mask(g, B, L, pattern):
    """Bool (B, L), True = padding: right padding to random lengths, random holes, or either with
    some rows fully padded (only the first row when B == 1)."""
    if pattern == "lengths" or pattern == "lengths+empty":
        lens = torch.randint(1, L + 1, (B,), generator=g)
        mask = torch.arange(L)[None, :] >= lens[:, None]
    else:
        mask = torch.rand(B, L, generator=g) < 0.4
    if pattern.endswith("+empty"):
        rows = torch.rand(B, generator=g) < 0.5
        rows[0] = True
        mask[rows] = True
    return mask


def schedule_t(g, B, L, per_token):
    """Noise levels in [0, 1] with the ends included when there is room."""
    t = torch.rand((B, L) if per_token else (B,), generator=g)
    flat = t.view(-1)
    if flat.numel() >= 3:
        flat[0], flat[-1] = 0.0, 1.0
    return t


# ---------------------------------------------------------------------------------------------- attention

def attention64(q, k, v, mask, causal, scale):
    """softmax(q k^T scale) v over the kept keys; a query with no key left gives 0."""
    s = (q @ k.transpose(-1, -2)) * scale
    Lq, Lk = s.shape[-2:]
    keep = torch.ones(s.shape[0], 1, Lq, Lk, dtype=torch.bool)
    if mask is not None:
        keep = keep & ~mask[:, None, None, :]
    if causal:
        keep = keep & torch.ones(Lq, Lk, dtype=torch.bool).tril()
    live = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~live, 0.0)
    return (torch.softmax(s, -1) * live) @ v


@st.composite
def attention_cases(draw):
    causal = draw(st.booleans())
    Lq = draw(st.integers(1, 20))
    Lk = Lq if causal or draw(st.booleans()) else draw(st.integers(1, 20))   # cross-attention: Lk != Lq
    return dict(B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), Lq=Lq, Lk=Lk, causal=causal,
                D=draw(st.sampled_from([1, 8, 16, 20, 32])), dtype=draw(st.sampled_from(DTYPES)),
                mask=draw(st.sampled_from(["none", "lengths", "holes", "lengths+empty", "holes+empty"])),
                layout=draw(st.sampled_from(["bhld", "blhd"])), scale=draw(st.sampled_from([None, 0.3])),
                seed=draw(st.integers(0, 2**31 - 1)))


@PROPERTY
@given(attention_cases())
def test_attention(case):
    c = case
    g = gen(c["seed"])
    B, H, Lq, Lk, D, dtype = c["B"], c["H"], c["Lq"], c["Lk"], c["D"], c["dtype"]

    def qkv(L):
        if c["layout"] == "blhd":   # a (B, L, H, D) projection output viewed as heads: strided
            return randn(g, B, L, H, D, dtype=dtype).transpose(1, 2)
        return randn(g, B, H, L, D, dtype=dtype)
    q, k, v = qkv(Lq), qkv(Lk), qkv(Lk)
    mask = None if c["mask"] == "none" else padding_mask(g, B, Lk, c["mask"])
    do = randn(g, B, H, Lq, D, dtype=dtype)
    scale = 1.0 / math.sqrt(D) if c["scale"] is None else c["scale"]

    (o,), grads = grads_op(lambda q, k, v: Fd.attention(q, k, v, mask, is_causal=c["causal"], scale=c["scale"]),
                           (q, k, v), (do,))
    (o64,), grads64_ = grads64(lambda q, k, v: attention64(q, k, v, mask, c["causal"], scale), (q, k, v), (do,))
    # the kernel rounds p (and dS) to the input dtype before the second matmul: ~sqrt(L) roundings add up
    check("out", o, o64, dtype, scale=2.0)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads64_):
        check(name, got, want, dtype, scale=4.0 * max(1.0, math.sqrt(max(Lq, Lk) / 4)))
    if mask is not None:   # a query whose keys are all padding gives exactly 0 and no gradient through it
        empty = mask.all(1)
        assert torch.all(o[empty] == 0) and torch.all(grads[0][empty] == 0)


# ---------------------------------------------------------------------------------------------- layer_norm

@st.composite
def layer_norm_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    return dict(lead=draw(st.sampled_from([(1,), (5,), (2, 7), (3, 1, 4)])),
                N=draw(st.sampled_from([1, 3, 16, 33, 64])),
                dtype=dtype, pdtype=draw(st.sampled_from([dtype, torch.float32])),
                weight=draw(st.booleans()), bias=draw(st.booleans()),
                residual=draw(st.sampled_from([None, dtype, torch.float32])),
                eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])), transposed=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


@PROPERTY
@given(layer_norm_cases())
def test_layer_norm(case):
    c = case
    g = gen(c["seed"])
    shape, dtype, N = (*c["lead"], c["N"]), c["dtype"], c["N"]
    x = randn(g, *shape, dtype=dtype, scale=2.0) + 0.5
    if c["transposed"]:   # a non-contiguous view with the same values
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    w = randn(g, N, dtype=c["pdtype"]) if c["weight"] else None
    b = randn(g, N, dtype=c["pdtype"]) if c["bias"] else None
    r = randn(g, *shape, dtype=c["residual"]) if c["residual"] is not None else None
    out_dtype = dtype if r is None else torch.promote_types(dtype, r.dtype)
    up = [randn(g, *shape, dtype=out_dtype)] + ([randn(g, *shape, dtype=out_dtype)] if r is not None else [])

    def ln64(x, w, b, r):
        h = x if r is None else (x + r).to(out_dtype).double()   # h is stored in the promoted dtype
        y = F.layer_norm(h, (N,), w, b, c["eps"])
        return y if r is None else (y, h)

    outs, grads = grads_op(lambda x, w, b, r: Fd.layer_norm(x, w, b, eps=c["eps"], residual=r), (x, w, b, r), up)
    outs64, grads64_ = grads64(ln64, (x, w, b, r), up)
    for name, got, want in zip(("y", "h"), outs, outs64):
        check(name, got, want, out_dtype)
    for name, got, want, t in zip(("dx", "dweight", "dbias", "dresidual"), grads, grads64_, (x, w, b, r)):
        if t is not None:   # dweight/dbias sum over rows: a rounding per term in half precision
            check(name, got, want, t.dtype, scale=1.0 if name in ("dx", "dresidual") else 2.0 + shape[0])


# ---------------------------------------------------------------------------------------------- noising

def q_sample64(z0, t, eps, schedule, noise_factor):
    """alpha(t), sigma(t) as fastdiss.schedule gives them for fp32 t (the op's definition), the rest in
    float64. (Near t = 0, sigma = sqrt(1 - alpha_bar) in fp32 is ~1% off the exact value: alpha_bar is
    clamped to 1 - 1e-6, which fp32 holds only to ~6e-8; the kernels share that with the schedule.)"""
    a, s = (v.double() for v in alpha_sigma(t.float(), schedule))
    a, s = (v[:, None, None] if t.dim() == 1 else v[..., None] for v in (a, s))
    return a * z0 + s * noise_factor * eps


@st.composite
def noising_cases(draw):
    return dict(B=draw(st.integers(1, 3)), L=draw(st.integers(1, 9)), D=draw(st.sampled_from([1, 5, 16, 40])),
                per_token=draw(st.booleans()), schedule=draw(st.sampled_from(SCHEDULES)),
                noise_factor=draw(st.sampled_from([1.0, 0.5, 1.7])), dtype=draw(st.sampled_from(DTYPES)),
                seed=draw(st.integers(0, 2**31 - 1)))


@PROPERTY
@given(noising_cases())
def test_q_sample(case):
    c = case
    g = gen(c["seed"])
    B, L, D, dtype = c["B"], c["L"], c["D"], c["dtype"]
    z0, eps, up = (randn(g, B, L, D, dtype=dtype) for _ in range(3))
    t = schedule_t(g, B, L, c["per_token"])
    args = (c["schedule"], c["noise_factor"])
    (xt,), (dz0, _, deps) = grads_op(lambda z, t, e: Fd.q_sample(z, t, e, *args), (z0, t, eps), (up,))
    (xt64,), (dz64, _, deps64) = grads64(lambda z, t, e: q_sample64(z, t, e, *args), (z0, t, eps), (up,))
    check("x_t", xt, xt64, dtype)
    check("dz0", dz0, dz64, dtype)
    check("deps", deps, deps64, dtype)


@st.composite
def embed_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    return dict(B=draw(st.integers(1, 3)), L=draw(st.integers(1, 9)), V=draw(st.sampled_from([1, 3, 11])),
                D=draw(st.sampled_from([1, 4, 16, 33])), per_token=draw(st.booleans()),
                schedule=draw(st.sampled_from(SCHEDULES)), noise_factor=draw(st.sampled_from([1.0, 1.7])),
                ln_eps=draw(st.sampled_from([1e-5, 1e-2])), dtype=dtype,
                ln=draw(st.sampled_from(["none", "weight", "both", "bias"])),
                ln_dtype=draw(st.sampled_from([dtype, torch.float32])),
                use_z0=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@PROPERTY
@given(embed_cases())
def test_embed_and_noise(case):
    """Small vocabularies make tokens repeat: the backward sums each entry's tokens before its LayerNorm."""
    c = case
    g = gen(c["seed"])
    B, L, V, D, dtype = c["B"], c["L"], c["V"], c["D"], c["dtype"]
    tokens = torch.randint(0, V, (B, L), generator=g)
    weight = randn(g, V, D, dtype=dtype, scale=1.5)
    eps = randn(g, B, L, D, dtype=dtype)
    t = schedule_t(g, B, L, c["per_token"])
    lnw = randn(g, D, dtype=c["ln_dtype"]) if c["ln"] in ("weight", "both") else None
    lnb = randn(g, D, dtype=c["ln_dtype"]) if c["ln"] in ("bias", "both") else None
    up_xt = randn(g, B, L, D, dtype=dtype)
    up = (randn(g, B, L, D, dtype=dtype), up_xt) if c["use_z0"] else (torch.zeros_like(up_xt), up_xt)
    kw = dict(schedule=c["schedule"], noise_factor=c["noise_factor"], ln_eps=c["ln_eps"])

    def ref64(w, e, lw, lb):
        z0 = F.layer_norm(w[tokens], (D,), lw, lb, c["ln_eps"])
        return z0, q_sample64(z0, t, e, c["schedule"], c["noise_factor"])

    outs, grads = grads_op(lambda w, e, lw, lb: Fd.embed_and_noise(tokens, w, t, e, lw, lb, **kw),
                           (weight, eps, lnw, lnb), up)
    outs64, grads64_ = grads64(ref64, (weight, eps, lnw, lnb), up)
    check("z0", outs[0], outs64[0], dtype)
    check("x_t", outs[1], outs64[1], dtype)
    reps = int(torch.bincount(tokens.view(-1), minlength=V).max())   # dE rows sum this many tokens
    for name, got, want, x in zip(("dweight", "deps", "dln_weight", "dln_bias"), grads, grads64_,
                                  (weight, eps, lnw, lnb)):
        if x is not None:
            check(name, got, want, x.dtype, scale=1.0 if name == "deps" else 2.0 + (reps if name == "dweight"
                                                                                    else B * L))


# ---------------------------------------------------------------------------------------------- self_cond_project

@st.composite
def self_cond_cases(draw):
    lead = draw(st.sampled_from([(1,), (6,), (2, 5), (3, 1, 4)]))
    N = draw(st.sampled_from([1, 7, 16, 40]))
    out = (*lead, N)
    adds = [None, out, out[-1:]]
    if len(out) >= 2:
        adds += [out[-2:], (*out[:-2], 1, N)]
    return dict(lead=lead, d=draw(st.sampled_from([1, 8, 17, 32])), N=N, bias=draw(st.booleans()),
                add=draw(st.sampled_from(adds)), dtype=draw(st.sampled_from(DTYPES)),
                seed=draw(st.integers(0, 2**31 - 1)))


@PROPERTY
@given(self_cond_cases())
def test_self_cond_project(case):
    c = case
    g = gen(c["seed"])
    lead, d, N, dtype = c["lead"], c["d"], c["N"], c["dtype"]
    x, sc = randn(g, *lead, d, dtype=dtype), randn(g, *lead, d, dtype=dtype)
    w = randn(g, N, 2 * d, dtype=dtype, scale=(2 * d) ** -0.5)
    b = randn(g, N, dtype=dtype) if c["bias"] else None
    add = randn(g, *c["add"], dtype=dtype) if c["add"] is not None else None
    up = randn(g, *lead, N, dtype=dtype)

    def ref64(x, sc, w, b, add):
        y = torch.cat([x, sc], -1) @ w.t() + (0 if b is None else b)
        return y if add is None else y + add

    (y,), grads = grads_op(lambda *a: Fd.self_cond_project(*a), (x, sc, w, b, add), (up,))
    (y64,), grads64_ = grads64(ref64, (x, sc, w, b, add), (up,))
    check("y", y, y64, dtype, scale=2.0)
    rows = math.prod(lead)
    for name, got, want, t in zip(("dx_t", "dsc", "dweight", "dbias", "dadd"), grads, grads64_, (x, sc, w, b, add)):
        if t is not None:   # the torch backward rounds its matmul sums in the input dtype
            check(name, got, want, dtype, scale=2.0 * max(1.0, math.sqrt(max(rows, N))))


# ---------------------------------------------------------------------------------------------- rounding CE

@st.composite
def rounding_cases(draw):
    V = draw(st.sampled_from([1, 5, 17, 40]))
    return dict(lead=draw(st.sampled_from([(1,), (7,), (2, 9), (3, 2, 3)])), V=V, d=draw(st.sampled_from([1, 8, 20])),
                dtype=draw(st.sampled_from(DTYPES)), emb_dtype=draw(st.sampled_from([None, torch.float32])),
                ignore_index=draw(st.sampled_from([-100, 0, V - 1])),
                ignored=draw(st.sampled_from(["none", "some", "all"])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                chunk_size=draw(st.sampled_from([None, 1, 3, 16])), seed=draw(st.integers(0, 2**31 - 1)))


@PROPERTY
@given(rounding_cases())
def test_rounding_cross_entropy(case):
    c = case
    g = gen(c["seed"])
    lead, V, d, dtype = c["lead"], c["V"], c["d"], c["dtype"]
    emb_dtype = c["emb_dtype"] or dtype
    x = randn(g, *lead, d, dtype=dtype)
    emb = randn(g, V, d, dtype=emb_dtype)
    ii = c["ignore_index"]
    targets = torch.randint(0, V, lead, generator=g)
    drop = {"none": torch.zeros(lead, dtype=torch.bool), "all": torch.ones(lead, dtype=torch.bool),
            "some": torch.rand(lead, generator=g) < 0.4}[c["ignored"]]
    targets[drop] = ii
    if c["ignored"] == "none":    # an ignore_index that is a vocabulary id must not hit a real target here
        targets[targets == ii] = ii + 1 if ii + 1 < V else ii - 1 if ii > 0 else targets[targets == ii]
    up = randn(g, *lead, dtype=torch.float32) if c["reduction"] == "none" else torch.tensor(1.7)
    kept = targets != ii

    def ref64(x, e):
        losses = F.cross_entropy((x @ e.t()).reshape(-1, V), targets.reshape(-1), reduction="none",
                                 ignore_index=ii).reshape(lead) * kept
        if c["reduction"] == "none":
            return losses
        total = losses.sum()
        return total / max(1, int(kept.sum())) if c["reduction"] == "mean" else total

    (loss,), (dx, de) = grads_op(lambda x, e: Fd.rounding_cross_entropy(
        x, e, targets, ignore_index=ii, reduction=c["reduction"], chunk_size=c["chunk_size"]), (x, emb), (up,))
    (loss64,), (dx64, de64) = grads64(ref64, (x, emb), (up,))
    compute = torch.promote_types(dtype, emb_dtype)
    n = max(1, int(kept.sum()))
    # loss is fp32 but computed from logits in `compute` precision: log-sum-exp over V rounded terms
    check("loss", loss, loss64.float(), torch.float32, scale=TOL[compute][1] / TOL[torch.float32][1] * 4 *
          (n if c["reduction"] == "sum" else 1))
    check("dx0_hat", dx, dx64, dtype, scale=4.0)
    check("dembedding", de, de64, emb_dtype, scale=4.0 * max(1.0, math.sqrt(math.prod(lead))))
    if c["ignored"] == "all":
        assert torch.all(loss == 0) and torch.all(dx == 0) and torch.all(de == 0)


# ---------------------------------------------------------------------------------------------- ddim_step

@st.composite
def ddim_cases(draw):
    return dict(B=draw(st.integers(1, 4)), L=draw(st.integers(1, 9)), D=draw(st.sampled_from([1, 3, 16, 64])),
                schedule=draw(st.sampled_from(SCHEDULES)), dtype=draw(st.sampled_from(DTYPES)),
                strided=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@PROPERTY
@given(ddim_cases())
def test_ddim_step(case):
    """x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t per token, for random s < t."""
    c = case
    g = gen(c["seed"])
    B, L, D, dtype = c["B"], c["L"], c["D"], c["dtype"]
    x0, xt = randn(g, B, L, D, dtype=dtype), randn(g, B, L, D, dtype=dtype)
    if c["strided"]:
        x0 = x0.transpose(0, 1).contiguous().transpose(0, 1)
    t = 0.05 + 0.95 * torch.rand(B, L, generator=g)
    s = t * torch.rand(B, L, generator=g)
    a_t, s_t = alpha_sigma(t, c["schedule"])
    a_s, s_s = alpha_sigma(s, c["schedule"])
    got = Fd.ddim_step(x0, xt, a_t, s_t, a_s, s_s)
    a_t, s_t, a_s, s_s = (v.double()[..., None] for v in (a_t, s_t, a_s, s_s))
    want = a_s * x0.double() + s_s * (xt.double() - a_t * x0.double()) / s_t
    # a few roundings in the inputs' dtype, each relative to the terms' size; sigma_s / sigma_t <= 1 keeps
    # the division from amplifying them
    check("x_s", got, want, dtype, scale=2.0, mag=x0.double().abs() + xt.double().abs() + want.abs())
