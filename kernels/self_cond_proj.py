"""Self-conditioning input projection Linear([x_t ; sc]) (+ add) without the concatenation.
STUB: reference only."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def self_cond_project_reference(x_t, sc, weight, bias=None, add=None):
    y = F.linear(torch.cat([x_t, sc], -1), weight, bias)
    return y if add is None else y + add


def self_cond_project(x_t, sc, weight, bias=None, add=None):
    return self_cond_project_reference(x_t, sc, weight, bias, add)
