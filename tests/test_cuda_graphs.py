"""CUDA-graph engine: bucketing and fallback (everywhere), capture/replay against eager (GPU)."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastdiss import cuda_graphs
from fastdiss.config import preset
from fastdiss.cuda_graphs import CUDAGraphEngine, bucket_batch, bucket_length
from fastdiss.python_engine import PythonEngine
from fastdiss.model import Denoiser
from fastdiss.schedule import time_grid

VOCAB = 97


def _model(device, seed=0):
    cfg = preset("tiny")
    torch.manual_seed(seed)
    return Denoiser(cfg.model, VOCAB, 0).to(device).eval(), cfg


def _inputs(model, device, B=3, Ls=7, L=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(1, VOCAB, (B, Ls), generator=gen).to(device)
    src_mask = (torch.arange(Ls)[None] >= torch.tensor([Ls, 4, 1][:B] + [Ls] * max(0, B - 3))[:, None]).to(device)
    lens = torch.tensor([L, 6, 1][:B] + [L] * max(0, B - 3))
    tgt_mask = (torch.arange(L)[None] >= lens[:, None]).to(device)
    x = torch.randn(B, L, model.cfg.d_latent, generator=gen).to(device)
    with torch.no_grad():
        enc = model.encode(src, src_mask)
    return enc, x, tgt_mask


# -- bucketing ------------------------------------------------------------------------------------

def test_bucket_batch_is_the_smallest_bucket_that_fits():
    buckets = (1, 2, 4, 8, 64)
    for n in range(1, 200):
        b = bucket_batch(n, buckets)
        assert b >= n
        if n <= 64:
            assert b in buckets and all(c < n for c in buckets if c < b)
        else:
            assert b % 64 == 0 and b - n < 64


def test_bucket_length_rounds_up_within_the_cap():
    for n in range(1, 100):
        b = bucket_length(n, 8, cap=60)
        assert b >= n and (b % 8 == 0 or b == 60) and b - n < 8
        if n <= 60:
            assert b <= 60
    assert bucket_length(61, 8, cap=60) == 64  # above the cap: no capping (the model rejects it itself)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_bucket_helpers_reject_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive integer"):
        bucket_batch(bad)
    with pytest.raises(ValueError, match="positive integer"):
        bucket_length(bad)


def test_bucket_key_depends_only_on_buckets_and_structure():
    model, cfg = _model("cpu")
    eng = CUDAGraphEngine(model, cfg.diffusion)
    enc, x, tgt_mask = _inputs(model, "cpu")
    k1 = eng.bucket_key(enc, x, tgt_mask, time_grid(4), False, 0.0)
    k2 = eng.bucket_key(enc, x[:, :9], tgt_mask[:, :9], time_grid(4, "sqrt"), False, 0.0)  # same buckets
    assert k1 == k2 and (k1.batch, k1.tgt_len, k1.src_len, k1.steps) == (4, 16, 8, 4)
    assert eng.bucket_key(enc, None, tgt_mask, time_grid(4), False, 0.0) != k1          # noise mode
    assert eng.bucket_key(enc, x, tgt_mask, time_grid(4), True, 0.0) != k1              # clamp
    with pytest.raises(ValueError, match="x has shape"):
        eng.bucket_key(enc, x[:, :5], tgt_mask, time_grid(4), False, 0.0)


def test_constructor_validates_options():
    model, cfg = _model("cpu")
    with pytest.raises(ValueError, match="batch buckets"):
        CUDAGraphEngine(model, cfg.diffusion, batch_buckets=(4, 2))
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphEngine(model, cfg.diffusion, max_graphs=0)


# -- fallback (CPU here; the same path on a GPU with the opt-out) ---------------------------------

def test_cpu_inputs_fall_back_to_the_eager_loop_with_one_warning():
    model, cfg = _model("cpu")
    eng = CUDAGraphEngine(model, cfg.diffusion)
    enc, x, tgt_mask = _inputs(model, "cpu")
    grid = time_grid(3)
    with pytest.warns(RuntimeWarning, match="CUDA graphs not used"):
        got = eng.denoise(enc, x, tgt_mask, grid, clamp=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        again = eng.denoise(enc, x, tgt_mask, grid, clamp=True)
    want = PythonEngine(model, cfg.diffusion).denoise(enc, x, tgt_mask, grid, clamp=True)
    for g, a, w in zip(got, again, want):
        assert torch.equal(g, w) and torch.equal(a, w)
    assert eng.stats == {"captures": 0, "replays": 0, "eager": 2}
    assert "CUDA tensors" in eng.fallback_reason or "no CUDA device" in eng.fallback_reason


def test_opt_out_variable_disables_graphs_without_warning(monkeypatch, device):
    monkeypatch.setenv(cuda_graphs.ENV_OPT_OUT, "1")
    assert cuda_graphs.graphs_disabled_reason(device).startswith(cuda_graphs.ENV_OPT_OUT)
    model, cfg = _model(device)
    eng = CUDAGraphEngine(model, cfg.diffusion)
    enc, x, tgt_mask = _inputs(model, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = eng.denoise(enc, x, tgt_mask, time_grid(2, device=device))
    want = PythonEngine(model, cfg.diffusion).denoise(enc, x, tgt_mask, time_grid(2, device=device))
    assert torch.equal(got[0], want[0]) and eng.stats["captures"] == 0


# -- GPU: capture and replay -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("clamp", [False, True])
def test_replay_matches_eager_for_given_noise(clamp):
    model, cfg = _model("cuda")
    eng = CUDAGraphEngine(model, cfg.diffusion)
    enc, x, tgt_mask = _inputs(model, "cuda")
    grid = time_grid(4, "quadratic", device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the capture must succeed
        got = eng.denoise(enc, x, tgt_mask, grid, clamp=clamp)
    assert eng.stats["captures"] == 1 and eng.stats["replays"] == 1
    same_bucket = eng.run_bucketed_eager(enc, x, tgt_mask, grid, clamp=clamp)
    for g, w in zip(got, same_bucket):   # same shapes, same kernels: identical
        assert torch.equal(g, w), (g - w).abs().max()
    unpadded = PythonEngine(model, cfg.diffusion).denoise(enc, x, tgt_mask, grid, clamp=clamp)
    keep = ~tgt_mask
    for g, w in zip(got, unpadded):      # padding is masked: the real tokens agree to rounding
        torch.testing.assert_close(g[keep], w[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_graphs_are_cached_per_bucket_and_reused():
    model, cfg = _model("cuda")
    eng = CUDAGraphEngine(model, cfg.diffusion, max_graphs=2)
    enc, x, tgt_mask = _inputs(model, "cuda")
    grid = time_grid(2, device="cuda")
    first = eng.denoise(enc, x, tgt_mask, grid)
    # other spacing (grid values are a static input) and a shorter length in the same bucket: same graph
    eng.denoise(enc, x[:, :9], tgt_mask[:, :9], time_grid(2, "sqrt", device="cuda"))
    again = eng.denoise(enc, x, tgt_mask, grid)
    assert eng.stats["captures"] == 1 and eng.stats["replays"] == 3
    assert torch.equal(first[0], again[0])
    for k in (3, 4):  # two more buckets: the LRU cache keeps max_graphs
        eng.denoise(enc, x, tgt_mask, time_grid(k, device="cuda"))
    assert eng.cache_info()["graphs"] == 2 and eng.stats["captures"] == 3


@pytest.mark.gpu
def test_in_graph_noise_is_fresh_per_replay_and_equals_eager_for_one_rng_state():
    model, cfg = _model("cuda")
    eng = CUDAGraphEngine(model, cfg.diffusion)
    enc, _, tgt_mask = _inputs(model, "cuda")
    grid = time_grid(3, device="cuda")
    eng.denoise(enc, None, tgt_mask, grid)            # capture (warm-up restores the RNG state)
    torch.manual_seed(123)
    eager = eng.run_bucketed_eager(enc, None, tgt_mask, grid)
    torch.manual_seed(123)
    replay = eng.denoise(enc, None, tgt_mask, grid)
    assert eng.stats["captures"] == 1
    for r, e in zip(replay, eager):
        assert torch.equal(r, e), (r - e).abs().max()
    replay2 = eng.denoise(enc, None, tgt_mask, grid)  # no reseed: the generator moved on
    assert not torch.equal(replay2[0], replay[0])


@pytest.mark.gpu
def test_sampler_with_cuda_graph_engine_equals_python_sampler():
    from fastdiss.config import SampleConfig
    from fastdiss.sampling import Sampler
    model, cfg = _model("cuda")
    gen = torch.Generator().manual_seed(3)
    src = torch.randint(1, VOCAB, (5, 8), generator=gen).cuda()
    src_mask = torch.zeros(5, 8, dtype=torch.bool, device="cuda")
    src_mask[2, 5:] = True
    scfg = SampleConfig(steps=4, length_beam=2, noise_draws=1, select="score", seed=4)
    py = Sampler(model, scfg, cfg.diffusion).generate(src, src_mask)
    gr = Sampler(model, scfg, cfg.diffusion, engine="cuda-graph").generate(src, src_mask)
    torch.testing.assert_close(gr.latents, py.latents, rtol=1e-4, atol=1e-4)
    same = sum(a == b for a, b in zip(gr.ids, py.ids))
    assert same == len(py.ids), f"{len(py.ids) - same} of {len(py.ids)} sentences differ"


@pytest.mark.gpu
def test_capture_failure_falls_back_to_eager_with_the_reason(monkeypatch):
    model, cfg = _model("cuda")
    eng = CUDAGraphEngine(model, cfg.diffusion)
    enc, x, tgt_mask = _inputs(model, "cuda")
    grid = time_grid(2, device="cuda")
    want = PythonEngine(model, cfg.diffusion).denoise(enc, x, tgt_mask, grid)
    forward = type(model).forward

    def syncing_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        float(out.sum())  # a host sync: not allowed while capturing
        return out

    monkeypatch.setattr(type(model), "forward", syncing_forward)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        got = eng.denoise(enc, x, tgt_mask, grid)
    assert eng.stats["captures"] == 0 and eng.stats["eager"] == 1
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    monkeypatch.undo()
    eng.denoise(enc, x, tgt_mask, grid)  # the failed bucket stays eager (no retry per call)
    assert eng.stats["eager"] == 2
