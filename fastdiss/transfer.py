"""Initialise a denoiser from a trained autoregressive model of the same size (TrainConfig.init_from).

Why: the AR teacher of sequence-level distillation has already learnt the source language and the
source-target alignment; a non-autoregressive student that starts from its encoder and decoder
layers learns its parallel decoding much faster than one that starts from random weights (the
AR-to-NAT transfer of non-autoregressive translation). What is copied, by module: the source token
embeddings, the encoder layers and final LayerNorm, the decoder layers (the same block class; the
AR decoder ran them causally, the denoiser runs them bidirectionally) and the decoder's final
LayerNorm. What stays fresh: the diffusion-only parts (target embedding table E, the
self-conditioning input projection, source copy, time MLP, output projection, length head) and the
positions (the AR model learns its position tables, the denoiser uses fixed sinusoids).
"""
from __future__ import annotations

import os

import torch.nn as nn

SIZE_FIELDS = ("d_model", "n_enc", "n_dec", "n_heads", "d_ff")


def init_from_ar(denoiser: nn.Module, path: str) -> list[str]:
    """Copy the shared modules of the AR checkpoint at `path` into `denoiser` (in place); returns the
    names of the denoiser's parameters that were overwritten."""
    from fastdiss import checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(f"train.init_from: no AR checkpoint at {path!r}; train one with "
                                f"`fastdiss train --model ar` or clear train.init_from")
    ckpt = checkpoint.load(path)
    ar = ckpt.model
    if ckpt.kind != "ar":
        raise ValueError(f"train.init_from: {path!r} holds a {ckpt.kind} model; it must be an AR checkpoint")
    mine = denoiser.cfg
    diff = [f"{f} {getattr(ckpt.cfg.model, f)} vs {getattr(mine, f)}" for f in SIZE_FIELDS
            if getattr(ckpt.cfg.model, f) != getattr(mine, f)]
    if ar.vocab_size != denoiser.vocab_size:
        diff.append(f"vocab_size {ar.vocab_size} vs {denoiser.vocab_size}")
    if diff:
        raise ValueError(f"train.init_from: the AR model at {path!r} differs in size from this denoiser "
                         f"({', '.join(diff)}); train the AR model with the same preset and tokenizer")
    pairs = [(denoiser.encoder.layers, ar.encoder), (denoiser.encoder.norm, ar.enc_ln),
             (denoiser.decoder, ar.decoder), (denoiser.dec_norm, ar.dec_ln)]
    if not mine.share_embeddings:
        pairs.append((denoiser.encoder.embed, ar.embed))
    own = {id(p): name for name, p in denoiser.named_parameters()}
    copied = []
    for target, source in pairs:
        target.load_state_dict(source.state_dict(), strict=True)
        copied += [own[id(p)] for p in target.parameters()]
    return copied
