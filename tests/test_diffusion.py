"""The training objective's control flow, checked with a denoiser that records every call:
plain self-conditioning, SCP (first pass at t' > t), MANS (per-token times in [t, 1] growing with
confidence), and the loss itself against a hand computation."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastdiss import functional
from fastdiss.config import DiffusionConfig, ModelConfig, preset
from fastdiss.diffusion import DiffusionObjective, mans_ratio, mans_times, scp_delta
from fastdiss.model import Denoiser, per_token_time
from fastdiss.schedule import alpha_sigma

V, PAD = 23, 0


class Recording(Denoiser):
    """The tiny denoiser, recording each forward call's inputs and outputs."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = []

    def forward(self, x_t, sc, t, enc, tgt_mask=None):
        out = super().forward(x_t, sc, t, enc, tgt_mask)
        B, L, _ = x_t.shape
        self.calls.append(dict(x_t=x_t.detach().clone(), sc=None if sc is None else sc.detach().clone(),
                               t=per_token_time(t, B, L).clone(), grad=torch.is_grad_enabled(),
                               out=out.detach().clone()))
        return out


def make(**diff):
    cfg = preset("tiny")
    mcfg = ModelConfig(**{**cfg.to_dict()["model"], "max_len": 16})
    torch.manual_seed(0)
    model = Recording(mcfg, V, PAD)
    dcfg = DiffusionConfig(**{**dataclasses.asdict(DiffusionConfig()), **diff})
    return model, DiffusionObjective(model, dcfg)


def batch(B=4, L=6, seed=0, with_noise=True, d_e=64):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, V, (B, L + 1), generator=g)
    tgt = torch.randint(1, V, (B, L), generator=g)
    tgt_len = torch.tensor([L, L - 2, 3, 1])[:B]
    tgt_mask = torch.arange(L)[None] >= tgt_len[:, None]
    b = dict(src=src, src_mask=torch.zeros_like(src, dtype=torch.bool), tgt=tgt.masked_fill(tgt_mask, PAD),
             tgt_mask=tgt_mask)
    if with_noise:
        b["t"] = torch.tensor([0.05, 0.3, 0.75, 0.97])[:B]
        b["eps"] = torch.randn(B, L, d_e, generator=g)
    return b


def test_loss_is_finite_and_reaches_every_parameter():
    model, obj = make(self_cond_prob=1.0)
    loss, stats = obj.loss(batch())
    loss.backward()
    assert torch.isfinite(loss)
    for key in ("loss", "mse", "ce", "length_ce", "mans_dt", "tokens", "self_cond", "scp"):
        assert isinstance(stats[key], float)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"
    torch.manual_seed(5)
    via_forward = obj(batch())[0].item()
    torch.manual_seed(5)
    assert via_forward == obj.loss(batch())[0].item()   # forward == loss (what DDP calls)


def test_loss_matches_hand_computation_without_self_conditioning():
    model, obj = make(self_cond_prob=0.0, scp=False, mans=False, mse_weight=1.0, ce_weight=0.5, length_weight=0.1)
    b = batch()
    loss, stats = obj.loss(b)
    assert len(model.calls) == 1
    with torch.no_grad():
        keep = ~b["tgt_mask"]
        z0 = model.embed_target(b["tgt"])
        x_t = functional.q_sample(z0, b["t"], b["eps"], "sqrt", obj.cfg.noise_factor)
        enc = model.encode(b["src"], b["src_mask"])
        x0 = Denoiser.forward(model, x_t, None, b["t"], enc, b["tgt_mask"])
        mse = ((x0 - z0) ** 2).mean(-1)[keep].mean()
        logits = (x0 @ model.target_embeddings().t())[keep]
        ce = F.cross_entropy(logits.double(), b["tgt"][keep])
        lce = F.cross_entropy(model.length_logits(enc).double(), keep.sum(1))
        ref = mse + 0.5 * ce + 0.1 * lce
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert stats["mse"] == pytest.approx(mse.item(), rel=1e-5)
    torch.testing.assert_close(model.calls[0]["x_t"], x_t)


def test_plain_self_conditioning_first_pass_at_same_t():
    model, obj = make(self_cond_prob=1.0, scp=False, mans=False)
    b = batch()
    obj.loss(b)
    first, trained = model.calls
    assert not first["grad"] and trained["grad"]
    assert first["sc"] is None
    torch.testing.assert_close(first["t"], trained["t"])
    torch.testing.assert_close(first["x_t"], trained["x_t"])
    torch.testing.assert_close(trained["sc"], first["out"])


