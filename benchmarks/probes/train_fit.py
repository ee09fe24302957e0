"""Probe: does the shipped elb2web student fit its own training data? BLEU on 96 evenly spaced distilled
training pairs (against the teacher outputs it was trained on) beside the 96-sentence test subset."""
import sys; sys.path.insert(0, ".")
import torch
from pathlib import Path
from benchmarks import quality, learning_curve
from fastdiss.pretrained import load_pretrained
from fastdiss.evaluate import generate, score
torch.set_num_threads(1)
ck = load_pretrained("fastdiss/pretrained/elb2web-tiny"); m = ck.model.float().eval()
tok = ck.tokenizer
data = quality.load_task("elb2web", 64, 96, 0, Path("runs/learning_curve"), False)
dist = learning_curve.load_distilled("runs/elb2web.distilled.tsv", tok, 64)
idx = [int(i * len(dist) / 96) for i in range(96)]
srcs = [dist[i][0] for i in idx]; refs = [tok.decode(dist[i][1]) for i in idx]
for K in (1, 4):
    res = generate(m, "diffusion", srcs, cfg=ck.cfg, steps=K, length_beam=1, noise_draws=1)
    hyps = [tok.decode(h) for h in res.ids]
    print("train (distilled refs) K", K, score(hyps, refs)["bleu"], hyps[0], "|", refs[0])
    res = generate(m, "diffusion", data.test_src, cfg=ck.cfg, steps=K, length_beam=1, noise_draws=1)
    print("test K", K, score([tok.decode(h) for h in res.ids], data.test_ref)["bleu"])
