"""Probe: the AR teacher's per-position knowledge as a dense training signal for the denoiser.

hint: the denoiser's final decoder state at target position j (through a learnt linear map) is pulled towards the
      AR teacher's final decoder state that predicts token j (teacher-forced on the same target), 1 - cosine;
kd:   word-level distillation, KL(teacher's next-token distribution || the rounding head's distribution) at j.
Both are added to the default objective (SCP + MANS + MSE + CE) with --weight; the teacher is frozen.
"""
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, ".")
from benchmarks import learning_curve  # noqa: E402
from benchmarks.probes.common import config_and_data, parse_args  # noqa: E402
from fastdiss import checkpoint  # noqa: E402
from fastdiss.diffusion import DiffusionObjective  # noqa: E402
from fastdiss.model import add_and_norm  # noqa: E402
from fastdiss.train import Trainer, build_model  # noqa: E402


def own_args(p):
    p.add_argument("--mode", choices=("hint", "kd"), default="hint")
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--teacher", default="runs/learning_curve/elb2web-ar-s0/last.pt")


args = parse_args("hint", own_args)
cfg, data = config_and_data(args)
teacher = checkpoint.load(args.teacher).model.eval()
for q in teacher.parameters():
    q.requires_grad_(False)
torch.manual_seed(args.seed)
model = build_model(cfg, data.tokenizer)
model.hint_proj = nn.Linear(cfg.model.d_model, teacher.d_model)   # trained with the model (its optimizer sees it)

captured = {}
model.dec_norm.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))


@torch.no_grad()
def teacher_states(src, src_mask, tgt, tgt_mask):
    """(hidden (B, T, d), logits (B, T, V)) of the teacher at the positions that predict tgt[:, j]."""
    memory = teacher.encode(src, src_mask)
    dec_in, _ = teacher.teacher_forcing(tgt, tgt_mask)
    delta, residual = teacher._embed(dec_in, teacher.tgt_pos), None
    for layer in teacher.decoder:
        k, v = layer.cross_attn.project_kv(memory)
        delta, residual = layer(delta, residual, None, k, v, src_mask, is_causal=True)
    h = add_and_norm(teacher.dec_ln, delta, residual)[0][:, :tgt.shape[1]]
    return h, teacher.logits(h)


class HintObjective(DiffusionObjective):
    def loss(self, batch):
        loss, stats = super().loss(batch)   # the denoiser's last call is the trained pass: captured["h"]
        keep = ~batch["tgt_mask"]
        h_t, logits_t = teacher_states(batch["src"], batch["src_mask"], batch["tgt"], batch["tgt_mask"])
        if args.mode == "hint":
            h_s = self.model.hint_proj(captured["h"])
            extra = ((1 - F.cosine_similarity(h_s.float(), h_t.float(), dim=-1)) * keep).sum() / keep.sum()
        else:
            logp_s = self.model.logits(self.model.out_proj(captured["h"])).float().log_softmax(-1)
            p_t = logits_t.float().softmax(-1)
            extra = ((p_t * (p_t.clamp_min(1e-9).log() - logp_s)).sum(-1) * keep).sum() / keep.sum()
        stats[args.mode] = float(extra.detach())
        return loss + args.weight * extra, stats


trainer = Trainer(cfg, model, kind="diffusion", progress=False)
trainer.objective = trainer.module = HintObjective(model, cfg.diffusion)
rows = []
t0 = time.time()
for cp in sorted(set(args.checkpoints + [args.steps])):
    trainer.fit(data.train, None, max_steps=cp)
    scores = {}
    for k in (1, 4):
        r = learning_curve.evaluate(trainer.eval_model, cfg, "diffusion", data, torch.device("cpu"), k)
        scores[f"K{k}"] = round(r["bleu"], 2)
    rows.append({"step": cp, "seconds": round(time.time() - t0), "loss": trainer.history[-1]["loss"], **scores,
                 "example": r["examples"][0]})
    print(json.dumps(rows[-1]), flush=True)
