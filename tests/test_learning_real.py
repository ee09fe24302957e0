"""The learning recipe on real data: the tiny preset, trained for a few hundred steps on a slice of
kjv2web (short verses), reaches a test BLEU at 4 sampling steps that the recipe before it (no
source copy, noise factor 1, absolute lengths, a learnt z0 LayerNorm, true time at sampling) does
not reach with the same data, steps and seed. About two CPU minutes per recipe with one thread.

Calibration (this machine, one thread, seed 0): the new recipe reached BLEU 6.1 after 300 steps of
1024 tokens; the old recipe stayed below 1 (the committed benchmark files show it below 2 even after
800 steps of 2048 tokens). The thresholds sit between the two with a wide margin either side."""
import pytest
import torch

from fastdiss.config import Config, preset
from fastdiss.data import corpus
from fastdiss.metrics import bleu
from fastdiss.sampling import Sampler
from fastdiss.train import Trainer, build_model

STEPS, TOKENS, MAX_TOKENS_A_SIDE, N_TEST = 300, 1024, 24, 64
OLD = {"model": {"src_copy": "none", "length_offset": False, "latent_norm_affine": True},
       "diffusion": {"noise_factor": 1.0}, "sample": {"time_shift": 0.0}}


def short_pairs(tok, split):
    pairs = corpus.load_pairs("kjv2web", split)
    src, tgt = tok.encode_batch([s for s, _ in pairs]), tok.encode_batch([t for _, t in pairs])
    return [(s, t, ref) for s, t, (_, ref) in zip(src, tgt, pairs)
            if 0 < len(s) <= MAX_TOKENS_A_SIDE and 0 < len(t) <= MAX_TOKENS_A_SIDE]


def train_and_score(overrides: dict) -> float:
    d = preset("tiny").to_dict()
    for section, kv in overrides.items():
        d[section].update(kv)
    d["train"].update(max_steps=STEPS, max_tokens=TOKENS, warmup=30, eval_every=STEPS, save_every=STEPS, seed=0)
    cfg = Config.from_dict(d)
    tok = corpus.load_tokenizer("kjv2web")
    train = [(s, t) for s, t, _ in short_pairs(tok, "train")]
    test = short_pairs(tok, "test")
    test = [test[int(i * len(test) / N_TEST)] for i in range(N_TEST)]
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model(cfg, tok), tokenizer=tok, progress=False)
    trainer.fit(train, None, max_steps=STEPS)
    res = Sampler(trainer.eval_model, cfg.sample, cfg.diffusion).translate([s for s, _, _ in test], 4, length_beam=1,
                                                                          noise_draws=1, seed=0)
    return bleu([tok.decode(ids) for ids in res.ids], [ref for _, _, ref in test])[0]


@pytest.mark.slow
def test_new_recipe_learns_a_kjv2web_slice_the_old_one_does_not():
    new = train_and_score({})
    old = train_and_score(OLD)
    assert new >= 4.0, f"the default recipe reached only BLEU {new:.2f} at K=4 after {STEPS} steps"
    assert old < 2.5, f"the old recipe reached BLEU {old:.2f}: the test no longer separates the recipes"
    assert new >= old + 2.5
