"""Probe: mask-predict style refinement with a trained denoiser (per-token times).

Iteration 1: every position at t=1 (noise). Iteration k>1: the n_k = L*(K-k+1)/K least confident
positions get fresh noise at t=1, the others the clean embedding of their current token at t=t_keep.
Only the re-noised positions take the new prediction (CMLM's mask-predict).
usage: maskpredict_probe.py CKPT_OR_PRETRAINED TASK [t_keep]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks import quality  # noqa: E402
from fastdiss import functional  # noqa: E402
from fastdiss.evaluate import score  # noqa: E402
from fastdiss.lengths import length_cap, predict_lengths  # noqa: E402
from fastdiss.sampling import pad_batch, Sampler  # noqa: E402

torch.set_num_threads(1)
path, task = sys.argv[1], sys.argv[2]
t_keep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
if path.endswith(".pt"):
    from fastdiss import checkpoint
    ck = checkpoint.load(path)
else:
    from fastdiss.pretrained import load_pretrained
    ck = load_pretrained(path)
m, cfg = ck.model.float().eval(), ck.cfg
data = quality.load_task(task, m.cfg.max_len, 96, 0, Path("runs/learning_curve"), False)
nf, sched = cfg.diffusion.noise_factor, cfg.diffusion.schedule


@torch.no_grad()
def mask_predict(srcs, K, sc_mode="prev"):
    g = torch.Generator().manual_seed(0)
    src, src_mask = pad_batch(srcs, m.pad_id)
    enc = m.encode(src, src_mask)
    lens = predict_lengths(m.length_logits(enc), length_cap(m, cfg.sample), 1)[:, 0]
    B, L = len(srcs), int(lens.max())
    mask = torch.arange(L)[None, :] >= lens[:, None]
    E = m.target_embeddings()
    x = nf * torch.randn(B, L, m.cfg.d_latent, generator=g)
    t = torch.ones(B, L)
    x0 = m(x, None, t, enc, mask)
    logp = m.logits(x0).log_softmax(-1)
    conf, ids = logp.max(-1)
    sc = x0
    for k in range(2, K + 1):
        n = (lens.float() * (K - k + 1) / K).long()
        c = conf.masked_fill(mask, float("inf"))
        rank = c.argsort(1).argsort(1)
        redo = rank < n[:, None]
        clean = E[ids]
        noise = nf * torch.randn(B, L, m.cfg.d_latent, generator=g)
        if t_keep > 0:
            clean = functional.q_sample(clean, torch.full((B, L), t_keep), torch.randn(B, L, m.cfg.d_latent, generator=g),
                                        schedule=sched, noise_factor=nf)
        x = torch.where(redo[..., None], noise, clean)
        t = torch.where(redo, torch.ones(B, L), torch.full((B, L), t_keep))
        x0 = m(x, sc if sc_mode == "prev" else None, t, enc, mask)
        lp = m.logits(x0).log_softmax(-1)
        c2, i2 = lp.max(-1)
        ids = torch.where(redo, i2, ids)
        conf = torch.where(redo, c2, conf)
        sc = torch.where(redo[..., None], x0, sc)
    return [ids[i, :int(lens[i])].tolist() for i in range(B)]


refs = data.test_ref
for K in (1, 2, 4, 8):
    hyps = []
    for b in range(0, len(data.test_src), 96):
        hyps += mask_predict(data.test_src[b:b + 96], K)
    text = [data.tokenizer.decode(h) for h in hyps]
    print(f"mask-predict K={K} t_keep={t_keep}: BLEU {score(text, refs)['bleu']:.2f}  {text[0]!r}")
s = Sampler(m, cfg.sample, cfg.diffusion)
for K in (1, 4):
    res = s.translate(data.test_src, K, length_beam=1, noise_draws=1)
    text = [data.tokenizer.decode(h) for h in res.ids]
    print(f"ddim K={K}: BLEU {score(text, refs)['bleu']:.2f}  {text[0]!r}")
