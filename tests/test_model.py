"""The denoiser on the tiny preset: shapes, padding masks, per-token time, EncoderState reuse,
kernel and plain-PyTorch paths agree, bad inputs rejected; and the Config contract."""
import pytest
import torch

from fastdiss import functional
from fastdiss.config import Config, DiffusionConfig, ModelConfig, preset
from fastdiss.model import Denoiser, EncoderState

V, PAD = 29, 0


def tiny_model(**model_overrides):
    cfg = preset("tiny")
    mcfg = ModelConfig(**{**cfg.to_dict()["model"], "max_len": 16, **model_overrides})
    torch.manual_seed(0)
    return Denoiser(mcfg, V, PAD).eval()


def random_batch(B=3, Ls=7, Lt=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, V, (B, Ls), generator=g)
    tgt = torch.randint(1, V, (B, Lt), generator=g)
    src_len = torch.tensor([Ls, Ls - 3, 1])[:B]
    tgt_len = torch.tensor([Lt - 2, Lt, 2])[:B]
    src_mask = torch.arange(Ls)[None] >= src_len[:, None]
    tgt_mask = torch.arange(Lt)[None] >= tgt_len[:, None]
    return src.masked_fill(src_mask, PAD), src_mask, tgt.masked_fill(tgt_mask, PAD), tgt_mask


def test_shapes():
    m = tiny_model()
    src, src_mask, tgt, tgt_mask = random_batch()
    B, Lt = tgt.shape
    enc = m.encode(src, src_mask)
    d, de, H = m.cfg.d_model, m.cfg.d_latent, m.cfg.n_heads
    assert enc.out.shape == (B, src.shape[1], d)
    assert len(enc.cross_kv) == m.cfg.n_dec
    for k, v in enc.cross_kv:
        assert k.shape == v.shape == (B, H, src.shape[1], d // H)
    z0 = m.embed_target(tgt)
    assert z0.shape == (B, Lt, de)
    x0 = m(torch.randn(B, Lt, de), None, torch.rand(B), enc, tgt_mask)
    assert x0.shape == (B, Lt, de)
    assert m.logits(x0).shape == (B, Lt, V)
    assert m.length_logits(enc).shape == (B, m.cfg.max_len + 1)
    # z0 rows are LayerNorm'ed (initial affine = identity): zero mean, unit variance
    torch.testing.assert_close(z0.mean(-1), torch.zeros(B, Lt), atol=1e-5, rtol=0)
    torch.testing.assert_close(z0.var(-1, unbiased=False), torch.ones(B, Lt), atol=1e-3, rtol=0)


def test_target_padding_does_not_leak():
    m = tiny_model()
    src, src_mask, tgt, tgt_mask = random_batch()
    enc = m.encode(src, src_mask)
    x = torch.randn(*tgt.shape, m.cfg.d_latent)
    t = torch.rand(tgt.shape)
    y1 = m(x, None, t, enc, tgt_mask)
    x2 = torch.where(tgt_mask[..., None], torch.randn_like(x) * 5, x)   # new values only at padding
    t2 = torch.where(tgt_mask, torch.rand(tgt.shape), t)
    y2 = m(x2, None, t2, enc, tgt_mask)
    keep = ~tgt_mask
    assert keep.any() and tgt_mask.any()
    torch.testing.assert_close(y1[keep], y2[keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y1[tgt_mask], y2[tgt_mask])


def test_source_padding_does_not_leak():
    m = tiny_model()
    src, src_mask, tgt, tgt_mask = random_batch()
    src2 = torch.where(src_mask, torch.randint(1, V, src.shape), src)
    assert not torch.equal(src, src2)
    e1, e2 = m.encode(src, src_mask), m.encode(src2, src_mask)
    keep = ~src_mask
    torch.testing.assert_close(e1.out[keep], e2.out[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.length_logits(e1), m.length_logits(e2), atol=1e-5, rtol=1e-5)
    x = torch.randn(*tgt.shape, m.cfg.d_latent)
    t = torch.rand(tgt.shape[0])
    torch.testing.assert_close(m(x, None, t, e1, tgt_mask), m(x, None, t, e2, tgt_mask), atol=1e-5, rtol=1e-5)


def test_time_per_sequence_equals_per_token_and_changes_output():
    m = tiny_model()
    src, src_mask, tgt, tgt_mask = random_batch()
    enc = m.encode(src, src_mask)
    x = torch.randn(*tgt.shape, m.cfg.d_latent)
    t = torch.rand(tgt.shape[0])
    y_seq = m(x, None, t, enc, tgt_mask)
    y_tok = m(x, None, t[:, None].expand(tgt.shape).clone(), enc, tgt_mask)
    torch.testing.assert_close(y_seq, y_tok)
    t_tok = t[:, None].expand(tgt.shape).clone()
    t_tok[0, 1] = 1.0 - t_tok[0, 1]   # one token at another time changes the prediction
    assert not torch.allclose(m(x, None, t_tok, enc, tgt_mask)[0], y_seq[0])


def test_self_conditioning_none_equals_zeros():
    m = tiny_model()
    src, src_mask, tgt, tgt_mask = random_batch()
    enc = m.encode(src, src_mask)
    x = torch.randn(*tgt.shape, m.cfg.d_latent)
    t = torch.rand(tgt.shape[0])
    torch.testing.assert_close(m(x, None, t, enc, tgt_mask), m(x, torch.zeros_like(x), t, enc, tgt_mask))
    assert not torch.allclose(m(x, torch.randn_like(x), t, enc, tgt_mask), m(x, None, t, enc, tgt_mask))


def test_encoder_state_expand_matches_recompute():
    m = tiny_model()
    src, src_mask, tgt, tgt_mask = random_batch()
    enc = m.encode(src, src_mask)
    rep = enc.repeat_interleave(2)
    ref = m.encode(src.repeat_interleave(2, 0), src_mask.repeat_interleave(2, 0))
    assert isinstance(rep, EncoderState) and rep.batch_size == 2 * src.shape[0]
    torch.testing.assert_close(rep.out, ref.out)
    for (k1, v1), (k2, v2) in zip(rep.cross_kv, ref.cross_kv):
        torch.testing.assert_close(k1, k2)
        torch.testing.assert_close(v1, v2)
    idx = torch.tensor([2, 0])
    sub = enc.index_select(idx)
    x = torch.randn(2, tgt.shape[1], m.cfg.d_latent)
    t = torch.rand(2)
    torch.testing.assert_close(m(x, None, t, sub, tgt_mask[idx]),
                               m(x, None, t, m.encode(src[idx], src_mask[idx]), tgt_mask[idx]))


def test_kernel_path_matches_plain_pytorch():
    m1 = tiny_model(use_kernels=True)
    m2 = tiny_model(use_kernels=False)
    m2.load_state_dict(m1.state_dict())
    src, src_mask, tgt, tgt_mask = random_batch()
    x = torch.randn(*tgt.shape, m1.cfg.d_latent)
    sc = torch.randn_like(x)
    t = torch.rand(tgt.shape)
    y1 = m1(x, sc, t, m1.encode(src, src_mask), tgt_mask)
    y2 = m2(x, sc, t, m2.encode(src, src_mask), tgt_mask)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-4)


def test_embed_and_noise_matches_embed_target_and_q_sample():
    m = tiny_model()
    _, _, tgt, _ = random_batch()
    t = torch.rand(tgt.shape)
    eps = torch.randn(*tgt.shape, m.cfg.d_latent)
    z0, x_t = m.embed_and_noise(tgt, t, eps, schedule="sqrt", noise_factor=2.0)
    torch.testing.assert_close(z0, m.embed_target(tgt))
    torch.testing.assert_close(x_t, functional.q_sample(m.embed_target(tgt), t, eps, "sqrt", 2.0))


def test_logits_are_tied_to_normed_embeddings():
    m = tiny_model()
    _, _, tgt, _ = random_batch()
    z0 = m.embed_target(tgt)
    ref = z0.double() @ m.target_embeddings().double().t()
    torch.testing.assert_close(m.logits(z0).double(), ref, atol=1e-4, rtol=1e-5)
    # a clean embedding is nearest to its own token
    assert torch.equal(m.logits(z0).argmax(-1), tgt)


def test_bad_inputs_are_rejected():
    m = tiny_model()
    src, src_mask, tgt, tgt_mask = random_batch()
    with pytest.raises(TypeError, match="src_mask"):
        m.encode(src, src_mask.long())
    with pytest.raises(ValueError, match="src_mask"):
        m.encode(src, src_mask[:, :-1])
    with pytest.raises(ValueError, match="vocabulary"):
        m.encode(src + V, src_mask)
    with pytest.raises(TypeError, match="src"):
        m.encode(src.float(), src_mask)
    with pytest.raises(ValueError, match="max_len"):
        long = torch.randint(1, V, (1, m.cfg.max_len + 1))
        m.encode(long, torch.zeros_like(long, dtype=torch.bool))
    enc = m.encode(src, src_mask)
    with pytest.raises(ValueError, match="batch"):
        m(torch.randn(1, 4, m.cfg.d_latent), None, torch.rand(1), enc)
    with pytest.raises(ValueError, match="t has shape"):
        m(torch.randn(3, 4, m.cfg.d_latent), None, torch.rand(3, 5), enc)
    with pytest.raises(ValueError, match="d_latent"):
        m(torch.randn(3, 4, 7), None, torch.rand(3), enc)
    with pytest.raises(ValueError, match="pad_id"):
        Denoiser(m.cfg, V, V)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "small", "base", "large"])
