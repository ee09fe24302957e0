"""engine="cpp": the sampling loop in C++ (csrc/sampler), driven from Python.

The Sampler keeps everything around the loop (length prediction, candidates, noise from its seeded
generator, selection); this engine replaces the two parts that run the network: `encode` (the
AOTInductor encoder, once per batch) and `denoise` (all K steps in one C++ call, no Python per
step). Given the same initial noise it reproduces the Python loop: same schedule values, same
fused step op, same self-conditioning hand-over.

The C++ class is torch.classes.fastdiss.AOTISampler, part of fastdiss._C. The C++ loop does no
schedule or length math: `denoise` passes it python_engine.step_schedule's tables for the Sampler's
grid; `generate` (the whole generation in C++, as fastdiss_generate runs it) uses the tables that
`fastdiss export` stored for its step counts and the lengths the exported encoder predicts.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdiss import _ext
from fastdiss.export import load_manifest, weights_fingerprint
from fastdiss.model import EncoderState
from fastdiss.python_engine import step_schedule


def require_sampler_class() -> None:
    """Make sure torch.classes.fastdiss.AOTISampler is registered, or raise saying how."""
    _ext.require("the C++ sampler (engine='cpp')")
    try:
        torch.classes.fastdiss.AOTISampler  # noqa: B018  (raises when not registered)
    except (RuntimeError, AttributeError):
        raise RuntimeError("fastdiss._C was built without the C++ sampler (torch.classes.fastdiss.AOTISampler); "
                           "rebuild it with `pip install --no-build-isolation -e .`") from None


class CppEngine:
    """The C++ loop over an exported model (`fastdiss export`). `model`, when given, must hold the
    exported weights (checked by fingerprint), so engines cannot silently disagree."""

    name = "cpp"

    def __init__(self, export_dir, model=None, check_weights: bool = True):
        self.export_dir = Path(export_dir)
        self.manifest = load_manifest(self.export_dir)
        require_sampler_class()
        if model is not None and check_weights:
            have = weights_fingerprint(model)
            if have != self.manifest["weights_sha256"]:
                raise ValueError(f"the model's weights differ from those exported to {os.fspath(self.export_dir)!r} "
                                 f"(fingerprint {have[:12]}... vs {self.manifest['weights_sha256'][:12]}...); "
                                 f"re-export with `fastdiss export` or pass the matching model")
        self.sampler = torch.classes.fastdiss.AOTISampler(os.fspath(self.export_dir))
        self.schedule = self.manifest["schedule"]
        self.noise_factor = float(self.manifest["noise_factor"])
        self.n_dec = int(self.manifest["n_dec"])
        self.device = torch.device(self.manifest["device"])

    # -- the Sampler's engine interface --------------------------------------------------------
    def encode(self, src, src_mask):
        """EncoderState from the exported encoder (memory, src_mask, cross-attention K/V per layer)."""
        if not isinstance(src, torch.Tensor) or not isinstance(src_mask, torch.Tensor):
            raise TypeError(f"src and src_mask must be tensors, got {type(src).__name__} and "
                            f"{type(src_mask).__name__}")
        out = self.sampler.encode(src, src_mask)
        kv = tuple((out[2 + 2 * i], out[3 + 2 * i]) for i in range(self.n_dec))
        return EncoderState(out[0], src_mask, kv)

    def denoise(self, enc, x, tgt_mask, grid, *, clamp: bool = False, time_shift: float = 0.0, on_step=None):
        """All K = len(grid) - 1 steps from x = x_{t_0} in one C++ call -> (x_{t_K}, last x0 (clamped));
        on_step(K) after it, when given."""
        if x is None:
            x = self.noise_factor * torch.randn(enc.out.shape[0], tgt_mask.shape[1], int(self.manifest["d_latent"]),
                                                device=enc.out.device, dtype=enc.out.dtype)
        t_net, alpha, sigma = step_schedule(grid, self.schedule, time_shift)
        out = self.sampler.denoise(_state(enc), enc.src_mask, x, tgt_mask, t_net, alpha, sigma, bool(clamp))
        if on_step is not None:
            on_step(grid.numel() - 1)
        return out

    # -- whole generation in C++ (what csrc/example/generate.cpp does) -------------------------
    def generate(self, src, src_mask, lengths=None, noise=None, steps: int | None = None, clamp: bool = False,
                 seed: int = 0):
        """(ids list per sentence, latents) with one candidate per sentence: top-1 predicted length
        (or `lengths`), noise from a CPU generator seeded with `seed` unless `noise` is given. steps
        (default: the export's) must be one the export stored a table for; the spacing and time shift
        are the export's (manifest "spacing", "time_shift")."""
        steps = int(self.manifest["default_steps"]) if steps is None else int(steps)
        B = src.shape[0]
        lens = torch.full((B,), -1, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long()
        ids, lens, _, latents, _ = self.sampler.generate(src, src_mask, lens.to(src.device), noise, steps,
                                                         bool(clamp), int(seed))
        ids, lens = ids.tolist(), lens.tolist()
        return [row[:n] for row, n in zip(ids, lens)], latents

    def time_decoder(self, enc, x, tgt_mask, iters: int = 20) -> float:
        """Seconds per bare decoder call, timed inside C++ (the benchmark's compute baseline)."""
        return self.sampler.time_decoder(_state(enc), enc.src_mask, x, tgt_mask, int(iters))


def _state(enc) -> list:
    """EncoderState -> the C++ state list [memory, lengths, k_0, v_0, ...]; the loop does not read the
    lengths, so an empty (B, 0) placeholder stands in for them."""
    state = [enc.out, enc.out.new_empty(enc.out.shape[0], 0)]
    for k, v in enc.cross_kv:
        state += [k, v]
    return state