def test_rounded_self_conditioning_feeds_the_nearest_target_embeddings():
    model, obj = make(self_cond_prob=1.0, scp=False, mans=False, round_self_cond=True)
    b = batch()
    obj.loss(b)
    first, trained = model.calls
    with torch.no_grad():
        table = model.target_embeddings().double()
    # independent reference: nearest row by Euclidean distance (every row of norm(E) has the same norm,
    # so it is also the highest-logit row the rounding head would pick)
    nearest = torch.cdist(first["out"].double().reshape(-1, table.shape[1]), table).argmin(-1)
    expect = table[nearest].reshape(first["out"].shape).float()
    torch.testing.assert_close(trained["sc"], expect, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained["sc"], first["out"])


def test_no_self_conditioning_is_one_pass():
    model, obj = make(self_cond_prob=0.0)
    obj.loss(batch())
    assert len(model.calls) == 2  # MANS confidence pass + trained pass; no self-conditioning pass
    assert model.calls[-1]["sc"] is None


@pytest.mark.parametrize("mode", ["step-gap", "uniform"])
def test_scp_first_pass_runs_at_a_higher_noise_level(mode):
    model, obj = make(self_cond_prob=1.0, scp=True, scp_prob=1.0, scp_mode=mode, mans=False, scp_delta_max=0.3)
    b = batch()
    for seed in range(5):
        model.calls.clear()
        torch.manual_seed(seed)
        obj.loss(b)
        first, trained = model.calls
        t, t_prime = trained["t"], first["t"]
        torch.testing.assert_close(t, b["t"][:, None].expand_as(t))
        assert not first["grad"] and first["sc"] is None
        assert (t_prime >= t).all() and (t_prime <= 1).all()
        if mode == "step-gap":  # Delta >= 1/10
            assert (t_prime[t < 0.999] > t[t < 0.999]).all()
        delta = (t_prime - t)[:, 0]
        unclamped = t_prime[:, 0] < 1.0
        if mode == "step-gap":  # Delta = 1/K, K in 1..10, one per sequence
            k = 1.0 / delta[unclamped]
            torch.testing.assert_close(k, k.round(), atol=1e-3, rtol=0)
            assert ((k.round() >= 1) & (k.round() <= 10)).all()
        else:
            assert (delta <= 0.3 + 1e-6).all()
        # x_{t'} reuses the training eps (deterministic DDIM path)
        z0 = model.embed_target(b["tgt"]).detach()
        torch.testing.assert_close(first["x_t"], functional.q_sample(z0, t_prime, b["eps"], noise_factor=obj.cfg.noise_factor), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trained["sc"], first["out"])


def test_scp_fresh_eps_and_gaussian_modes():
    model, obj = make(self_cond_prob=1.0, scp=True, scp_fresh_eps=True, mans=False)
    b = batch()
    obj.loss(b)
    first = model.calls[0]
    z0 = model.embed_target(b["tgt"]).detach()
    assert not torch.allclose(first["x_t"], functional.q_sample(z0, first["t"], b["eps"], noise_factor=obj.cfg.noise_factor), atol=1e-3)

    model, obj = make(self_cond_prob=1.0, scp=True, scp_mode="gaussian", scp_noise_std=0.5, mans=False)
    obj.loss(b)
    first, trained = model.calls
    torch.testing.assert_close(first["t"], trained["t"])          # first pass at the same t ...
    noise = trained["sc"] - first["out"]                           # ... plus Gaussian noise of the given scale
    assert 0.35 < noise.std().item() < 0.65


def test_scp_prob_zero_falls_back_to_plain_self_conditioning():
    model, obj = make(self_cond_prob=1.0, scp=True, scp_prob=0.0, mans=False)
    obj.loss(batch())
    first, trained = model.calls
    torch.testing.assert_close(first["t"], trained["t"])


def test_mans_times_formula_range_and_monotonicity():
    cfg = DiffusionConfig(mans_d_lo=0.2, mans_d_hi=1.0, mans_s_max=0.5)
    t = torch.tensor([0.0, 0.4, 0.9])
    d = torch.linspace(0.0, 1.5, 31).expand(3, 31)
    ti = mans_times(t, d, cfg)
    assert ((ti >= t[:, None]) & (ti <= 1)).all()
    assert (ti.diff(dim=1) <= 0).all()           # larger distance (less confident) -> earlier time
    torch.testing.assert_close(ti[:, 0], t + (1 - t) * 0.5)     # fully confident: s_max of the way to 1
    torch.testing.assert_close(ti[:, -1], t)                    # not confident: unchanged
    r = (1.0 - 0.6) / 0.8
    torch.testing.assert_close(mans_times(t, torch.full((3, 1), 0.6), cfg)[:, 0], t + (1 - t) * 0.5 * r)
    pcfg = DiffusionConfig(mans_measure="prob", mans_a_lo=0.3, mans_a_hi=0.9)
    p = torch.linspace(0, 1, 21).expand(3, 21)
    tp = mans_times(t, p, pcfg)
    assert (tp.diff(dim=1) >= 0).all() and ((tp >= t[:, None]) & (tp <= 1)).all()
    assert torch.equal(mans_ratio(p, pcfg)[:, 0], torch.zeros(3)) and torch.equal(mans_ratio(p, pcfg)[:, -1],
                                                                                  torch.ones(3))


