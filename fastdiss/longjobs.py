"""Long generations say what they will do: a bound on --steps, an up-front time estimate, a progress bar.

`echo x | fastdiss generate --steps 100000` used to start silently for what takes hours on a CPU.
Now:
  * --steps above MAX_STEPS (10000) is refused (exit 2): a few-step model needs 1-16 steps, and the
    many-step baseline of the benchmarks is 1000;
  * --steps above WARN_STEPS (1000) warns, with the estimated time;
  * a job that may be long (at least LONG_CALLS denoiser calls: steps x batches, summed over the
    step counts of `evaluate`) is timed on probes first: 3 steps of the longest input alone and of a
    batch of the longest inputs, with the job's settings. The estimate (per batch: overhead + steps x
    step time, each linear in the batch's sentences between the two probes) is printed
    when it reaches BAR_SECONDS, and then a tqdm bar counts sentences as their steps finish. It is
    rough (a busy machine changes speed; expect it within about a factor of 2).
  * a short job (the usual case) runs no probe and shows no bar: its extra cost is one comparison.
Autoregressive models have no step count: their bar counts finished batches and appears only when the
job has run BAR_DELAY_S seconds (tqdm's own remaining-time estimate is then the estimate).
--quiet turns the estimate and the bar off; the warning above WARN_STEPS stays (without the estimate).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from fastdiss.argtypes import MAX_STEPS   # the bound lives with the option parsers; the warning below names it

WARN_STEPS = 1_000
LONG_CALLS = 256
BAR_SECONDS = 10.0
BAR_DELAY_S = 5.0
PROBE_STEPS = 3


def fmt_seconds(s: float) -> str:
    """12 s, 4 min 10 s, 2 h 05 min."""
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def batches_of(sources: list, batch_size: int) -> list[tuple[int, int]]:
    """(sentences, longest length) of each batch, as Sampler.translate forms them (sorted by length)."""
    lens = sorted(len(s) for s in sources)
    return [(len(lens[i:i + batch_size]), lens[i:i + batch_size][-1]) for i in range(0, len(lens), batch_size)]


@dataclass
class Point:
    """One timed probe: a batch of `rows` sentences."""
    rows: int
    step_s: float       # one denoising step
    overhead_s: float   # encoder, lengths, rounding and selection


@dataclass
class CostModel:
    """Seconds of a batch: overhead + steps x step time, each linear in the batch's sentences between
    two probes on the longest inputs (one sentence alone, and a full batch): the fixed part is the
    per-call cost that small batches pay too, the slope the cost per sentence. Input length is left
    out: the decoder's cost follows the predicted target lengths, unknown before the job runs, so the
    longest inputs make the estimate err on the long side."""
    small: Point
    large: Point

    def _at(self, rows: int, field: str) -> float:
        a, b = getattr(self.small, field), getattr(self.large, field)
        if self.large.rows == self.small.rows:
            return b * rows / self.large.rows
        slope = max((b - a) / (self.large.rows - self.small.rows), 0.0)   # noise must not make it negative
        return max(a + slope * (rows - self.small.rows), 0.0)

    def seconds(self, batches: list[tuple[int, int]], steps: int) -> float:
        return sum(self._at(n, "overhead_s") + steps * self._at(n, "step_s") for n, _ in batches)


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def _time_batch(sampler, seqs: list, device, gen_kwargs: dict) -> Point:
    """Time PROBE_STEPS steps of one batch (the first step, which warms up, is left out of the step time)."""
    from fastdiss.sampling import pad_batch
    src, mask = pad_batch(seqs, sampler.model.pad_id, device)
    marks = []

    def on_step(sentences, steps):
        _sync(device)
        marks.append(time.perf_counter())
    before = sampler.on_step
    sampler.on_step = on_step
    try:
        _sync(device)
        t0 = time.perf_counter()
        sampler.generate(src, mask, PROBE_STEPS, **gen_kwargs)
        _sync(device)
        total = time.perf_counter() - t0
    finally:
        sampler.on_step = before
    if len(marks) >= 3:   # the Python loop: one mark per step
        step_s = (marks[-1] - marks[0]) / (len(marks) - 1)
    else:                 # an engine that runs every step in one call
        step_s = total / (PROBE_STEPS + 1)
    return Point(rows=len(seqs), step_s=max(step_s, 1e-9),
                 overhead_s=max(total - PROBE_STEPS * step_s, 0.0))


def probe(sampler, sources: list, batch_size: int, device, **gen_kwargs) -> CostModel:
    """The cost model of a job: PROBE_STEPS steps of the longest input alone (twice: the first call
    warms up) and of a batch of the longest inputs."""
    ordered = sorted(sources, key=len)
    _time_batch(sampler, ordered[-1:], device, gen_kwargs)   # first calls allocate and initialise
    small = _time_batch(sampler, ordered[-1:], device, gen_kwargs)
    rows = min(batch_size, len(ordered))
    large = _time_batch(sampler, ordered[-rows:], device, gen_kwargs) if rows > 1 else small
    return CostModel(small=small, large=large)


class JobProgress:
    """The bar of one generation job: fed by Sampler.on_step (diffusion) or per batch (AR)."""

    def __init__(self, desc: str, total: int, steps: int | None, show: bool, delay: float = 0.0):
        self.steps, self.bar = steps, None
        if show:
            from tqdm.auto import tqdm
            tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
            self.bar = tqdm(total=total, desc=desc, unit="sent", file=sys.stderr, dynamic_ncols=True, delay=delay,
                            mininterval=0.5 if tty else 30.0,   # a log file gets a line every 30 s, not 10 a second
                            bar_format="{l_bar}{bar}| {n:.0f}/{total} sentences [{elapsed}<{remaining}]")

    def _advance(self, sentences: float) -> None:
        self.bar.update(min(sentences, self.bar.total - self.bar.n))   # float steps must not pass the total

    def on_step(self, sentences: int, steps: int = 1) -> None:
        if self.bar is not None:
            self._advance(sentences * steps / self.steps)

    def on_batch(self, sentences: int) -> None:
        if self.bar is not None:
            self._advance(sentences)

    def close(self, done: bool = True) -> None:
        if self.bar is not None:
            if done and self.steps is not None:   # float steps may sum to a hair under the total
                self.bar.n = self.bar.total
                self.bar.refresh()
            self.bar.close()
            self.bar = None


@dataclass
class Plan:
    """What a generation command announced: the estimate (None when it did not probe) and whether
    its jobs show a bar."""
    estimate_s: float | None
    show_bar: bool
    ar: bool = False

    def job(self, desc: str, total: int, steps: int | None) -> JobProgress:
        if self.ar:
            return JobProgress(desc, total, None, show=self.show_bar, delay=BAR_DELAY_S)
        return JobProgress(desc, total, steps, show=self.show_bar)


def plan(ck, sources: list, step_counts: list[int] | None, *, batch_size: int, device, quiet: bool, command: str,
         make_sampler=None, gen_kwargs: dict | None = None, warn=None) -> Plan:
    """Decide, before a generation command runs, whether it is long: warn above WARN_STEPS, probe and
    print the estimate when it may be long, and say whether to show a bar. step_counts: the diffusion
    step counts the command will run (one per `evaluate` row); None for an AR model."""
    warn = warn or (lambda msg: print(f"fastdiss: warning: {msg}", file=sys.stderr, flush=True))
    if ck.kind != "diffusion" or step_counts is None:
        return Plan(estimate_s=None, show_bar=not quiet, ar=True)
    batches = batches_of(sources, batch_size)
    calls = sum(step_counts) * len(batches)
    many = max(step_counts)
    estimate = None
    if not quiet and (many > WARN_STEPS or calls >= LONG_CALLS):
        cost = probe(make_sampler(), sources, batch_size, device, **(gen_kwargs or {}))
        estimate = sum(cost.seconds(batches, k) for k in step_counts)
    when = f"; estimated time {fmt_seconds(estimate)}" if estimate is not None else ""
    if many > WARN_STEPS:
        warn(f"--steps {many} is above {WARN_STEPS}: few-step models need 1-16 steps and more rarely help "
             f"(the limit is {MAX_STEPS}){when}")
    elif estimate is not None and estimate >= BAR_SECONDS:
        steps_txt = ",".join(map(str, step_counts))
        print(f"fastdiss {command}: estimated time {fmt_seconds(estimate)} for {len(sources)} sentence(s) x "
              f"{steps_txt} step(s) on {device} ({len(batches)} batch(es) of up to {batch_size}; --quiet hides "
              f"this and the progress bar)", file=sys.stderr, flush=True)
    return Plan(estimate_s=estimate, show_bar=estimate is not None and estimate >= BAR_SECONDS)

