"""The C++/CUDA step ops torch.ops.fastdiss.{ddim_step, ddim_step_clamp, build_info}: registration
(opcheck), the formula against float64, the nearest-embedding rule (exact argmax, ties -> lowest
index), input errors, and the C++ build through CMake (slow)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdiss
from fastdiss import _ext
from fastdiss.schedule import alpha_sigma

if os.environ.get("FASTDISS_NO_EXT") == "1":
    pytest.skip("FASTDISS_NO_EXT=1: the extension is deliberately not built", allow_module_level=True)
if not _ext.available():  # a broken build must fail the suite, not skip it
    raise RuntimeError(f"fastdiss._C did not load: {_ext.build_info()}")

ROOT = Path(__file__).resolve().parents[1]
ops = torch.ops.fastdiss
EPS32 = torch.finfo(torch.float32).eps
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------- helpers

def make_step_inputs(B, L, D, dtype, device="cpu"):
    """Random latents and per-token (alpha, sigma) of the sqrt schedule at t in (0.05, 1), s in (0, t)."""
    t = torch.rand(B, L, device=device) * 0.95 + 0.05
    s = t * torch.rand(B, L, device=device)
    a_t, s_t = alpha_sigma(t, "sqrt")
    a_s, s_s = alpha_sigma(s, "sqrt")
    x0_hat = torch.randn(B, L, D, device=device).to(dtype)
    x_t = torch.randn(B, L, D, device=device).to(dtype)
    return x0_hat, x_t, a_t.float(), s_t.float(), a_s.float(), s_s.float()


def ddim_float64(x0, xt, a_t, s_t, a_s, s_s):
    """The formula in float64 and the size of its terms (the scale of float32 rounding errors)."""
    x0, xt = x0.double(), xt.double()
    a_t, s_t, a_s, s_s = (v.double().unsqueeze(-1) for v in (a_t, s_t, a_s, s_s))
    out = a_s * x0 + s_s * (xt - a_t * x0) / s_t
    scale = (a_s * x0).abs() + (s_s / s_t) * (xt.abs() + (a_t * x0).abs())
    return out, scale


def assert_step_close(actual, x0, xt, a_t, s_t, a_s, s_s):
    """Every element within float32 arithmetic error (a few eps times the terms) plus half an ulp of
    the output dtype (the single rounding of the float32 result)."""
    expected, scale = ddim_float64(x0, xt, a_t, s_t, a_s, s_s)
    out_eps = torch.finfo(actual.dtype).eps
    tol = 8 * EPS32 * scale + 0.5 * out_eps * expected.abs() + 1e-30
    err = (actual.double() - expected).abs()
    bad = err > tol
    if bad.any():
        worst = int((err / tol).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(f"{int(bad.sum())}/{err.numel()} elements out of tolerance; worst at {idx}: "
                             f"got {actual[idx].item()}, expected {expected[idx].item()}, tol {tol[idx].item():.3e}")


def row_index(used, emb):
    """Which embedding row each token of x0_used is (bitwise), or -1."""
    flat = used.reshape(-1, used.shape[-1])
    same = (flat[:, None, :] == emb[None, :, :]).all(-1)  # (tokens, V)
    idx = torch.where(same.any(-1), same.float().argmax(-1), torch.full_like(same[:, 0], -1, dtype=torch.long))
    return idx.view(used.shape[:-1])


# ---------------------------------------------------------------------------------------------- build info

def test_build_info_reports_this_torch():
    info = ops.build_info()
    fields = dict(kv.split("=", 1) for kv in info.split(";"))
    assert fields["torch"] == torch.__version__, info  # the extension was built against this torch
    assert fields["cuda"] in ("yes", "no")
    assert _ext.build_info()["torch"] == torch.__version__


# ---------------------------------------------------------------------------------------------- ddim_step

SHAPES = [(1, 1, 1), (2, 1, 8), (3, 7, 16), (2, 5, 33), (1, 9, 130)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_ddim_step_matches_formula(shape, dtype, device):
    inputs = make_step_inputs(*shape, dtype, device)
    out = ops.ddim_step(*inputs)
    assert out.shape == inputs[1].shape and out.dtype == dtype and out.device == inputs[1].device
    assert out.is_contiguous()
    assert_step_close(out, *inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_ddim_step_accepts_non_contiguous_inputs(device):
    x0, xt, a_t, s_t, a_s, s_s = make_step_inputs(3, 4, 6, torch.float32, device)
    x0_nc = x0.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    a_t_nc = a_t.t().contiguous().t()
    assert not x0_nc.is_contiguous() and not a_t_nc.is_contiguous()
    expected = ops.ddim_step(x0, xt, a_t, s_t, a_s, s_s)
    torch.testing.assert_close(ops.ddim_step(x0_nc, xt, a_t_nc, s_t, a_s, s_s), expected, rtol=0, atol=0)


def test_ddim_step_functional_uses_the_op():
    inputs = make_step_inputs(2, 3, 8, torch.float32)
    torch.testing.assert_close(fastdiss.functional.ddim_step(*inputs), ops.ddim_step(*inputs), rtol=0, atol=0)


def test_ddim_step_empty_batch():
    inputs = make_step_inputs(0, 3, 8, torch.float32)
    assert ops.ddim_step(*inputs).shape == (0, 3, 8)


# ---------------------------------------------------------------------------------------------- clamp

CLAMP_CASES = [(1, 1, 4, 1), (2, 1, 8, 7), (3, 5, 16, 100), (2, 4, 33, 257)]  # (B, L, D, V)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,D,V", CLAMP_CASES)
def test_clamp_picks_the_nearest_embedding(B, L, D, V, dtype, device):
    """x0_hat near a known row: that row is chosen, copied bit for bit, and fed to the DDIM update."""
    x0, xt, a_t, s_t, a_s, s_s = make_step_inputs(B, L, D, dtype, device)
    emb = torch.nn.functional.layer_norm(torch.randn(V, D, device=device), (D,)).to(dtype)
    target = torch.randint(V, (B, L), device=device)
    x0_hat = (emb[target].float() + 0.05 * torch.randn(B, L, D, device=device)).to(dtype)
    logits = x0_hat.double() @ emb.double().T
    top2 = logits.topk(min(2, V), dim=-1).values
    clear = (top2[..., 0] - top2[..., -1] > 1e-3) | (V == 1)  # tokens whose winner is unambiguous
    x_s, used = ops.ddim_step_clamp(x0_hat, xt, a_t, s_t, a_s, s_s, emb, True)
    chosen = row_index(used, emb)
    assert (chosen >= 0).all(), "x0_used must be exact copies of embedding rows"
    expected = logits.argmax(-1)
    assert torch.equal(chosen[clear], expected[clear])
    # Ambiguous tokens (near-ties in float32) must still pick a row whose logit is maximal within rounding.
    gap = logits.max(-1).values - logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    bound = 4 * D * EPS32 * (x0_hat.double().abs() @ emb.double().abs().T).max(-1).values
    assert (gap <= bound).all()
    assert_step_close(x_s, used, xt, a_t, s_t, a_s, s_s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clamp_random_x0_is_argmax_of_logits(dtype, device):
    """Unstructured x0_hat: the chosen row's logit equals the float64 maximum up to float32 rounding."""
    B, L, D, V = 2, 6, 24, 300
    x0, xt, a_t, s_t, a_s, s_s = make_step_inputs(B, L, D, dtype, device)
    emb = torch.randn(V, D, device=device).to(dtype)
    _, used = ops.ddim_step_clamp(x0, xt, a_t, s_t, a_s, s_s, emb, True)
    chosen = row_index(used, emb)
    logits = x0.double() @ emb.double().T
    gap = logits.max(-1).values - logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    bound = 4 * D * EPS32 * (x0.double().abs() @ emb.double().abs().T).max(-1).values
    assert (chosen >= 0).all() and (gap <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
def test_clamp_ties_pick_the_lowest_index(device):
    """Exact ties (representable logits) resolve to the lowest row index, across distant rows too."""
    V, D = 300, 4
    emb = torch.zeros(V, D, device=device)
    emb[:, 3] = -1.0  # logit 0 for x0 below
    # Four different rows with the same logit 1, spread over the vocabulary (different CUDA slices).
    emb[5] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    emb[7] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    emb[250] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    emb[299] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    x0 = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device).expand(1, 3, D).contiguous()
    xt = torch.randn(1, 3, D, device=device)
    c = torch.full((1, 3), 0.5, device=device)
    _, used = ops.ddim_step_clamp(x0, xt, c, c, c, c, emb, True)
    assert torch.equal(row_index(used, emb), torch.full((1, 3), 5, device=device))


