"""Shipped models: safetensors round trip, checksums, version and damage errors, and the shipped
folders themselves (size limit, provenance, the CLI using them without --ckpt)."""
import json
import os

import pytest
import torch

from fastdiss import pretrained
from fastdiss.checkpoint import Checkpoint
from fastdiss.config import ModelConfig, preset
from fastdiss.data import corpus
from fastdiss.model import Denoiser


@pytest.fixture(scope="module")
def tiny_ck():
    cfg = preset("tiny")
    cfg.model = ModelConfig(**{**cfg.to_dict()["model"], "max_len": 24, "d_model": 32, "d_ff": 64, "n_heads": 2,
                               "d_latent": 16})
    tok = corpus.load_tokenizer("kjv2web")
    torch.manual_seed(0)
    model = Denoiser(cfg.model, tok.vocab_size, tok.pad_id).eval()
    return Checkpoint(model=model, cfg=cfg, tokenizer=tok, kind="diffusion",
                      model_args={"vocab_size": tok.vocab_size, "pad_id": tok.pad_id})


def test_round_trip_keeps_fp16_rounded_weights(tiny_ck, tmp_path):
    out = pretrained.save_pretrained(tiny_ck, tmp_path / "m", {"note": "test"})
    back = pretrained.load_pretrained(out)
    assert back.kind == "diffusion" and back.cfg.to_dict() == tiny_ck.cfg.to_dict()
    want = tiny_ck.model.state_dict()
    got = back.model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype
        torch.testing.assert_close(got[k], v.half().float() if v.is_floating_point() else v, rtol=0, atol=0)
    assert back.tokenizer.encode("In the beginning") == tiny_ck.tokenizer.encode("In the beginning")
    assert back.extra["provenance"] == {"note": "test"}
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in out.iterdir())   # readable by everyone, not mkstemp's 0600
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "provenance.json",
                                                      "tokenizer.json"]       # no temporary files left


@pytest.mark.parametrize("victim", ["model.safetensors", "tokenizer.json"])
def test_damaged_file_names_the_file_and_the_fix(tiny_ck, tmp_path, victim):
    out = pretrained.save_pretrained(tiny_ck, tmp_path / "m", {})
    path = out / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(pretrained.PretrainedError, match=rf"{victim}: damaged .*reinstall"):
        pretrained.load_pretrained(out)


def test_other_version_and_missing_folder(tiny_ck, tmp_path):
    out = pretrained.save_pretrained(tiny_ck, tmp_path / "m", {})
    meta = json.loads((out / "config.json").read_text())
    meta["version"] = pretrained.FORMAT_VERSION + 1
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(pretrained.PretrainedError, match="format version .*this fastdiss reads version"):
        pretrained.load_pretrained(out)
    with pytest.raises(pretrained.PretrainedError, match="no shipped model"):
        pretrained.load_pretrained(tmp_path / "nowhere")


def test_weights_that_do_not_fit_the_config(tiny_ck, tmp_path):
    out = pretrained.save_pretrained(tiny_ck, tmp_path / "m", {})
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["model"]["d_model"] = 64
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(pretrained.PretrainedError, match="does not fit this fastdiss"):
        pretrained.load_pretrained(out)


SHIPPED = [pretrained.DEFAULT_MODEL, pretrained.DEFAULT_AR]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_load_within_the_size_limit_with_provenance(name):
    folder = pretrained.shipped_path(name)
    assert folder.is_dir(), f"{folder} is missing: the package must ship it"
    assert (folder / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    ck = pretrained.load_pretrained(folder)
    prov = ck.extra["provenance"]
    for key in ("train_command", "git", "train_steps", "train_hours", "machine", "valid_bleu", "train_log"):
        assert key in prov, key
    assert all(p.dtype == torch.float32 for p in ck.model.parameters())


def test_generate_without_ckpt_uses_the_shipped_model(capsys, monkeypatch):
    import io
    import sys

    from fastdiss.cli import main
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("Im Anfang war das Wort.\n".encode())))
    assert main(["generate", "--steps", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].strip()
