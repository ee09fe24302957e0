"""engine="cuda-graph": the whole K-step loop captured as one CUDA graph per shape bucket, then replayed.

At 1-16 steps of a small denoiser the GPU waits on the host: every step launches a few hundred
kernels from Python. A CUDA graph records those launches once and replays them with one call, so
a K-step generation costs one replay plus the input copies.

How:
- Shapes are bucketed: batch up to the next of BATCH_BUCKETS, target and source length up to the
  next multiple of `length_multiple`. Padding is masked (tgt_mask / src_mask True), so real rows
  and tokens see exactly what they would see unpadded; outputs are sliced back.
- One graph per (batch, target length, source length, steps, clamp, time_shift, noise mode, dtype)
  bucket, kept in an LRU cache of `max_graphs`. Each graph owns static buffers: the encoder state,
  both masks, the time grid (so one graph serves every spacing with the same K) and the initial x.
- The captured body is the eager loop itself (fastdiss.python_engine.PythonEngine.denoise) run on
  the static buffers, so replay and fallback compute the same steps.
- Capture follows the PyTorch recipe: warm-up runs on a side stream (Triton compiles and autotunes
  there, outside the capture), then torch.cuda.graph. The RNG state is restored after warm-up, so
  capturing does not shift the random stream.
- Noise: `denoise(enc, x=None, ...)` draws x_{t_0} = noise_factor * randn inside the graph from the
  default CUDA generator. That is graph-safe: the graph reads the generator's seed and offset at
  every replay, so each replay draws new noise and a replay after torch.manual_seed(s) draws what
  the eager code draws after torch.manual_seed(s). With a tensor x (what Sampler passes, from its
  seeded generator) the noise is copied into the static buffer instead.
- Fallback: when capture fails (an op that syncs with the host, an unsupported kernel, ...) the
  engine warns once with the reason and runs the eager Python loop for that bucket.
- Opt-out: FASTDISS_NO_CUDA_GRAPHS=1 makes the engine run the eager loop everywhere.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from fastdiss.model import EncoderState
from fastdiss.python_engine import PythonEngine

ENV_OPT_OUT = "FASTDISS_NO_CUDA_GRAPHS"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_batch(n: int, buckets=BATCH_BUCKETS) -> int:
    """Smallest bucket >= n; beyond the largest, the next multiple of it."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"batch size must be a positive integer, got {n!r}")
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(buckets):
        raise ValueError(f"batch buckets must be increasing positive integers, got {buckets!r}")
    for b in buckets:
        if b >= n:
            return b
    step = buckets[-1]
    return -(-n // step) * step


def bucket_length(n: int, multiple: int = 8, cap: int | None = None) -> int:
    """n rounded up to a multiple of `multiple`, but never above `cap` (the model's max_len) when n <= cap."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"length must be a positive integer, got {n!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"length_multiple must be a positive integer, got {multiple!r}")
    b = -(-n // multiple) * multiple
    return min(b, cap) if cap is not None and n <= cap else b


def graphs_disabled_reason(device: torch.device | None = None) -> str | None:
    """Why graphs cannot be used here (None when they can)."""
    if os.environ.get(ENV_OPT_OUT, "0").strip() not in ("", "0"):
        return f"{ENV_OPT_OUT}={os.environ[ENV_OPT_OUT]} is set"
    if device is not None and torch.device(device).type != "cuda":
        return f"the inputs are on {torch.device(device)}; CUDA graphs need CUDA tensors"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


@dataclass(frozen=True)
class BucketKey:
    batch: int
    tgt_len: int
    src_len: int
    steps: int
    clamp: bool
    time_shift: float
    fresh_noise: bool     # True: x_{t_0} drawn inside the graph; False: copied from the caller's x
    dtype: torch.dtype
    device: str


class _Buffers:
    """Static inputs of one bucket, with the copy-in (padding masked) that precedes every replay."""

    def __init__(self, key: BucketKey, enc, d_latent: int):
        dev, B, L, Ls = torch.device(key.device), key.batch, key.tgt_len, key.src_len
        self.grid = torch.zeros(key.steps + 1, dtype=torch.float32, device=dev)
        self.tgt_mask = torch.ones(B, L, dtype=torch.bool, device=dev)
        self.src_mask = torch.ones(B, Ls, dtype=torch.bool, device=dev)
        self.out = enc.out.new_zeros(B, Ls, enc.out.shape[2])
        self.kv = [t.new_zeros(B, t.shape[1], Ls, t.shape[3]) for pair in enc.cross_kv for t in pair]
        self.x = None if key.fresh_noise else torch.zeros(B, L, d_latent, dtype=key.dtype, device=dev)

    def encoder_state(self):
        pairs = tuple((self.kv[2 * i], self.kv[2 * i + 1]) for i in range(len(self.kv) // 2))
        return EncoderState(self.out, self.src_mask, pairs)

    def load(self, enc, x, tgt_mask, grid):
        B, L = tgt_mask.shape
        Ls = enc.src_mask.shape[1]
        self.grid.copy_(grid)
        self.tgt_mask.fill_(True)
        self.tgt_mask[:B, :L].copy_(tgt_mask)
        self.src_mask.fill_(True)
        self.src_mask[:B, :Ls].copy_(enc.src_mask)
        self.out.zero_()
        self.out[:B, :Ls].copy_(enc.out)
        for buf, t in zip(self.kv, (t for pair in enc.cross_kv for t in pair)):
            buf.zero_()
            buf[:B, :, :Ls].copy_(t)
        if self.x is not None:
            self.x.zero_()
            self.x[:B, :L].copy_(x)


class CUDAGraphEngine:
    """Sampler engine replaying one captured CUDA graph per shape bucket (see the module docstring)."""

    name = "cuda-graph"

    def __init__(self, model, diffusion_cfg, *, batch_buckets=BATCH_BUCKETS, length_multiple: int = 8,
                 max_graphs: int = 16, warmup: int = 2):
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"max_graphs and warmup must be >= 1, got {max_graphs} and {warmup}")
        bucket_batch(1, batch_buckets)  # validates the buckets
        self.model = model
        self.eager = PythonEngine(model, diffusion_cfg)
        self.batch_buckets = tuple(batch_buckets)
        self.length_multiple = length_multiple
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: OrderedDict = OrderedDict()   # BucketKey -> (graph, buffers, x_out, sc_out)
        self._failed: dict = {}                      # BucketKey -> reason
        self._warned = False
        self.fallback_reason: str | None = None
        self.stats = {"captures": 0, "replays": 0, "eager": 0}

    # -- engine interface -------------------------------------------------------------------------
    def encode(self, src, src_mask):
        return self.model.encode(src, src_mask)

    @torch.no_grad()
    def denoise(self, enc, x, tgt_mask, grid, *, clamp: bool = False, time_shift: float = 0.0, on_step=None):
        """K = len(grid) - 1 steps by graph replay -> (x_{t_K}, last x0). x None: noise drawn in the graph."""
        reason = graphs_disabled_reason(enc.out.device)
        key = None
        if reason is None:
            key = self.bucket_key(enc, x, tgt_mask, grid, clamp, time_shift)
            reason = self._failed.get(key)
        if reason is not None:
            return self._eager(reason, enc, x, tgt_mask, grid, clamp, time_shift, on_step)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key, enc, x, tgt_mask, grid)
            except Exception as e:  # capture is best effort: any failure means "run eagerly"
                torch.cuda.synchronize()
                self._failed[key] = f"capture failed ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
                return self._eager(self._failed[key], enc, x, tgt_mask, grid, clamp, time_shift, on_step)
        self._graphs.move_to_end(key)
        graph, bufs, x_out, sc_out = entry
        bufs.load(enc, x, tgt_mask, grid)
        graph.replay()
        self.stats["replays"] += 1
        if on_step is not None:
            on_step(key.steps)
        B, L = tgt_mask.shape
        return x_out[:B, :L].clone(), sc_out[:B, :L].clone()

    # -- the same bucketed computation without a graph (tests: replay == eager for one RNG state) ----
    @torch.no_grad()
    def run_bucketed_eager(self, enc, x, tgt_mask, grid, *, clamp: bool = False, time_shift: float = 0.0):
        key = self.bucket_key(enc, x, tgt_mask, grid, clamp, time_shift)
        bufs = _Buffers(key, enc, self.model.cfg.d_latent)
        bufs.load(enc, x, tgt_mask, grid)
        x_out, sc_out = self._body(bufs, key)
        B, L = tgt_mask.shape
        return x_out[:B, :L].clone(), sc_out[:B, :L].clone()

    def bucket_key(self, enc, x, tgt_mask, grid, clamp, time_shift) -> BucketKey:
        B, L = tgt_mask.shape
        if x is not None and tuple(x.shape[:2]) != (B, L):
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, L, d) = ({B}, {L}, d) to match tgt_mask")
        max_len = self.model.cfg.max_len
        return BucketKey(batch=bucket_batch(int(B), self.batch_buckets),
                         tgt_len=bucket_length(int(L), self.length_multiple, max_len),
                         src_len=bucket_length(int(enc.src_mask.shape[1]), self.length_multiple, max_len),
                         steps=int(grid.numel()) - 1, clamp=bool(clamp), time_shift=float(time_shift),
                         fresh_noise=x is None, dtype=enc.out.dtype, device=str(enc.out.device))

    def cache_info(self) -> dict:
        return {"graphs": len(self._graphs), "failed": len(self._failed), **self.stats,
                "fallback_reason": self.fallback_reason}

    def clear(self) -> None:
        for graph, *_ in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        self._failed.clear()

    # -- internals ------------------------------------------------------------------------------
    def _body(self, bufs: _Buffers, key: BucketKey):
        """The eager loop on the static buffers (bufs.x None: it draws the noise, in the graph)."""
        return self.eager.denoise(bufs.encoder_state(), bufs.x, bufs.tgt_mask, bufs.grid, clamp=key.clamp,
                                  time_shift=key.time_shift)

    def _capture(self, key: BucketKey, enc, x, tgt_mask, grid):
        device = torch.device(key.device)
        bufs = _Buffers(key, enc, self.model.cfg.d_latent)
        bufs.load(enc, x, tgt_mask, grid)
        rng = torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # compiles / autotunes the Triton kernels outside the capture
                self._body(bufs, key)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        torch.cuda.set_rng_state(rng, device)  # warm-up draws must not shift the caller's random stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_out, sc_out = self._body(bufs, key)
        self.stats["captures"] += 1
        self._graphs[key] = (graph, bufs, x_out, sc_out)
        while len(self._graphs) > self.max_graphs:
            _, (old, *_rest) = self._graphs.popitem(last=False)
            old.reset()
        return self._graphs[key]

    def _eager(self, reason, enc, x, tgt_mask, grid, clamp, time_shift, on_step):
        if not self._warned and not reason.startswith(ENV_OPT_OUT):  # the opt-out is asked for: no warning
            self._warned = True
            warnings.warn(f"CUDA graphs not used ({reason}); running the eager Python loop instead",
                          RuntimeWarning, stacklevel=3)
        self.fallback_reason = reason
        self.stats["eager"] += 1
        return self.eager.denoise(enc, x, tgt_mask, grid, clamp=clamp, time_shift=time_shift, on_step=on_step)
