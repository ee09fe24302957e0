"""The target-length rule of generation, in a module of its own so that the Sampler and the exported
encoder (fastdiss.export, traced for the C++ sampler) share it without importing each other."""
from __future__ import annotations

import torch

from fastdiss.config import SampleConfig


def length_cap(model, sample_cfg: SampleConfig) -> int:
    """Longest target the sampler generates: SampleConfig.max_len (0 = no cap) within the model's max_len."""
    return min(sample_cfg.max_len or model.cfg.max_len, model.cfg.max_len)


def predict_lengths(length_logits, cap: int, beam: int = 1):
    """Top-`beam` target lengths per sentence (B, beam), best first, among 1..cap: the one length rule.
    The exported encoder traces it too, so the C++ sampler receives lengths and computes none."""
    logits = length_logits.float()
    n = torch.arange(logits.shape[-1], device=logits.device)
    logits = logits.masked_fill((n < 1) | (n > cap), float("-inf"))
    return logits.topk(min(beam, cap), dim=-1).indices
