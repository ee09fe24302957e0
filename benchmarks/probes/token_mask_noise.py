"""Probe: CMLM-style per-token noise in embedding diffusion + mask-predict sampling.

Training: per sequence n ~ U{1..T} target positions are 'masked' (t_i = 1, pure noise), the rest revealed
(t_i = t_rev, nearly clean z0); self-conditioning as usual; loss MSE + CE on masked positions, + length CE.
With --mix p, a fraction p of the batches use the ordinary per-sequence t ~ U(0,1) instead.
"""
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from benchmarks.probes.common import config_and_data, parse_args  # noqa: E402
from fastdiss.diffusion import IGNORE, DiffusionObjective, rounding_loss  # noqa: E402
from fastdiss.train import Trainer, build_model  # noqa: E402


def own_args(p):
    p.add_argument("--mix", type=float, default=0.0)
    p.add_argument("--t-rev", type=float, default=0.0)


args = parse_args("cmlm", own_args)
cfg, data = config_and_data(args, diffusion={"scp": False, "mans": False})
torch.manual_seed(args.seed)
model = build_model(cfg, data.tokenizer)


class CMLMObjective(DiffusionObjective):
    def loss(self, batch):
        cfg, model = self.cfg, self.model
        src, src_mask, tgt, tgt_mask = batch["src"], batch["src_mask"], batch["tgt"], batch["tgt_mask"]
        B, L = tgt.shape
        keep = ~tgt_mask
        T_len = keep.sum(1)
        enc = model.encode(src, src_mask)
        if bool(torch.rand(()) < args.mix):
            t_tok = torch.rand(B)[:, None].expand(B, L)
            masked = keep
        else:
            n = (torch.rand(B) * T_len.float()).floor().long() + 1           # 1..T
            score = torch.rand(B, L).masked_fill(~keep, 2.0)
            masked = (score.argsort(1).argsort(1) < n[:, None]) & keep
            t_tok = torch.where(masked, torch.ones(B, L), torch.full((B, L), args.t_rev))
        eps = torch.randn(B, L, model.cfg.d_latent)
        z0, x_t = model.embed_and_noise(tgt, t_tok, eps, schedule=cfg.schedule, noise_factor=cfg.noise_factor)
        sc = None
        if bool(torch.rand(()) < cfg.self_cond_prob):
            sc = self._predict(x_t.detach(), t_tok, enc, tgt_mask)
        x0_hat = model(x_t, sc, t_tok, enc, tgt_mask)
        mf = masked.unsqueeze(-1).float()
        mse = ((x0_hat.float() - z0.float()).pow(2) * mf).sum() / (mf.sum().clamp_min(1) * model.cfg.d_latent)
        ce = rounding_loss(x0_hat, model.target_embeddings(), tgt.masked_fill(~masked, IGNORE))
        length_ce = F.cross_entropy(model.length_logits(enc).float(), T_len.clamp(max=model.cfg.max_len))
        loss = cfg.mse_weight * mse + cfg.ce_weight * ce + cfg.length_weight * length_ce
        return loss, {"loss": float(loss.detach()), "ce": float(ce.detach())}


trainer = Trainer(cfg, model, kind="diffusion", progress=False)
trainer.objective = trainer.module = CMLMObjective(model, cfg.diffusion)
cps = sorted(set(args.checkpoints + [args.steps]))
run_dir = Path(f"runs/probe/{args.name}")
run_dir.mkdir(parents=True, exist_ok=True)
for cp in cps:
    trainer.fit(data.train, None, max_steps=cp)
    trainer.save(str(run_dir / f"step{cp}.pt"), extra={"step": cp})
    print(f"step {cp} loss {trainer.history[-1]['loss']:.3f}", flush=True)
    out = subprocess.run([sys.executable, "benchmarks/probes/mask_predict.py", str(run_dir / f"step{cp}.pt"), args.task],
                         capture_output=True, text=True)
    print("\n".join(l for l in out.stdout.splitlines()), out.stderr[-500:] if out.returncode else "", flush=True)
