"""Rounding cross-entropy: CE(x0_hat @ embedding^T, targets) computed in vocabulary chunks.
STUB: reference only."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rounding_cross_entropy_reference(x0_hat, embedding, targets, ignore_index=-100, reduction="mean"):
    logits = x0_hat.reshape(-1, x0_hat.shape[-1]).float() @ embedding.float().t()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def rounding_cross_entropy(x0_hat, embedding, targets, ignore_index=-100, reduction="mean"):
    return rounding_cross_entropy_reference(x0_hat, embedding, targets, ignore_index, reduction)
