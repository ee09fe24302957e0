"""engine="cpp": the sampling loop in C++ (csrc/sampler), driven from Python.

The Sampler keeps everything around the loop (length prediction, candidates, noise from its seeded
generator, selection); this engine replaces the two parts that run the network: `encode` (the
AOTInductor encoder, once per batch) and `denoise` (all K steps in one C++ call, no Python per
step). Given the same initial noise it reproduces the Python loop: same schedule values, same
fused step op, same self-conditioning hand-over.

The C++ class is torch.classes.fastdiss.AOTISampler, part of fastdiss._C. With an older build
that lacks it, FASTDISS_JIT_SAMPLER=1 compiles csrc/sampler on first use (about a minute).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from fastdiss import _ext
from fastdiss.export import load_manifest, weights_fingerprint
from fastdiss.schedule import alpha_sigma

_SAMPLER_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "sampler"
_jit_loaded = False


def sampler_class_available() -> bool:
    try:
        torch.classes.fastdiss.AOTISampler  # noqa: B018  (raises when not registered)
    except (RuntimeError, AttributeError):
        return False
    return True


def _jit_build() -> None:
    """Compile csrc/sampler/*.cpp into a side library (the ops themselves still come from fastdiss._C)."""
    global _jit_loaded
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in _SAMPLER_SOURCES.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"no C++ sampler sources under {_SAMPLER_SOURCES} (is this a source checkout?)")
    warnings.warn("fastdiss._C has no AOTISampler; compiling csrc/sampler now (FASTDISS_JIT_SAMPLER=1)",
                  RuntimeWarning, stacklevel=3)
    load(name="fastdiss_sampler_jit", sources=sources, extra_cflags=["-O2"], is_python_module=False,
         verbose=False)
    _jit_loaded = True


def require_sampler_class() -> None:
    """Make torch.classes.fastdiss.AOTISampler available, or raise saying how."""
    _ext.require("the C++ sampler (engine='cpp')")
    if sampler_class_available():
        return
    if os.environ.get("FASTDISS_JIT_SAMPLER", "0") == "1" and not _jit_loaded:
        _jit_build()
        if sampler_class_available():
            return
    raise RuntimeError("fastdiss._C was built without the C++ sampler (torch.classes.fastdiss.AOTISampler); "
                       "rebuild with `pip install --no-build-isolation -e .`, or set FASTDISS_JIT_SAMPLER=1 to "
                       "compile it on first use")


def schedule_values(grid: torch.Tensor, schedule: str, time_shift: float):
    """(t_net (K,), alpha (K+1,), sigma (K+1,)) float32 for a time grid, computed per grid point with the
    same 0-dim ops as sampling.denoise_step, so the C++ loop sees the Python loop's numbers bit for bit."""
    from fastdiss.sampling import network_time

    grid = grid.detach().to("cpu", torch.float32)
    t_net = torch.stack([network_time(grid[k], time_shift) for k in range(grid.numel() - 1)])
    pairs = [alpha_sigma(grid[k], schedule) for k in range(grid.numel())]
    return (t_net.float(), torch.stack([a for a, _ in pairs]).float(), torch.stack([s for _, s in pairs]).float())


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
        from fastdiss.model import EncoderState
        if not isinstance(src, torch.Tensor) or not isinstance(src_mask, torch.Tensor):
            raise TypeError(f"src and src_mask must be tensors, got {type(src).__name__} and "
                            f"{type(src_mask).__name__}")
        out = self.sampler.encode(src, src_mask)
        kv = tuple((out[2 + 2 * i], out[3 + 2 * i]) for i in range(self.n_dec))
        return EncoderState(out[0], src_mask, kv)

    def denoise(self, enc, x, tgt_mask, grid, *, clamp: bool = False, time_shift: float = 0.0):
        """All K = len(grid) - 1 steps from x = x_{t_0} in one C++ call -> (x_{t_K}, last x0 (clamped))."""
        if x is None:
            x = self.noise_factor * torch.randn(enc.out.shape[0], tgt_mask.shape[1], int(self.manifest["d_latent"]),
                                                device=enc.out.device, dtype=enc.out.dtype)
        t_net, alpha, sigma = schedule_values(grid, self.schedule, time_shift)
        return self.sampler.denoise(_state(enc), enc.src_mask, x, tgt_mask, t_net, alpha, sigma, bool(clamp))

    # -- whole generation in C++ (what csrc/example/generate.cpp does) -------------------------
    def generate(self, src, src_mask, lengths=None, noise=None, steps: int = 4, spacing: str | None = None,
                 time_shift: float | None = None, clamp: bool = False, seed: int = 0):
        """(ids list per sentence, latents) with one candidate per sentence: top-1 predicted length
        (or `lengths`), noise from a CPU generator seeded with `seed` unless `noise` is given. spacing and
        time_shift default to the exported model's SampleConfig (as the Python sampler's do)."""
        spacing = self.manifest.get("default_spacing", "uniform") if spacing is None else spacing
        time_shift = float(self.manifest.get("default_time_shift", 0.0)) if time_shift is None else time_shift
        B = src.shape[0]
        lens = torch.full((B,), -1, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long()
        ids, lens, _, latents, _ = self.sampler.generate(src, src_mask, lens.to(src.device), noise, int(steps),
                                                         spacing, float(time_shift), bool(clamp), int(seed))
        ids, lens = ids.tolist(), lens.tolist()
        return [row[:n] for row, n in zip(ids, lens)], latents

    def time_decoder(self, enc, x, tgt_mask, iters: int = 20) -> float:
        """Seconds per bare decoder call, timed inside C++ (the benchmark's compute baseline)."""
        return self.sampler.time_decoder(_state(enc), enc.src_mask, x, tgt_mask, int(iters))


def _state(enc) -> list:
    """EncoderState -> the C++ state list [memory, length_logits, k_0, v_0, ...]; the loop does not read
    the length logits, so an empty (B, 0) placeholder stands in for them."""
    state = [enc.out, enc.out.new_empty(enc.out.shape[0], 0)]
    for k, v in enc.cross_kv:
        state += [k, v]
    return state
