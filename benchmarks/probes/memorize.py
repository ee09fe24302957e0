"""Probe: can the tiny denoiser memorise N distilled elb2web pairs? (usage: memorize.py N STEPS diffusion|ar [SECTION.KEY=VALUE ...])
A model that cannot fit a handful of pairs has a bug; one that can, but learns 16k pairs slowly, is slow to learn."""
import sys; sys.path.insert(0, ".")
import torch, time
from pathlib import Path
from benchmarks import quality, learning_curve
from fastdiss.train import Trainer, build_model
from fastdiss.evaluate import generate, score
torch.set_num_threads(1)
N, steps, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sets = sys.argv[4:]
cfg = quality.make_config("tiny", quality.parse_overrides(sets), None, 0, steps, None, None)
data = quality.load_task("elb2web", 64, 96, 0, Path("runs/learning_curve"), False)
dist = learning_curve.load_distilled("runs/elb2web.distilled.tsv", data.tokenizer, 64)[:N]
torch.manual_seed(0)
m = build_model(cfg, data.tokenizer, kind)
tr = Trainer(cfg, m, kind=kind, progress=False)
t0 = time.time()
for cp in (steps // 2, steps):
    tr.fit(dist, None, max_steps=cp)
    em = tr.eval_model
    res = generate(em, kind, [s for s, _ in dist], cfg=cfg, steps=4, length_beam=1, noise_draws=1)
    hyps = [data.tokenizer.decode(h) for h in res.ids]; refs = [data.tokenizer.decode(t) for _, t in dist]
    print(kind, sets, "step", cp, f"{time.time()-t0:.0f}s", "train-set BLEU", round(score(hyps, refs)["bleu"], 2), "|", hyps[1], "|", refs[1], flush=True)
