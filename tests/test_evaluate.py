"""fastdiss.evaluate, the one generation + scoring path of the CLI, the demo, Trainer validation and
the benchmarks: the AR length cap holds per sentence whatever the batch, diffusion generation is the
Sampler's, scores carry their signatures, and the evaluated subset is spread evenly and fixed."""
import pytest
import torch

from fastdiss import evaluate
from fastdiss.ar import ARTransformer
from fastdiss.config import ModelConfig, preset
from fastdiss.model import Denoiser
from fastdiss.sampling import Sampler

V, PAD, BOS, EOS = 30, 0, 1, 2


def _model_cfg():
    return ModelConfig(**{**preset("tiny").to_dict()["model"], "d_model": 32, "n_heads": 2, "d_ff": 64,
                          "n_enc": 1, "n_dec": 1, "d_latent": 16, "max_len": 40})


def test_ar_length_cap():
    assert evaluate.ar_length_cap(64, 3) == 16
    assert evaluate.ar_length_cap(64, 40) == 64


def test_ar_outputs_are_capped_per_sentence_in_a_mixed_batch():
    """An untrained model rarely stops by itself: each output must still end at its own source's cap,
    not at the cap of the longest source in its batch."""
    torch.manual_seed(0)
    model = ARTransformer(_model_cfg(), V, PAD, BOS, EOS)
    sources = [[5, 6], [7] * 14, [8, 9, 10]]
    for beam in (1, 2):
        out = evaluate.generate(model, "ar", sources, beam=beam, batch_size=3)
        assert out.calls_per_sentence is None and out.single_ids is out.ids and out.seconds > 0
        for src, ids in zip(sources, out.ids):
            assert len(ids) <= evaluate.ar_length_cap(model.max_len, len(src)), (beam, src, ids)


def test_diffusion_generation_is_the_samplers():
    cfg = preset("tiny")
    cfg.model = _model_cfg()
    torch.manual_seed(0)
    model = Denoiser(cfg.model, V, PAD).eval()
    sources = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    out = evaluate.generate(model, "diffusion", sources, cfg=cfg, steps=2, length_beam=2, noise_draws=1,
                            select="score", seed=3, batch_size=2)
    want = Sampler(model, cfg.sample, cfg.diffusion).translate(sources, 2, batch_size=2, length_beam=2,
                                                                noise_draws=1, select="score", seed=3)
    assert out.ids == want.ids and out.single_ids == want.single_ids
    assert out.calls_per_sentence == want.calls_per_sentence == 4


def test_score_has_bleu_chrf_and_signatures():
    s = evaluate.score(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert s["bleu"] == pytest.approx(100.0) and s["chrf"] == pytest.approx(100.0)
    assert s["bleu_signature"].startswith("nrefs:1") and "chrF" not in s["bleu_signature"]
    assert s["chrf_signature"].startswith("nrefs:1")


def test_evaluated_subset_is_spread_and_fixed():
    assert evaluate.evenly_spaced(10, 0) == list(range(10))
    assert evaluate.evenly_spaced(10, 4) == [0, 2, 5, 7]
    assert evaluate.evenly_spaced(3, 5) == [0, 1, 2]
