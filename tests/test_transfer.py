"""AR-to-denoiser initialisation (TrainConfig.init_from, fastdiss/transfer.py): the shared modules
carry the AR checkpoint's weights, named here one by one; the diffusion-only parts keep their
fresh initialisation; a checkpoint of another size or kind is refused with the fix."""
import pytest
import torch

from fastdiss import checkpoint
from fastdiss.ar import ARTransformer
from fastdiss.config import preset
from fastdiss.model import Denoiser
from fastdiss.train import build_model

V = 40


def tiny_cfg(**model):
    cfg = preset("tiny")
    return cfg.replace(model=type(cfg.model)(**{**cfg.to_dict()["model"], "max_len": 16, **model}))


def save_ar(path, cfg, seed=0):
    torch.manual_seed(seed)
    ar = ARTransformer(cfg.model, V, 0, 1, 2)
    for p in ar.parameters():                       # distinct, non-default values everywhere
        p.data.normal_()
    checkpoint.save(path, ar, cfg, None)
    return {k: v.clone() for k, v in ar.state_dict().items()}


def test_init_from_copies_encoder_decoder_and_embeddings_and_keeps_the_rest(tmp_path):
    cfg = tiny_cfg()
    ar_state = save_ar(tmp_path / "ar.pt", cfg)
    torch.manual_seed(5)
    fresh = Denoiser(cfg.model, V, 0).state_dict()
    torch.manual_seed(5)
    run_cfg = cfg.replace(train=type(cfg.train)(**{**cfg.to_dict()["train"], "init_from": str(tmp_path / "ar.pt")}))
    m = build_model(run_cfg, None, "diffusion", vocab_size=V, pad_id=0).state_dict()
    expected = {"encoder.embed.weight": "embed.weight"}
    for i in range(cfg.model.n_enc):
        expected.update({f"encoder.layers.{i}.{k[len(f'encoder.{i}.'):]}": k for k in ar_state
                         if k.startswith(f"encoder.{i}.")})
    for i in range(cfg.model.n_dec):
        expected.update({f"decoder.{i}.{k[len(f'decoder.{i}.'):]}": k for k in ar_state if k.startswith(f"decoder.{i}.")})
    expected.update({"encoder.norm.weight": "enc_ln.weight", "encoder.norm.bias": "enc_ln.bias",
                     "dec_norm.weight": "dec_ln.weight", "dec_norm.bias": "dec_ln.bias"})
    assert len(expected) > 20
    for name, ar_name in expected.items():
        assert torch.equal(m[name], ar_state[ar_name]), name
    for name in m:
        if name not in expected:
            assert torch.equal(m[name], fresh[name]), name


def test_init_from_refuses_another_size_or_kind(tmp_path):
    cfg = tiny_cfg()
    save_ar(tmp_path / "ar.pt", tiny_cfg(d_ff=256))
    with pytest.raises(ValueError, match="differs in size.*d_ff"):
        from fastdiss.transfer import init_from_ar
        init_from_ar(Denoiser(cfg.model, V, 0), str(tmp_path / "ar.pt"))
    checkpoint.save(tmp_path / "diff.pt", Denoiser(cfg.model, V, 0), cfg, None)
    with pytest.raises(ValueError, match="must be an AR checkpoint"):
        init_from_ar(Denoiser(cfg.model, V, 0), str(tmp_path / "diff.pt"))
    with pytest.raises(FileNotFoundError, match="clear train.init_from"):
        init_from_ar(Denoiser(cfg.model, V, 0), str(tmp_path / "missing.pt"))
