"""Probe: CTC over an upsampled latent (length = ratio * source length) for elb2web.

Train: z0 = embeddings of the target stretched uniformly over the latent positions (only to build x_t);
loss = CTC(log_softmax(x0_hat @ norm(E)^T), target, blank = pad id) (+ optional MSE to the stretched z0).
Sample: x = noise, K denoise steps (network time 1, as time_shift=1), argmax, collapse repeats, drop blanks.
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from benchmarks.probes.common import config_and_data, parse_args  # noqa: E402
from fastdiss import functional  # noqa: E402
from fastdiss.diffusion import DiffusionObjective  # noqa: E402
from fastdiss.evaluate import score  # noqa: E402
from fastdiss.train import Trainer, build_model  # noqa: E402


def own_args(p):
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--mse", type=float, default=0.0)


args = parse_args("ctc", own_args)
cfg, data = config_and_data(args)
mcfg = cfg.replace(model=type(cfg.model)(**{**cfg.model.__dict__, "max_len": int(cfg.model.max_len * args.ratio) + 2}))
torch.manual_seed(args.seed)
model = build_model(mcfg, data.tokenizer)
PAD = model.pad_id


def latent_lengths(src_mask):
    return ((~src_mask).sum(1).float() * args.ratio).ceil().long()


class CTCObjective(DiffusionObjective):
    def loss(self, batch):
        cfg, model = self.cfg, self.model
        src, src_mask, tgt, tgt_mask = batch["src"], batch["src_mask"], batch["tgt"], batch["tgt_mask"]
        B = tgt.shape[0]
        T_len = (~tgt_mask).sum(1)
        L_len = torch.maximum(latent_lengths(src_mask), T_len)
        L = int(L_len.max())
        pos = torch.arange(L)[None, :]
        lat_mask = pos >= L_len[:, None]
        j = (pos.float() * T_len[:, None].float() / L_len[:, None].float()).floor().long().clamp(max=tgt.shape[1] - 1)
        stretched = tgt.gather(1, j).masked_fill(lat_mask, PAD)
        enc = model.encode(src, src_mask)
        t = torch.rand(B)
        eps = torch.randn(B, L, model.cfg.d_latent)
        z0, x_t = model.embed_and_noise(stretched, t, eps, schedule=cfg.schedule, noise_factor=cfg.noise_factor)
        sc = None
        if bool(torch.rand(()) < cfg.self_cond_prob):
            sc = self._predict(x_t, t, enc, lat_mask)
        x0_hat = model(x_t, sc, t, enc, lat_mask)
        logp = model.logits(x0_hat).float().log_softmax(-1)
        ctc = F.ctc_loss(logp.transpose(0, 1), tgt, L_len, T_len, blank=PAD, reduction="sum",
                         zero_infinity=True) / T_len.sum()
        loss = ctc
        mse = torch.zeros(())
        if args.mse:
            keep = (~lat_mask).unsqueeze(-1).float()
            mse = ((x0_hat.float() - z0.float()).pow(2) * keep).sum() / (keep.sum() * model.cfg.d_latent)
            loss = loss + args.mse * mse
        return loss, {"loss": float(loss.detach()), "ctc": float(ctc.detach()), "mse": float(mse.detach())}


def collapse(ids):
    out, prev = [], None
    for i in ids:
        if i != prev and i != PAD:
            out.append(i)
        prev = i
    return out


@torch.no_grad()
def generate(m, srcs, K, bs=96):
    m.eval()
    hyps = []
    g = torch.Generator().manual_seed(0)
    for b in range(0, len(srcs), bs):
        chunk = srcs[b:b + bs]
        from fastdiss.data.batching import collate
        batch = collate([(s, [1]) for s in chunk], PAD)
        enc = m.encode(batch["src"], batch["src_mask"])
        L_len = latent_lengths(batch["src_mask"])
        L = int(L_len.max())
        lat_mask = torch.arange(L)[None, :] >= L_len[:, None]
        nf = cfg.diffusion.noise_factor
        x = nf * torch.randn(len(chunk), L, m.cfg.d_latent, generator=g)
        sc = None
        grid = torch.linspace(1, 0, K + 1)
        for k in range(K):
            x0 = m(x, sc, torch.ones(len(chunk)), enc, lat_mask)
            sc = x0
            if k + 1 < K:
                e = torch.randn(x.shape, generator=g)
                x = functional.q_sample(x0, grid[k + 1].expand(len(chunk)), e, schedule=cfg.diffusion.schedule,
                                        noise_factor=nf)
        ids = m.logits(x0).argmax(-1)
        for i in range(len(chunk)):
            hyps.append(collapse(ids[i, :int(L_len[i])].tolist()))
    return hyps


def evaluate(m, K):
    t0 = time.perf_counter()
    hyps = generate(m, data.test_src, K)
    dt = time.perf_counter() - t0
    text = [data.tokenizer.decode(h) for h in hyps]
    s = score(text, data.test_ref)
    return {"K": K, "bleu": s["bleu"], "chrf": s["chrf"], "ms_per_sentence": 1000 * dt / len(hyps), "example": text[:2]}


trainer = Trainer(mcfg, model, kind="diffusion", progress=False)
trainer.objective = trainer.module = CTCObjective(model, mcfg.diffusion)
out = Path(f"runs/probe/{args.name}.json")
results = []
cps = sorted(set(args.checkpoints + [args.steps]))
t0 = time.time()
for cp in cps:
    trainer.fit(data.train, None, max_steps=cp)
    row = {"step": cp, "seconds": time.time() - t0, "loss": trainer.history[-1]["loss"],
           "scores": [evaluate(trainer.eval_model, K) for K in (1, 2, 4)]}
    results.append(row)
    print(json.dumps({"step": cp, "loss": row["loss"], **{f"K{r['K']}": round(r["bleu"], 2) for r in row["scores"]}},
                     ), row["scores"][-1]["example"], flush=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