def test_presets_round_trip(name):
    cfg = preset(name)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.model.d_model % cfg.model.n_heads == 0


def test_preset_sizes():
    t, b = preset("tiny").model, preset("base").model
    assert (t.n_enc, t.n_dec, t.d_model, t.n_heads, t.d_ff, t.d_latent) == (2, 2, 128, 4, 512, 64)
    assert (b.n_enc, b.n_dec, b.d_model, b.n_heads, b.d_ff, b.d_latent) == (6, 6, 512, 8, 2048, 128)


def test_config_strict_and_validated():
    d = preset("tiny").to_dict()
    d["diffusion"]["scp_modee"] = "uniform"
    with pytest.raises(ValueError, match="scp_modee"):
        Config.from_dict(d)
    with pytest.raises(ValueError, match="unknown config section"):
        Config.from_dict({"modle": {}})
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        preset("huge")
    with pytest.raises(ValueError, match="scp_mode"):
        DiffusionConfig(scp_mode="bogus")
    with pytest.raises(ValueError, match="mans_d_lo"):
        DiffusionConfig(mans_d_lo=2.0, mans_d_hi=1.0)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=100, n_heads=3)
    partial = Config.from_dict({"diffusion": {"scp": False}})
    assert partial.diffusion.scp is False and partial.model == ModelConfig()
    assert Config().replace(diffusion=DiffusionConfig(mans=False)).diffusion.mans is False
