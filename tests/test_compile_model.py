"""torch.compile of the whole denoiser with the fused ops: the compiled forward and backward equal eager.

On CUDA the ops are the Triton kernels and the compile uses inductor. On CPU the ops dispatch to their PyTorch
references through the same custom-op layer; we compile with the `aot_eager` backend there, which traces the
custom ops, their fake implementations and autograd exactly as inductor does, without inductor's C++ code
generation (tens of seconds on 2 cores).
"""
import pytest
import torch

import fastdiss
from fastdiss.config import preset
from fastdiss.model import Denoiser


def _batch(device, B=3, Ls=7, Lt=9, V=50):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, V, (B, Ls), generator=g)
    tgt = torch.randint(4, V, (B, Lt), generator=g)
    src_mask = torch.zeros(B, Ls, dtype=torch.bool)
    src_mask[0, 5:] = True
    tgt_mask = torch.zeros(B, Lt, dtype=torch.bool)
    tgt_mask[1, 6:] = True
    t = torch.rand(B, Lt, generator=g)
    return [x.to(device) for x in (src, src_mask, tgt, tgt_mask, t)]


def test_compiled_denoiser_matches_eager(device):
    fastdiss.set_backend("auto")
    cfg = preset("tiny").model
    torch.manual_seed(0)
    model = Denoiser(cfg, vocab_size=50, pad_id=0).to(device)
    src, src_mask, tgt, tgt_mask, t = _batch(device)

    def run(m):
        enc = m.encode(src, src_mask)
        z0 = m.embed_target(tgt)
        x_t = z0 + 0.5 * torch.randn(z0.shape, generator=torch.Generator().manual_seed(2)).to(device)
        x0 = m(x_t, torch.zeros_like(x_t), t, enc, tgt_mask)
        loss = (x0.float() ** 2).masked_fill(tgt_mask[..., None], 0).sum()
        grads = torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad], allow_unused=True)
        return x0.detach(), grads

    want_out, want_grads = run(model)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(model, backend=backend)
    # encode/embed_target are methods, so compile the module's forward and call the methods on the original
    got_out, got_grads = run(_CompiledForward(model, compiled))
    tol = dict(rtol=1e-4, atol=1e-5) if device.type == "cpu" else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got_out, want_out, **tol)
    for g_got, g_want in zip(got_grads, want_grads):
        if g_want is None:
            assert g_got is None
        else:
            torch.testing.assert_close(g_got, g_want, **tol)


class _CompiledForward(torch.nn.Module):
    """The original model's methods, with __call__ (the denoiser forward) going through the compiled module."""

    def __init__(self, model, compiled):
        super().__init__()
        self.model = model
        self.compiled = compiled

    def encode(self, *a):
        return self.model.encode(*a)

    def embed_target(self, *a):
        return self.model.embed_target(*a)

    def forward(self, *a):
        return self.compiled(*a)
