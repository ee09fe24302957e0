"""The learning recipe (docs/method.md 1b): source copy into the decoder input, length as an offset
from the source length, a z0 normalisation whose scale cannot drift, shared embeddings, clipped
small noise levels, and the CPU rounding loss. Each is checked against a computation written
here from its definition, on fresh random inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastdiss.config import DiffusionConfig, ModelConfig, SampleConfig, preset
from fastdiss.diffusion import DiffusionObjective, rounding_loss
from fastdiss.model import Denoiser

V, PAD = 31, 0


def model(**over):
    cfg = preset("tiny")
    torch.manual_seed(0)
    return Denoiser(ModelConfig(**{**cfg.to_dict()["model"], "max_len": 16, **over}), V, PAD).eval()


def batch(B=4, Ls=9, Lt=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    src_len = torch.randint(1, Ls + 1, (B,), generator=g)
    src_len[0] = Ls
    tgt_len = torch.randint(1, Lt + 1, (B,), generator=g)
    tgt_len[1] = Lt
    src_mask = torch.arange(Ls)[None] >= src_len[:, None]
    tgt_mask = torch.arange(Lt)[None] >= tgt_len[:, None]
    src = torch.randint(1, V, (B, Ls), generator=g).masked_fill(src_mask, PAD)
    tgt = torch.randint(1, V, (B, Lt), generator=g).masked_fill(tgt_mask, PAD)
    return src, src_mask, tgt, tgt_mask


def test_defaults_are_the_measured_recipe():
    m, d, s = ModelConfig(), DiffusionConfig(), SampleConfig()
    assert (m.src_copy, m.length_offset, m.latent_norm_affine, d.noise_factor, s.time_shift) == \
        ("uniform", True, False, 4.0, 1.0)
    with pytest.raises(ValueError, match="src_copy"):
        ModelConfig(src_copy="copy")
    with pytest.raises(ValueError, match="t_min"):
        DiffusionConfig(t_min=1.0)


def test_uniform_copy_reads_source_position_j_times_ls_over_lt():
    m = model(src_copy="uniform")
    src, src_mask, _, tgt_mask = batch()
    enc = m.encode(src, src_mask)
    B, Lt = tgt_mask.shape
    got = m.source_copy(enc, tgt_mask, B, Lt)
    for b in range(B):
        ls, lt = int((~src_mask[b]).sum()), int((~tgt_mask[b]).sum())
        for j in range(Lt):
            i = min(math.floor(j * ls / lt), ls - 1)     # integer arithmetic, per element
            torch.testing.assert_close(got[b, j], m.copy_proj(enc.out[b, i]), rtol=1e-5, atol=1e-6)


def test_soft_copy_is_a_distance_softmax_over_real_source_positions():
    m = model(src_copy="soft")
    with torch.no_grad():
        m.copy_log_tau.fill_(math.log(0.7))
    src, src_mask, _, tgt_mask = batch(seed=5)
    enc = m.encode(src, src_mask)
    B, Lt = tgt_mask.shape
    got = m.source_copy(enc, tgt_mask, B, Lt).double()
    out, W, bias = enc.out.double(), m.copy_proj.weight.double(), m.copy_proj.bias.double()
    for b in range(B):
        ls, lt = int((~src_mask[b]).sum()), int((~tgt_mask[b]).sum())
        for j in range(Lt):
            w = torch.tensor([math.exp(-abs(j * ls / lt - i) / 0.7) for i in range(ls)], dtype=torch.float64)
            ref = (w / w.sum()) @ out[b, :ls] @ W.t() + bias
            torch.testing.assert_close(got[b, j], ref, rtol=1e-4, atol=1e-5)


def test_copy_changes_the_prediction_and_none_ignores_the_source_at_the_input():
    src, src_mask, _, tgt_mask = batch()
    B, Lt = tgt_mask.shape
    x = torch.randn(B, Lt, 64)
    m = model(src_copy="uniform")
    enc = m.encode(src, src_mask)
    with torch.no_grad():
        base = m(x, None, torch.rand(B), enc, tgt_mask)
        m.copy_proj.bias.add_(1.0)
        moved = m(x, None, torch.rand(B), enc, tgt_mask)
    assert not torch.allclose(base, moved)
    assert not hasattr(model(src_copy="none"), "copy_proj")


def test_length_offset_scores_absolute_lengths_through_the_offset_classes():
    m = model(length_offset=True)
    src, src_mask, _, _ = batch()
    with torch.no_grad():
        m.length_head.bias.copy_(torch.randn(m.length_head.bias.shape))
    enc = m.encode(src, src_mask)
    got = m.length_logits(enc)
    n = m.cfg.max_len
    assert got.shape == (src.shape[0], n + 1) and m.length_head.out_features == 2 * n + 1
    keep = (~src_mask).unsqueeze(-1).float()
    head = m.length_head((enc.out * keep).sum(1) / keep.sum(1))
    for b in range(src.shape[0]):
        ls = int((~src_mask[b]).sum())
        for length in range(n + 1):
            assert got[b, length].item() == pytest.approx(head[b, length - ls + n].item(), rel=1e-6, abs=1e-6)
    absolute = model(length_offset=False)
    assert absolute.length_logits(absolute.encode(src, src_mask)).shape == (src.shape[0], n + 1)


def test_latent_norm_without_affine_has_no_learnt_scale():
    fixed, learnt = model(latent_norm_affine=False), model(latent_norm_affine=True)
    names = {n for n, _ in fixed.named_parameters()}
    assert "tgt_embed_norm.weight" not in names and "tgt_embed_norm.bias" not in names
    assert "tgt_embed_norm.weight" in {n for n, _ in learnt.named_parameters()}
    _, _, tgt, _ = batch()
    z0 = fixed.embed_target(tgt).double()
    e = fixed.tgt_embed.double()[tgt]
    ref = (e - e.mean(-1, keepdim=True)) / torch.sqrt(e.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(z0, ref, rtol=1e-4, atol=1e-5)


def test_shared_embeddings_feed_the_encoder_from_the_target_table():
    m = model(share_embeddings=True)
    assert not hasattr(m.encoder, "embed")
    src, src_mask, _, _ = batch()
    before = m.encode(src, src_mask).out
    with torch.no_grad():
        m.tgt_embed[src[0, 0]].add_(3.0)
    after = m.encode(src, src_mask).out
    assert not torch.allclose(before[0], after[0])
    # one table: a gradient through the encoder reaches tgt_embed
    m.train()
    m.encode(src, src_mask).out.sum().backward()
    assert m.tgt_embed.grad is not None and m.tgt_embed.grad[src[0, 0]].abs().sum() > 0


def test_t_min_clips_training_times():
    m = model()
    src, src_mask, tgt, tgt_mask = batch(B=64, seed=9)
    seen = []
    orig = m.forward

    def spy(x_t, sc, t, enc, mask=None):
        seen.append(t.detach().clone())
        return orig(x_t, sc, t, enc, mask)
    m.forward = spy
    obj = DiffusionObjective(m, DiffusionConfig(t_min=0.6, scp=False, mans=False, self_cond_prob=0.0))
    obj.loss({"src": src, "src_mask": src_mask, "tgt": tgt, "tgt_mask": tgt_mask})
    t = torch.cat([s.reshape(-1) for s in seen])
    assert t.min() >= 0.6 and t.max() <= 1.0


@pytest.mark.parametrize("shape", [(3, 5), (1, 1), (7, 2)])
def test_cpu_rounding_loss_matches_float64_cross_entropy(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, 16, generator=g, requires_grad=True)
    E = torch.randn(V, 16, generator=g, requires_grad=True)
    y = torch.randint(0, V, shape, generator=g)
    y[0, 0] = -100
    got = rounding_loss(x, E, y)
    got.backward()
    xd, Ed = x.detach().double().requires_grad_(), E.detach().double().requires_grad_()
    keep = y != -100
    logits = xd[keep] @ Ed.t()
    ref = -(logits.log_softmax(-1).gather(1, y[keep][:, None])).mean() if keep.any() else logits.sum() * 0
    ref.backward()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(E.grad.double(), Ed.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 1.0])
def test_glance_reveals_round_ratio_times_wrong_tokens_of_each_draft(ratio):
    from fastdiss.diffusion import glance
    torch.manual_seed(int(ratio * 10))
    B, L, d = 5, 9, 6
    E = torch.randn(V, d)
    tgt = torch.randint(1, V, (B, L))
    keep = torch.arange(L)[None] < torch.tensor([9, 4, 7, 1, 9])[:, None]
    z0, sc = torch.randn(B, L, d), torch.randn(B, L, d)
    sc[0, :5] = E[tgt[0, :5]]                       # a draft that is partly right
    out = glance(sc, z0, E, tgt, keep, ratio)
    for b in range(B):
        wrong = 0
        for i in range(L):                          # nearest by dot product, written out per token
            if keep[b, i] and max(range(V), key=lambda v: float(sc[b, i] @ E[v])) != int(tgt[b, i]):
                wrong += 1
        revealed = [i for i in range(L) if not torch.equal(out[b, i], sc[b, i])]
        assert len(revealed) == math.floor(wrong * ratio + 0.5) or len(revealed) == round(wrong * ratio)
        for i in range(L):
            expected = z0[b, i] if i in revealed else sc[b, i]
            assert torch.equal(out[b, i], expected)
            assert keep[b, i] or i not in revealed


def test_balanced_input_divides_x_t_by_its_token_rms_and_starts_the_copy_at_unit_gain():
    m = model(balanced_input=True)
    torch.manual_seed(1)
    assert 0.8 < m.copy_proj.weight.std().item() * math.sqrt(m.cfg.d_model) < 1.2
    src, src_mask, tgt, tgt_mask = batch()
    enc = m.encode(src, src_mask)
    x = torch.randn(tgt.shape[0], tgt.shape[1], m.cfg.d_latent, dtype=torch.float64).float()
    scale = torch.rand(tgt.shape[0], tgt.shape[1], 1) * 5 + 0.1   # any per-token scale gives the same input
    with torch.no_grad():
        a = m(x, None, 0.7, enc, tgt_mask)
        b = m(x * scale, None, 0.7, enc, tgt_mask)
        plain = model(balanced_input=False)
        plain.load_state_dict(m.state_dict())
        rms = x.double().pow(2).mean(-1, keepdim=True).sqrt().float()
        c = plain(x / rms, None, 0.7, enc, tgt_mask)
    keep = ~tgt_mask
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[keep], c[keep], rtol=1e-4, atol=1e-5)