def test_clamp_nan_logit_counts_as_maximum():
    D, V = 4, 6
    emb = torch.randn(V, D)
    emb[3, 1] = float("nan")
    x0, xt, a_t, s_t, a_s, s_s = make_step_inputs(1, 2, D, torch.float32)
    _, used = ops.ddim_step_clamp(x0, xt, a_t, s_t, a_s, s_s, emb, True)
    assert torch.isnan(used[..., 1]).all() and torch.equal(used[..., 0], emb[3, 0].expand(1, 2))


def test_clamp_cpu_chunking_over_a_large_vocabulary():
    """V = 2^17 makes the CPU path compute logits in chunks of 8 tokens; every chunk must be right."""
    B, L, D, V = 2, 11, 4, 1 << 17
    emb = torch.randn(V, D)
    target = torch.randint(V, (B, L))
    x0, xt, a_t, s_t, a_s, s_s = make_step_inputs(B, L, D, torch.float32)
    x0_hat = emb[target] * 3.0  # scaled copy: its own row wins unless another row is nearly parallel
    _, used = ops.ddim_step_clamp(x0_hat, xt, a_t, s_t, a_s, s_s, emb, True)
    expected = (x0_hat.double() @ emb.double().T).argmax(-1)
    assert torch.equal(row_index(used, emb), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_clamp_passes_x0_hat_through(dtype, device):
    inputs = make_step_inputs(2, 3, 8, dtype, device)
    emb = torch.randn(5, 8, device=device).to(dtype)
    x_s, used = ops.ddim_step_clamp(*inputs, emb, False)
    assert torch.equal(used, inputs[0]) and used.data_ptr() != inputs[0].data_ptr()
    assert torch.equal(x_s, ops.ddim_step(*inputs))


# ---------------------------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 5, 16), (3, 1, 7)])
def test_opcheck_ddim_step(shape, dtype, device):
    torch.library.opcheck(ops.ddim_step.default, make_step_inputs(*shape, dtype, device))


@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,D,V", [(1, 1, 8, 3), (2, 5, 16, 40)])
def test_opcheck_ddim_step_clamp(B, L, D, V, dtype, clamp, device):
    emb = torch.randn(V, D, device=device).to(dtype)
    torch.library.opcheck(ops.ddim_step_clamp.default, (*make_step_inputs(B, L, D, dtype, device), emb, clamp))


def test_backward_through_step_is_a_clear_error():
    x0, xt, a_t, s_t, a_s, s_s = make_step_inputs(1, 2, 4, torch.float32)
    x0.requires_grad_(True)
    out = ops.ddim_step(x0, xt, a_t, s_t, a_s, s_s)
    with pytest.raises(RuntimeError, match="not implemented"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------------- bad inputs

def _bad_step_cases():
    x0, xt, a_t, s_t, a_s, s_s = make_step_inputs(2, 3, 4, torch.float32)
    good = dict(x0_hat=x0, x_t=xt, alpha_t=a_t, sigma_t=s_t, alpha_s=a_s, sigma_s=s_s)
    return good, [  # (what, changed arguments, error type, message pattern)
        ("x_t 2-D", dict(x_t=xt[0], x0_hat=x0[0]), ValueError,
         r"x_t must be a 3-D tensor \(B, L, D\); got shape \[3, 4\]"),
        ("x_t int", dict(x_t=xt.long(), x0_hat=x0.long()), TypeError,
         r"x_t must be float32, float16 or bfloat16; got torch.int64"),
        ("x0 shape", dict(x0_hat=x0[:, :2]), ValueError,
         r"x0_hat must have the shape of x_t \[2, 3, 4\]; got \[2, 2, 4\]"),
        ("x0 dtype", dict(x0_hat=x0.half()), TypeError,
         r"x0_hat must have the dtype of x_t \(torch.float32\); got torch.float16"),
        ("alpha shape", dict(alpha_t=a_t[:, :1]), ValueError,
         r"alpha_t must have shape \(B, L\) = \[2, 3\].*got \[2, 1\]"),
        ("sigma 3-D", dict(sigma_s=s_s[..., None]), ValueError,
         r"sigma_s must have shape \(B, L\) = \[2, 3\].*got \[2, 3, 1\]"),
        ("sigma dtype", dict(sigma_t=s_t.double()), TypeError, r"sigma_t must be float32; got torch.float64"),
    ]


def test_ddim_step_rejects_bad_inputs_naming_the_argument():
    good, cases = _bad_step_cases()
    for name, change, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            ops.ddim_step(**{**good, **change})
        with pytest.raises(exc, match=pattern):
            ops.ddim_step_clamp(**{**good, **change}, embedding_normed=torch.randn(3, 4), clamp=True)


def test_clamp_rejects_bad_embeddings():
    inputs = make_step_inputs(2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match=r"embedding_normed must have shape \(V, D\) with D = 4.*got \[5, 3\]"):
        ops.ddim_step_clamp(*inputs, torch.randn(5, 3), True)
    with pytest.raises(TypeError, match=r"embedding_normed must have the dtype of x_t \(torch.float32\); "
                                        r"got torch.bfloat16"):
        ops.ddim_step_clamp(*inputs, torch.randn(5, 4, dtype=torch.bfloat16), True)
    with pytest.raises(ValueError, match=r"at least one row when clamp=True"):
        ops.ddim_step_clamp(*inputs, torch.randn(0, 4), True)


def test_fake_impl_rejects_the_same_inputs():
    """Tracing (FakeTensor) raises the kernel's error types, so compiled graphs fail early and clearly."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    good, cases = _bad_step_cases()
    with FakeTensorMode() as mode:
        for name, change, exc, pattern in cases:
            args = {k: mode.from_tensor(v) for k, v in {**good, **change}.items()}
            with pytest.raises(exc, match=pattern):
                ops.ddim_step(**args)
        out = ops.ddim_step(**{k: mode.from_tensor(v) for k, v in good.items()})
        assert out.shape == (2, 3, 4) and out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
def test_cuda_ddim_step_equals_eager_pytorch_bitwise():
    """The CUDA kernel avoids FMA contraction and fast division: float32 results equal eager PyTorch."""
    inputs = make_step_inputs(4, 33, 64, torch.float32, "cuda")
    ref = fastdiss.functional.ddim_step_reference(*inputs)
    assert torch.equal(ops.ddim_step(*inputs), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_cuda_clamp_matches_cpu_and_replays_in_a_graph(B):
    L, D, V = 16, 64, 8000
    x0, xt, a_t, s_t, a_s, s_s = make_step_inputs(B, L, D, torch.float32, "cuda")
    emb = torch.nn.functional.layer_norm(torch.randn(V, D, device="cuda"), (D,))
    target = torch.randint(V, (B, L), device="cuda")
    x0_hat = emb[target] + 0.05 * torch.randn(B, L, D, device="cuda")
    args = (x0_hat, xt, a_t, s_t, a_s, s_s, emb, True)
    x_s, used = ops.ddim_step_clamp(*args)
    x_s_cpu, used_cpu = ops.ddim_step_clamp(*(a.cpu() if torch.is_tensor(a) else a for a in args))
    assert torch.equal(used, emb[target]) and torch.equal(used.cpu(), used_cpu)
    torch.testing.assert_close(x_s.cpu(), x_s_cpu)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.ddim_step_clamp(*args)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        g_x_s, g_used = ops.ddim_step_clamp(*args)
    x0_hat.copy_(emb[target.roll(1, 1)] + 0.05 * torch.randn_like(x0_hat))  # new inputs, same buffers
    graph.replay()
    e_x_s, e_used = ops.ddim_step_clamp(*args)
    assert torch.equal(g_used, e_used) and torch.equal(g_x_s, e_x_s)


# ---------------------------------------------------------------------------------------------- no extension

def test_import_without_the_extension_falls_back_to_pytorch():
    """With fastdiss._C unimportable, `import fastdiss` is silent (nothing at import needs it),
    functional.ddim_step uses the PyTorch reference, and `fastdiss env` reports the extension missing
    with the build command."""
    code = (
        "import importlib.abc, sys, warnings\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fastdiss._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastdiss, torch\n"
        "assert not [str(x.message) for x in w if 'fastdiss' in str(x.message)], [str(x.message) for x in w]\n"
        "assert not fastdiss._ext.available()\n"
        "from fastdiss import env\n"
        "line = [s for s in env.format_report(env.collect()).splitlines() if s.startswith('fastdiss._C')][0]\n"
        "assert 'not available (ImportError: blocked for the test)' in line, line\n"
        "assert 'pip install --no-build-isolation -e .' in line, line\n"
        "x = torch.randn(1, 2, 3); c = torch.full((1, 2), 0.5)\n"
        "out = fastdiss.functional.ddim_step(x, x, c, c, c, c)\n"
        "torch.testing.assert_close(out, fastdiss.functional.ddim_step_reference(x, x, c, c, c, c))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- CMake

@pytest.mark.slow
def test_cmake_builds_and_runs_the_example(tmp_path):
    """The README's CMake route: configure with torch's CMake config, build, run the example."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    configure = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DPython3_EXECUTABLE={sys.executable}",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    env = {**os.environ, "MAKEFLAGS": "-j2"}
    result = subprocess.run(configure, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CMake Warning" not in result.stderr, result.stderr  # torch's config is quiet with our fixes
    result = subprocess.run(["cmake", "--build", str(tmp_path), "-j", os.environ.get("MAX_JOBS", "2")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = subprocess.run([str(tmp_path / "fastdiss_example")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout and f"torch={torch.__version__.split('+')[0]}" in run.stdout
