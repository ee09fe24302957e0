"""CPU micro-benchmarks (pytest-benchmark) of the per-step pieces: the DDIM step op, one sampler step of
the tiny model, and rounding cross-entropy, each beside its plain PyTorch formulation.

Why here and not in tests/: these time things, they check nothing, so `make test` never runs them.
Run them when asked (one thread, like the other CPU benchmarks):

    .venv/bin/python -m pytest benchmarks/micro_cpu.py --benchmark-only

pytest-benchmark prints min/median/IQR per case and groups each op with its baseline; add
`--benchmark-json FILE` to keep the numbers. No timing is ever asserted.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdiss import functional
from fastdiss.config import preset
from fastdiss.model import Denoiser
from fastdiss.python_engine import denoise_step
from fastdiss.schedule import alpha_sigma

B, L = 64, 32          # a batch of 64 sentences of 32 tokens
VOCAB, PAD = 8000, 0   # the shipped tokenizers' order of size


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread and a fixed seed, so runs on a shared machine compare."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_ddim_step(benchmark, impl):
    """The fused step (C++ op when fastdiss._C is built) vs the PyTorch expression it replaces."""
    d = preset("tiny").model.d_latent
    x0, xt = torch.randn(B, L, d), torch.randn(B, L, d)
    a_t, s_t = alpha_sigma(torch.full((B, L), 0.6))
    a_s, s_s = alpha_sigma(torch.full((B, L), 0.4))
    fn = functional.ddim_step if impl == "op" else functional.ddim_step_reference
    benchmark.group = "ddim_step"
    out = benchmark(fn, x0, xt, a_t, s_t, a_s, s_s)
    assert out.shape == xt.shape


def test_sampler_step(benchmark):
    """One network call + step of the random-init tiny model (what each of the K steps costs)."""
    cfg = preset("tiny")
    model = Denoiser(cfg.model, VOCAB, PAD).eval()
    src = torch.randint(1, VOCAB, (B, L))
    src_mask = torch.zeros(B, L, dtype=torch.bool)
    tgt_mask = torch.zeros(B, L, dtype=torch.bool)
    d = cfg.model.d_latent
    x_t, sc = torch.randn(B, L, d), torch.zeros(B, L, d)
    with torch.no_grad():
        enc = model.encode(src, src_mask)
        benchmark.group = "sampler_step"
        x_s, _ = benchmark(denoise_step, model, x_t, sc, torch.tensor(0.6), torch.tensor(0.4), enc, tgt_mask,
                           schedule=cfg.diffusion.schedule)
    assert x_s.shape == x_t.shape


@pytest.mark.parametrize("impl", ["rounding_ce", "logits+cross_entropy"])
def test_rounding_ce(benchmark, impl):
    """Forward + backward of the rounding loss: chunked op vs full (tokens x vocab) logits."""
    d = preset("tiny").model.d_latent
    x0 = torch.randn(B * L, d, requires_grad=True)
    emb = torch.randn(VOCAB, d, requires_grad=True)
    targets = torch.randint(0, VOCAB, (B * L,))

    def run():
        if impl == "rounding_ce":
            loss = functional.rounding_cross_entropy(x0, emb, targets)
        else:
            loss = F.cross_entropy(x0 @ emb.t(), targets)
        loss.backward()
        return loss

    benchmark.group = "rounding_ce fwd+bwd"
    assert torch.isfinite(benchmark(run))
