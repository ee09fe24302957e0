"""Training loop and checkpoints: LR schedule, EMA, checkpoint round trip and damaged files, exact
resume, non-finite steps, the AR model through the same loop, and 2-process gloo DDP == 1 process."""
import os
import random
import shutil
import warnings

import pytest
import torch
import torch.nn as nn

from fastdiss import checkpoint as ckpt
from fastdiss.config import Config, DiffusionConfig, ModelConfig, TrainConfig, preset
from fastdiss.model import Denoiser
from fastdiss.sampling import Sampler, pad_batch
from fastdiss.train import EMA, NonFiniteLossError, Trainer, lr_multiplier, train

V, PAD = 25, 0


def tiny_cfg(**train_overrides) -> Config:
    cfg = preset("tiny")
    cfg.model = ModelConfig(**{**cfg.to_dict()["model"], "max_len": 16})
    t = {**cfg.to_dict()["train"], "warmup": 2, "max_tokens": 96, "log_every": 1, "eval_every": 1000,
         "save_every": 1000, "ema_decay": 0.9, **train_overrides}
    cfg.train = TrainConfig(**t)
    return cfg


def copy_pairs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = [rng.randint(1, V - 1) for _ in range(rng.randint(2, 8))]
        out.append((s, list(s)))
    return out


def new_denoiser(cfg, seed=0):
    torch.manual_seed(seed)
    return Denoiser(cfg.model, V, PAD)


# ------------------------------------------------------------------------------------------------
# schedule and EMA
# ------------------------------------------------------------------------------------------------

def test_lr_schedules():
    c = TrainConfig(warmup=10, decay="inverse-sqrt", max_steps=100)
    assert lr_multiplier(0, c) == pytest.approx(0.1)
    assert lr_multiplier(9, c) == pytest.approx(1.0)
    assert lr_multiplier(39, c) == pytest.approx((10 / 40) ** 0.5)
    c = TrainConfig(warmup=10, decay="cosine", max_steps=110, min_lr_ratio=0.1)
    assert lr_multiplier(9, c) == pytest.approx(1.0)
    assert lr_multiplier(59, c) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(109, c) == pytest.approx(0.1)
    assert lr_multiplier(500, c) == pytest.approx(0.1)
    assert lr_multiplier(50, TrainConfig(warmup=0, decay="constant")) == 1.0


def test_ema_update():
    m = nn.Linear(3, 2)
    ema = EMA(m, decay=0.99)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m, step=0)  # warm start: decay_0 = min(0.99, 1/10)
    for e, b, p in zip(ema.model.parameters(), before, m.parameters()):
        torch.testing.assert_close(e, 0.1 * b + 0.9 * p)
        assert not e.requires_grad


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from fastdiss.data.tokenizer import Tokenizer
    texts = ["the cat sat on the mat", "a dog ate the bone", "the bird sang a song"] * 20
    return Tokenizer.train(texts, vocab_size=300)


def test_checkpoint_round_trip(tmp_path, tokenizer):
    cfg = tiny_cfg()
    model = new_denoiser(cfg)
    ema = new_denoiser(cfg, seed=1)
    path = tmp_path / "m.pt"
    ckpt.save(path, model, cfg, tokenizer, extra={"valid_bleu": 12.5, "note": "x"}, ema=ema)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]          # no temporary files left behind
    c = ckpt.load(path)
    assert c.kind == "diffusion" and c.cfg == cfg and c.extra == {"valid_bleu": 12.5, "note": "x"}
    assert c.tokenizer.encode("the cat sat") == tokenizer.encode("the cat sat")
    for k, v in ema.state_dict().items():        # .model carries the EMA weights by default ...
        assert torch.equal(c.model.state_dict()[k], v)
    raw = ckpt.load(path, use_ema=False).model   # ... and the raw ones on request
    for k, v in model.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v)
    src, mask = pad_batch([[3, 4, 5], [6, 7]], PAD)
    a = Sampler(model.eval()).generate(src, mask, 3)
    b = Sampler(raw).generate(src, mask, 3)
    assert a.ids == b.ids and torch.equal(a.latents, b.latents)