@pytest.mark.parametrize("measure", ["distance", "prob"])
def test_mans_per_token_times_in_objective(measure):
    # anchors chosen so the untrained model's confidences fall inside the ramp
    model, obj = make(self_cond_prob=1.0, scp=True, mans=True, mans_measure=measure, mans_d_lo=0.5,
                      mans_d_hi=1.5, mans_a_lo=0.0, mans_a_hi=0.2, mans_s_max=0.8)
    b = batch()
    obj.loss(b)
    conf, scp, trained = model.calls
    t = b["t"][:, None].expand_as(conf["t"])
    torch.testing.assert_close(conf["t"], t)                 # confidence pass at the sampled t
    assert conf["sc"] is None and not conf["grad"]
    ti = trained["t"]
    assert ((ti >= t) & (ti <= 1)).all()
    z0 = model.embed_target(b["tgt"]).detach()
    if measure == "distance":
        m = (conf["out"] - z0).pow(2).mean(-1)
    else:
        m = torch.softmax(conf["out"] @ model.target_embeddings().detach().t(), -1).gather(
            -1, b["tgt"][..., None])[..., 0]
    torch.testing.assert_close(ti, mans_times(b["t"], m, obj.cfg), atol=1e-5, rtol=1e-5)
    keep = ~b["tgt_mask"]
    assert (ti[keep] > t[keep]).any(), "anchors should give some tokens extra noise"
    # grows with confidence, token by token within each sequence
    sign = -1.0 if measure == "distance" else 1.0
    for i in range(t.shape[0]):
        k = keep[i]
        order = torch.argsort(sign * m[i][k])
        assert (ti[i][k][order].diff() >= -1e-6).all()
    # the trained pass sees x at the per-token times with the same eps; SCP runs at t'_i >= t_i
    torch.testing.assert_close(trained["x_t"], functional.q_sample(z0, ti, b["eps"], noise_factor=obj.cfg.noise_factor), atol=1e-5, rtol=1e-5)
    assert (scp["t"] >= ti - 1e-6).all() and (scp["t"][ti < 0.999] > ti[ti < 0.999]).all()
    torch.testing.assert_close(trained["sc"], scp["out"])


def test_mans_source_scp_reuses_the_scp_pass():
    model, obj = make(self_cond_prob=1.0, scp=True, mans=True, mans_source="scp", mans_d_lo=0.5, mans_d_hi=1.5)
    b = batch()
    obj.loss(b)
    assert len(model.calls) == 2
    scp, trained = model.calls
    t = b["t"][:, None].expand_as(scp["t"])
    assert (scp["t"] > t - 1e-6).all()
    torch.testing.assert_close(trained["sc"], scp["out"])
    assert ((trained["t"] >= t) & (trained["t"] <= 1)).all()


def test_scp_delta_distribution():
    torch.manual_seed(0)
    d = scp_delta(4000, DiffusionConfig(scp_mode="step-gap", scp_k_max=4))
    assert set((1 / d).round().long().tolist()) == {1, 2, 3, 4}
    u = scp_delta(4000, DiffusionConfig(scp_mode="uniform", scp_delta_max=0.1))
    assert u.min() >= 0 and u.max() <= 0.1 and abs(u.mean().item() - 0.05) < 0.005
    with pytest.raises(ValueError, match="gaussian"):
        scp_delta(3, DiffusionConfig(scp_mode="gaussian"))


def test_random_draws_when_batch_has_no_noise():
    model, obj = make(self_cond_prob=0.0, mans=False)
    b = batch(with_noise=False)
    torch.manual_seed(3)
    l1, _ = obj.loss(b)
    torch.manual_seed(3)
    l2, _ = obj.loss(b)
    torch.manual_seed(4)
    l3, _ = obj.loss(b)
    assert l1.item() == l2.item() != l3.item()
    t = model.calls[0]["t"][:, 0]
    assert ((t >= 0) & (t <= 1)).all()


def test_alpha_sigma_used_for_noising():
    model, obj = make(self_cond_prob=0.0, mans=False, schedule="vp-linear", noise_factor=2.0)
    b = batch()
    obj.loss(b)
    z0 = model.embed_target(b["tgt"]).detach()
    a, s = alpha_sigma(b["t"][:, None, None], "vp-linear")
    torch.testing.assert_close(model.calls[0]["x_t"], a * z0 + 2.0 * s * b["eps"], atol=1e-5, rtol=1e-5)
