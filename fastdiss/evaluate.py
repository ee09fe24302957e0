"""Generation and scoring for every evaluation: `fastdiss generate` / `evaluate`, the demo, Trainer
validation and the benchmarks all generate and score through here, so their numbers are comparable.

Diffusion models generate with fastdiss.sampling.Sampler (their output length is predicted, capped by
sample.max_len). Autoregressive models decode greedily or with beam search in length-sorted batches,
each output at most ar_length_cap(source) tokens: min(max_len, 2 x source tokens + 10). The cap is
per sentence (an output never depends on its batch-mates); it only cuts runaway outputs of
undertrained models, which would otherwise decode to max_len and dominate the evaluation time.
Scores are corpus SacreBLEU and chrF with their signatures (fastdiss.metrics).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

AR_LENGTH_FACTOR, AR_LENGTH_MARGIN = 2, 10


def ar_length_cap(max_len: int, source_len: int) -> int:
    """Most tokens an autoregressive output may have for a source of source_len tokens."""
    return min(int(max_len), AR_LENGTH_FACTOR * source_len + AR_LENGTH_MARGIN)


@dataclass
class Generation:
    ids: list                      # output ids per source, in input order
    single_ids: list               # diffusion: the first candidate (top-1 length, first draw); AR: ids
    seconds: float                 # wall time of the generation (CUDA synchronised)
    calls_per_sentence: int | None  # diffusion: denoiser calls per sentence; AR: None


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def generate(model, kind: str, sources: list, *, cfg=None, device="cpu", steps: int | None = None, beam: int = 1,
             length_beam: int | None = None, noise_draws: int | None = None, select: str | None = None,
             seed: int | None = None, batch_size: int = 64, progress=None) -> Generation:
    """Outputs for encoded sources. kind 'diffusion': `steps` sampling steps with cfg.sample /
    cfg.diffusion (None arguments: the SampleConfig's); kind 'ar': beam search (1 = greedy).
    progress: a fastdiss.longjobs.JobProgress, closed at the end."""
    model = model.to(device).eval()
    _sync(device)
    start = time.perf_counter()
    try:
        if kind == "diffusion":
            from fastdiss.sampling import Sampler
            kwargs = {k: v for k, v in (("length_beam", length_beam), ("noise_draws", noise_draws),
                                        ("select", select), ("seed", seed)) if v is not None}
            sampler = Sampler(model, cfg.sample, cfg.diffusion)
            if progress is not None:
                sampler.on_step = progress.on_step
            res = sampler.translate(sources, steps, batch_size=batch_size, device=device, **kwargs)
            ids, single, calls = res.ids, res.single_ids, res.calls_per_sentence
        else:
            ids = _ar_generate(model, sources, beam, batch_size, device, progress)
            single, calls = ids, None
    except BaseException:
        if progress is not None:
            progress.close(done=False)
        raise
    if progress is not None:
        progress.close()
    _sync(device)
    return Generation(ids=ids, single_ids=single, seconds=time.perf_counter() - start, calls_per_sentence=calls)


@torch.no_grad()
def _ar_generate(model, sources: list, beam: int, batch_size: int, device, progress) -> list:
    from fastdiss.sampling import pad_batch
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    ids = [None] * len(sources)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        src, mask = pad_batch([sources[i] for i in idx], model.pad_id, device)
        cap = ar_length_cap(model.max_len, int(src.shape[1]))
        for i, out in zip(idx, model.generate(src, mask, beam=beam, max_len=cap)):
            ids[i] = list(out[:ar_length_cap(model.max_len, len(sources[i]))])
        if progress is not None:
            progress.on_batch(len(idx))
    return ids


def score(hyps: list[str], refs: list[str]) -> dict:
    """Corpus SacreBLEU and chrF of detokenized outputs against one reference each."""
    from fastdiss.metrics import bleu, chrf
    b, b_sig = bleu(hyps, refs)
    c, c_sig = chrf(hyps, refs)
    return {"bleu": b, "chrf": c, "bleu_signature": b_sig, "chrf_signature": c_sig}


def evaluate_rows(ck, sources: list, refs: list[str], settings: list[int], *, device, batch_size: int = 64,
                  length_beam=None, noise_draws=None, select=None, seed=None, plan=None) -> tuple[list, dict]:
    """One row per setting of a loaded checkpoint (diffusion: steps; AR: beam size): BLEU, chrF,
    latency, cost and the outputs. plan: a fastdiss.longjobs.Plan whose progress bar each row shows."""
    key = "steps" if ck.kind == "diffusion" else "beam"
    run = dict(cfg=ck.cfg, device=device, batch_size=batch_size)
    # Warm-up (first calls allocate, pick kernels, fill caches): keeps it out of the first row's latency.
    generate(ck.model, ck.kind, sources[:8], steps=1, length_beam=1, noise_draws=1, **run)
    rows, sigs = [], {}
    for value in settings:
        progress = plan.job(f"{key}={value}", len(sources), value) if plan is not None else None
        setting = {"steps": value, "length_beam": length_beam, "noise_draws": noise_draws, "select": select,
                   "seed": seed} if ck.kind == "diffusion" else {"beam": value}
        res = generate(ck.model, ck.kind, sources, progress=progress, **setting, **run)
        hyps = [ck.tokenizer.decode(x) for x in res.ids]
        scores = score(hyps, refs)
        sigs = {"bleu": scores["bleu_signature"], "chrf": scores["chrf_signature"]}
        row = {key: value, "bleu": scores["bleu"], "chrf": scores["chrf"],
               "latency_ms_per_sentence": 1000.0 * res.seconds / len(refs),
               "calls_per_sentence": res.calls_per_sentence, "hypotheses": hyps}
        if res.single_ids is not res.ids:
            row["bleu_single"] = score([ck.tokenizer.decode(x) for x in res.single_ids], refs)["bleu"]
        rows.append(row)
    return rows, sigs


def evenly_spaced(n_total: int, n: int) -> list[int]:
    """n indices spread evenly over range(n_total) (every part of a split, not just its start), always
    the same ones; all of them if n <= 0 or n >= n_total."""
    if n <= 0 or n >= n_total:
        return list(range(n_total))
    return [int(i * n_total / n) for i in range(n)]