def test_checkpoint_ar_round_trip(tmp_path):
    from fastdiss.ar import ARTransformer
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = ARTransformer(cfg.model, V, PAD, 1, 2)
    ckpt.save(tmp_path / "ar.pt", model, cfg, None)
    c = ckpt.load(tmp_path / "ar.pt")
    assert c.kind == "ar" and isinstance(c.model, ARTransformer) and c.tokenizer is None
    assert (c.model.bos_id, c.model.eos_id) == (1, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(c.model.state_dict()[k], v)


def test_checkpoint_damaged_files(tmp_path):
    cfg = tiny_cfg()
    path = tmp_path / "good.pt"
    ckpt.save(path, new_denoiser(cfg), cfg, None)
    data = path.read_bytes()
    for name, blob in [("truncated.pt", data[: len(data) // 2]), ("tail.pt", data[:-100]),
                       ("garbage.pt", os.urandom(5000)), ("empty.pt", b"")]:
        bad = tmp_path / name
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match=name):
            ckpt.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ckpt.load(tmp_path / "missing.pt")
    # a pickle with arbitrary objects is refused by weights_only loading
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "obj": warnings.WarningMessage("m", UserWarning, "f", 1)}, evil)
    with pytest.raises(ValueError, match="evil.pt"):
        ckpt.load(evil)
    payload = torch.load(path, weights_only=True)
    for mutate, msg in [(lambda p: p.update(version=99), "version 99"),
                        (lambda p: p.update(format="other"), "not a fastdiss checkpoint"),
                        (lambda p: p.pop("model"), "lacks"),
                        (lambda p: p["config"]["model"].update(d_model=64, n_heads=4), "do not fit"),
                        (lambda p: p["config"]["model"].update(bogus=1), "bogus"),
                        (lambda p: p.update(kind="gan"), "gan")]:
        p = torch.load(path, weights_only=True)
        mutate(p)
        torch.save(p, tmp_path / "mut.pt")
        with pytest.raises(ValueError, match=msg):
            ckpt.load(tmp_path / "mut.pt")
    other = tiny_cfg()
    other.model = ModelConfig(**{**other.to_dict()["model"], "d_latent": 32})
    with pytest.raises(ValueError, match="d_latent: file has 64, expected 32"):
        ckpt.load(path, expect_cfg=other)
    assert payload["version"] == ckpt.FORMAT_VERSION


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    path = tmp_path / "last.pt"
    ckpt.save(path, new_denoiser(cfg), cfg, None, extra={"n": 1})
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(path, new_denoiser(cfg), cfg, None, extra={"n": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ------------------------------------------------------------------------------------------------
# resume and faults
# ------------------------------------------------------------------------------------------------

def test_resume_reproduces_next_steps_exactly(tmp_path):
    cfg = tiny_cfg(save_every=3)
    data = copy_pairs(64)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a = Trainer(cfg, new_denoiser(cfg), out_dir=str(a_dir), progress=False)
    a.fit(data, [], max_steps=3)
    b_dir.mkdir()
    shutil.copy(a_dir / "last.pt", b_dir / "last.pt")
    a.fit(data, [], max_steps=5)                         # the uninterrupted run
    res = train(cfg, data, [], None, str(b_dir), max_steps=5, progress=False, vocab_size=V, pad_id=PAD)
    assert res.steps == 5
    losses_a = {h["step"]: h["loss"] for h in a.history if "loss" in h}
    losses_b = {h["step"]: h["loss"] for h in res.history if "loss" in h}
    assert set(losses_b) == {1, 2, 3, 4, 5}
    for s in (1, 2, 3, 4, 5):
        assert losses_a[s] == losses_b[s], f"step {s}: {losses_a[s]} != {losses_b[s]}"
    c = ckpt.load(b_dir / "last.pt", use_ema=False)
    for k, v in a.model.state_dict().items():
        assert torch.equal(c.weights[k], v), k
    for k, v in a.ema.model.state_dict().items():
        assert torch.equal(c.ema_weights[k], v), k
    assert c.train_state["step"] == 5


class _BadModel(nn.Module):
    """Duck-typed model whose loss is NaN (or finite with an infinite gradient)."""
    pad_id, vocab_size, kind = PAD, V, "ar"

    def __init__(self, mode):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.mode = mode

    def loss(self, batch):
        if self.mode == "nan":
            loss = self.w.sum() * float("nan")
        else:  # d sqrt(x)/dx at x = 0 is inf; the loss itself is finite
            loss = torch.sqrt(self.w - self.w.detach()).sum()
        return loss, {"loss": float(loss.detach())}


@pytest.mark.parametrize("mode", ["nan", "inf-grad"])
def test_non_finite_steps_are_skipped_then_stop(mode):
    cfg = tiny_cfg(max_bad_steps=3, ema_decay=0.0)
    tr = Trainer(cfg, _BadModel(mode), kind="ar", progress=False)
    batch = {"src": torch.ones(1, 2, dtype=torch.long)}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        stats = tr.train_step(batch)
    assert stats["skipped"] == 1.0 and tr.bad_total == 1
    assert torch.equal(tr.model.w.detach(), torch.ones(3))           # no update
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train_step(batch)
        with pytest.raises(NonFiniteLossError, match="3 consecutive"):
            tr.train_step(batch)


def test_ar_model_trains_and_validates(tmp_path):
    from fastdiss.ar import ARTransformer
    cfg = tiny_cfg(eval_every=3, ema_decay=0.5)
    torch.manual_seed(0)
    model = ARTransformer(cfg.model, V, PAD, 1, 2)
    data = [(s, t) for s, t in copy_pairs(40) if 1 not in s and 2 not in s]
    tr = Trainer(cfg, model, kind="ar", out_dir=str(tmp_path), progress=False)
    res = tr.fit(data, data[:6], max_steps=3)
    assert res.steps == 3 and 0.0 <= res.best_bleu <= 100.0
    assert ckpt.load(tmp_path / "best.pt").kind == "ar"
    assert any("valid_bleu" in h for h in res.history)


def test_diffusion_fit_writes_best_and_last(tmp_path):
    cfg = tiny_cfg(eval_every=2, eval_steps=2)
    data = copy_pairs(40)
    res = Trainer(cfg, new_denoiser(cfg), out_dir=str(tmp_path), progress=False).fit(data, data[:5], max_steps=4)
    assert res.best_path and res.last_path and os.path.exists(res.last_path)
    best = ckpt.load(res.best_path)
    assert best.train_state is None and "valid_bleu" in best.extra
    assert ckpt.load(res.last_path).train_state["step"] == 4
    logged = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert len(logged) == 4 + 2


# ------------------------------------------------------------------------------------------------
# DDP
# ------------------------------------------------------------------------------------------------

def _ddp_cfg():
    cfg = tiny_cfg(ema_decay=0.0, warmup=0, lr=1e-3)
    cfg.diffusion = DiffusionConfig(self_cond_prob=0.0, scp=False, mans=True, mans_d_lo=0.5, mans_d_hi=1.5)
    return cfg


def _global_batch():
    g = torch.Generator().manual_seed(3)
    B, L = 8, 6
    src = torch.randint(1, V, (B, L), generator=g)
    return dict(src=src, src_mask=torch.zeros(B, L, dtype=torch.bool), tgt=src.flip(1).clone(),
                tgt_mask=torch.zeros(B, L, dtype=torch.bool), t=torch.rand(B, generator=g),
                eps=torch.randn(B, L, 64, generator=g))


def _ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = _ddp_cfg()
        tr = Trainer(cfg, new_denoiser(cfg), progress=False)
        assert tr.world == world
        full = _global_batch()
        n = full["src"].shape[0] // world
        shard = {k: v[rank * n:(rank + 1) * n] for k, v in full.items()}
        tr.train_step(shard)
        if rank == 0:
            torch.save(tr.model.state_dict(), out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    cfg = _ddp_cfg()
    single = Trainer(cfg, new_denoiser(cfg), progress=False)
    single.train_step(_global_batch())
    ddp = torch.load(out, weights_only=True)
    init = new_denoiser(cfg).state_dict()
    moved = 0
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, atol=2e-6, rtol=1e-4, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(v, init[k]))
    assert moved > len(init) // 2   # the step really changed the weights


def test_fit_in_chunks_equals_one_fit():
    cfg = tiny_cfg()
    data = copy_pairs(48)
    one = Trainer(cfg, new_denoiser(cfg), progress=False)
    one.fit(data, None, max_steps=4)
    chunks = Trainer(cfg, new_denoiser(cfg), progress=False)
    chunks.fit(data, None, max_steps=1)
    chunks.fit(data, None, max_steps=4)
    assert (chunks.step, chunks.epoch, chunks.batch_in_epoch) == (one.step, one.epoch, one.batch_in_epoch)
    for k, v in one.model.state_dict().items():
        assert torch.equal(chunks.model.state_dict()[k], v), k


def test_fit_stops_on_time_and_ends_like_a_last_step(tmp_path):
    """max_seconds: the loop stops before the step budget, validates and writes last.pt at the step reached."""
    cfg = tiny_cfg()
    model = Denoiser(cfg.model, V, PAD)
    trainer = Trainer(cfg, model, out_dir=str(tmp_path), progress=False)
    res = trainer.fit(copy_pairs(64), copy_pairs(4), max_steps=10 ** 6, max_seconds=2.0)
    assert res.stopped_by_time and 0 < res.steps < 10 ** 6
    saved = ckpt.load(str(tmp_path / "last.pt"))
    assert saved.train_state["step"] == res.steps
    assert any("valid_bleu" in h and h["step"] == res.steps for h in res.history)
    again = Trainer(cfg, Denoiser(cfg.model, V, PAD), out_dir=str(tmp_path / "b"), progress=False)
    assert not again.fit(copy_pairs(64), None, max_steps=3, max_seconds=3600).stopped_by_time
