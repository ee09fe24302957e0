"""Memory limits of generation: how many sentences fit at once, and running a batch in chunks.

A generation batch holds, per sentence, C = length_beam x noise_draws candidates, each with its
latents, a copy of the encoder state (cross-attention K/V of every decoder layer) and, at the end,
(target length x vocabulary) fp32 log-probabilities: for 4096 sentences x 64 tokens and an 8k
vocabulary, 8 GiB per candidate for those alone. Sampler.generate therefore asks this module how
many sentences fit in the memory budget and, when the batch is larger, runs it in chunks of
sentences (encoder, K steps and rounding per chunk) with the noise drawn once for the whole batch,
so the outputs are those of one big batch (the same ids; floats may differ in the last bit where
a matmul blocks differently for another batch size). A chunk that still runs out of CUDA memory
(the estimate is a model, not a measurement) is halved and rerun. When not even one sentence fits, or splitting
is switched off, generation is refused with a message that says what fits.

The budget: `memory_budget_mb` given to the Sampler, else the environment variable
FASTDISS_GEN_MEMORY_BUDGET_MB, else (CUDA) 90% of the free device memory plus what PyTorch's caching
allocator holds unused, else (CPU) no limit.
"""
from __future__ import annotations

import math
import os

import torch

ENV_BUDGET = "FASTDISS_GEN_MEMORY_BUDGET_MB"
CUDA_FREE_FRACTION = 0.9     # leave room for the allocator's rounding and other processes
SAFETY = 1.25                # the estimates count the large tensors only
MiB, GiB = 1 << 20, 1 << 30


class GenerationMemoryError(MemoryError):
    """A generation batch that cannot run in the memory available; the message says what fits."""


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / MiB:.2f} MiB"


def _positive(x: float) -> bool:
    return x > 0 and math.isfinite(x)


def memory_budget(device, budget_mb: float | None = None) -> tuple[int | None, str]:
    """(bytes generation may use on `device` or None for no limit, where that number comes from)."""
    if budget_mb is not None:
        if isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)) or not _positive(budget_mb):
            raise ValueError(f"memory_budget_mb must be a positive number of MiB or None, got {budget_mb!r}")
        return int(budget_mb * MiB), "allowed by memory_budget_mb"
    text = os.environ.get(ENV_BUDGET, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{ENV_BUDGET} must be a number of MiB, got {text!r}") from None
        if not _positive(value):
            raise ValueError(f"{ENV_BUDGET} must be a positive number of MiB, got {text!r}")
        return int(value * MiB), f"allowed by {ENV_BUDGET}"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(CUDA_FREE_FRACTION * (free + cached)), f"free on {device}"
    return None, "no limit"


def encoder_bytes(cfg, src_len: int, elem: int) -> int:
    """Peak bytes per sentence while encoding and predicting lengths: one layer's activations (the
    attention scores counted in fp32, as the PyTorch path holds them) plus the EncoderState kept."""
    d, L = cfg.d_model, src_len
    state = (1 + 2 * cfg.n_dec) * L * d * elem
    layer = (8 * d + 2 * cfg.d_ff) * L * elem + 3 * cfg.n_heads * L * L * 4
    return int(SAFETY * (state + layer + 4 * (cfg.max_len + 1)))


def decoder_bytes(cfg, vocab: int, src_len: int, tgt_len: int, candidates: int, elem: int) -> int:
    """Peak bytes per sentence during the K steps and the rounding, for `candidates` candidates of
    `tgt_len` tokens: the EncoderState (once, plus one copy per candidate), the latents, and the
    larger of one decoder layer's activations and the (tgt_len x vocab) logits + fp32 log-probs."""
    d, de, L, Ls = cfg.d_model, cfg.d_latent, tgt_len, src_len
    state = (1 + candidates) * (1 + 2 * cfg.n_dec) * Ls * d * elem
    latents = 6 * L * de * elem                    # noise, x, sc, x0_hat and the step's temporaries
    layer = (10 * d + 2 * cfg.d_ff) * L * elem + 3 * cfg.n_heads * L * max(L, Ls) * 4
    rounding = L * vocab * (elem + 8)
    return int(SAFETY * (state + candidates * (latents + max(layer, rounding))))


def sentences_per_chunk(n: int, per_sentence: int, budget: int | None, where: str, *, split: bool = True,
                        what: str = "") -> int:
    """How many of `n` sentences to run at once: n when they fit (or there is no budget), else the
    number that fits when `split`; raises GenerationMemoryError when none fits or splitting is off."""
    if budget is None or n * per_sentence <= budget:
        return n
    fit = budget // max(1, per_sentence)
    need = f"~{_gib(n * per_sentence)}"
    if fit < 1:
        raise GenerationMemoryError(
            f"generation needs {_gib(per_sentence)} per sentence ({what}) but only {_gib(budget)} is {where}; "
            f"use fewer candidates (--length-beam, --noise-draws) or shorter inputs (--max-input-len)")
    if not split:
        raise GenerationMemoryError(
            f"a batch of {n} sentences ({what}) needs {need}; {_gib(budget)} is {where}; "
            f"use a batch of at most {fit} sentences (--batch-size {fit})")
    return int(fit)


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(e, oom)


def run_in_chunks(n: int, chunk: int, fn, *, what: str = "") -> list:
    """[fn(start, stop) for consecutive chunks of range(n)]; a chunk that raises CUDA out-of-memory
    is rerun in halves (fn must be a pure function of its range), down to one sentence."""
    out, start = [], 0
    chunk = max(1, int(chunk))
    while start < n:
        stop = min(n, start + chunk)
        try:
            out.append(fn(start, stop))
            start = stop
            continue
        except Exception as e:
            if not _is_oom(e):
                raise
        # out of memory; here the exception and the frames it held are gone, so their tensors are free
        if stop - start == 1:
            raise GenerationMemoryError(f"out of CUDA memory generating a single sentence ({what}); use fewer "
                                        f"candidates (--length-beam, --noise-draws) or shorter inputs "
                                        f"(--max-input-len)")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        chunk = max(1, (stop - start) // 2)
    return out
