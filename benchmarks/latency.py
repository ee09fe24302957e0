"""Generation latency against sampling steps: diffusion (every engine present) and the AR baseline.

    python -m benchmarks.latency --quick            # CPU: tiny preset, caps what is feasible, ~2 minutes
    python -m benchmarks.latency --gpu              # GPU: base preset, bf16 autocast, ~75 s of measuring
    python -m benchmarks.latency --checkpoint runs/x/last.pt --ar-checkpoint runs/y/last.pt

Measures ms per sentence and sentences per second of `Sampler.generate` for K = 1 ... 2000 steps
(the many-step baseline is measured, never extrapolated), and of the AR model's greedy and beam
search, at batch 1 and batch 64, on real test sources. Wall clock with the device synchronised
before and after each call (what a user waits for, launch gaps and host work included), median
and 20/80 percentiles over repeats.

Fair outputs: both models produce the reference target lengths. The diffusion sampler is given
them (`lengths=`, one candidate per sentence); the AR decoder gets max_len = the longest reference
of the batch, and a randomly initialised AR model never stops early, so it decodes exactly that
many steps (a trained one may stop sooner: `output_tokens` records what it did). Latency does not
depend on the weights otherwise, so random initialisation is fine for it (the JSON says which).

Engines: the Python loop always; the C++ loop ("cpp") and CUDA graphs ("cuda-graph", GPU only)
when `fastdiss.sampling.Sampler` takes an `engine` option (names from fastdiss.engines.ENGINES).
The C++ loop runs an AOTInductor export of the model, made once and cached under --work-dir; an
engine that is missing or fails is recorded with its error. Order of measurement, so that a budget
cut loses the least: Python loop at K <= --few-max, AR, other engines at few steps, the many-step
points, the C++ engine last. A point whose predicted time exceeds --max-point-s is skipped with the
prediction recorded; when --budget-s runs out the rest is skipped likewise. The JSON is rewritten
after every point, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import statistics
import time

import torch

from benchmarks import common

DEFAULT_STEPS = (1, 2, 4, 8, 16, 32, 100, 1000, 2000)
ENGINE_GUESSES = ("python", "cpp", "cuda_graph")
PRESETS = {
    # CPU quick run: small model, caps that keep it to about two minutes on two cores
    "quick": dict(preset="tiny", device="cpu", dtype="fp32", budget_s=150.0, max_point_s=15.0, target_point_s=1.0),
    # one H100/H200: the base model, bf16 autocast; stops starting points after ~75 s
    "gpu": dict(preset="base", device="cuda", dtype="auto", budget_s=75.0, max_point_s=25.0, target_point_s=0.5),
}


# ----------------------------------------------------------------------------- inputs and models

def pick_inputs(task: str, tokenizer, max_len: int, batch: int):
    """`batch` test pairs around the median target length (little padding), sources padded.
    Returns (src, src_mask, target lengths (B,), the pairs' token counts)."""
    from fastdiss.data.corpus import load_pairs
    from fastdiss.sampling import pad_batch
    pairs = load_pairs(task, "test")
    src_ids = tokenizer.encode_batch([s for s, _ in pairs])
    tgt_ids = tokenizer.encode_batch([t for _, t in pairs])
    fit = [(s, t) for s, t in zip(src_ids, tgt_ids) if 0 < len(s) <= max_len and 0 < len(t) <= max_len]
    fit.sort(key=lambda st: (len(st[1]), len(st[0])))
    if len(fit) < batch:
        raise ValueError(f"batch {batch}: the {task} test split has only {len(fit)} usable pairs")
    start = max(0, min(len(fit) - batch, len(fit) // 2 - batch // 2))
    chosen = fit[start:start + batch]
    src, mask = pad_batch([s for s, _ in chosen], tokenizer.pad_id)
    lens = torch.tensor([len(t) for _, t in chosen])
    return src, mask, lens, {"src_tokens_mean": statistics.fmean(len(s) for s, _ in chosen),
                             "tgt_tokens_mean": statistics.fmean(len(t) for _, t in chosen),
                             "tgt_tokens_max": max(len(t) for _, t in chosen), "src_len_padded": src.shape[1]}


def load_models(args, device):
    """(diffusion model, its Config, AR model, tokenizer, provenance). Random init unless checkpoints
    are given; the AR model has the diffusion model's ModelConfig (same size and depth)."""
    from fastdiss import checkpoint as ckpt
    from fastdiss.ar import ARTransformer
    from fastdiss.config import preset
    from fastdiss.data.corpus import load_tokenizer
    from fastdiss.model import Denoiser
    info = {}
    if args.checkpoint:
        c = ckpt.load(args.checkpoint, map_location=str(device))
        model, cfg, tok = c.model, c.cfg, c.tokenizer or load_tokenizer(args.task)
        info["diffusion"] = f"checkpoint {args.checkpoint}"
    else:
        cfg, tok = preset(args.preset), load_tokenizer(args.task)
        torch.manual_seed(0)
        model = Denoiser(cfg.model, tok.vocab_size, tok.pad_id)
        info["diffusion"] = f"random init, preset {args.preset}"
    if args.ar_checkpoint:
        c = ckpt.load(args.ar_checkpoint, map_location=str(device))
        ar = c.model
        info["ar"] = f"checkpoint {args.ar_checkpoint}"
    else:
        torch.manual_seed(0)
        ar = ARTransformer(cfg.model, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
        info["ar"] = "random init, same ModelConfig as the diffusion model"
    info["diffusion_params"] = sum(p.numel() for p in model.parameters())
    info["ar_params"] = sum(p.numel() for p in ar.parameters())
    return model.to(device).eval(), cfg, ar.to(device).eval(), tok, info


# ----------------------------------------------------------------------------- engines

def engine_option():
    """Where Sampler takes `engine`: 'init', 'generate' or None (only the Python loop exists)."""
    from fastdiss.sampling import Sampler
    if "engine" in inspect.signature(Sampler.__init__).parameters:
        return "init"
    if "engine" in inspect.signature(Sampler.generate).parameters:
        return "generate"
    return None


def engine_names(device) -> list[str]:
    """fastdiss.engines.ENGINES (or sampling.ENGINES) when present; CUDA-graph engines only on a GPU."""
    names = None
    for module in ("fastdiss.engines", "fastdiss.sampling"):
        try:
            names = getattr(__import__(module, fromlist=["ENGINES"]), "ENGINES", None)
        except ImportError:
            continue
        if names:
            break
    names = list(names or ENGINE_GUESSES)
    if torch.device(device).type != "cuda":
        names = [n for n in names if "graph" not in n.lower()]
    return names


def engine_setup(engine: str, model, cfg, cache_dir, device) -> dict:
    """Options an engine needs before it can run. The C++ loop needs the C++ sampler class (checked
    first: cheap) and the model exported with AOTInductor; the export is cached under cache_dir by
    weights fingerprint and device, and its cost is recorded as setup time, not as latency."""
    if engine != "cpp":
        return {}
    from fastdiss import cpp_engine
    from fastdiss.export import export_denoiser, load_manifest, weights_fingerprint
    cpp_engine.require_sampler_class()
    fp = weights_fingerprint(model)
    out = os.path.join(os.fspath(cache_dir), f"cpp-export-{torch.device(device).type}-{fp[:16]}")
    try:
        if load_manifest(out).get("weights_sha256") == fp:
            return {"export_dir": out}
    except (FileNotFoundError, ValueError):
        pass
    export_denoiser(model, cfg.diffusion, out, cfg.sample, device=device)
    return {"export_dir": out}


def make_generate(model, cfg, engine: str, where: str | None, options: dict):
    """fn(src, mask, steps, lengths) -> GenerationResult for one engine."""
    from fastdiss.sampling import Sampler
    extra = {}
    if where == "init":
        kw = {"engine": engine}
        if options:
            if "engine_options" not in inspect.signature(Sampler.__init__).parameters:
                raise TypeError(f"Sampler takes no engine_options, but engine {engine!r} needs {sorted(options)}")
            kw["engine_options"] = options
        sampler = Sampler(model, cfg.sample, cfg.diffusion, **kw)
    else:
        sampler = Sampler(model, cfg.sample, cfg.diffusion)
        extra = {"engine": engine} if where == "generate" else {}

    def gen(src, mask, steps, lengths):
        return sampler.generate(src, mask, steps, length_beam=1, noise_draws=1, lengths=lengths, seed=0, **extra)
    return gen


# ----------------------------------------------------------------------------- timing

class Clock:
    """Adaptive repeats under a per-point cap and a total budget."""

    def __init__(self, device, budget_s, max_point_s, target_point_s, min_repeats, max_repeats):
        self.device, self.t0 = device, time.perf_counter()
        self.budget_s, self.max_point_s, self.target_point_s = budget_s, max_point_s, target_point_s
        self.min_repeats, self.max_repeats = min_repeats, max_repeats

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def measure(self, fn, est_ms: float | None):
        """(timing dict, None) or (None, reason it was skipped). est_ms: predicted ms per call; None
        = unknown: two probe calls (also the warm-up) measure it first; they are not in the record."""
        probed = est_ms is None
        if probed:  # the first call pays one-off costs (lazy init, compilation): a second one estimates
            for _ in range(2):
                if self.left() <= 0:
                    return None, f"time budget (--budget-s {self.budget_s:g}) used up"
                common.synchronize(self.device)
                t0 = time.perf_counter()
                fn()
                common.synchronize(self.device)
                est_ms = (time.perf_counter() - t0) * 1e3
        warm = 0 if est_ms >= 1000 or (probed and est_ms >= 200) else 1
        need_s = est_ms * (warm + self.min_repeats) / 1e3
        if need_s > self.max_point_s:
            return None, (f"predicted {need_s:.1f} s for {warm} warm-up + {self.min_repeats} timed calls "
                          f"(~{est_ms / 1e3:.2f} s each{', two probe calls made' if probed else ''}) "
                          f"exceeds --max-point-s {self.max_point_s:g}")
        if need_s > self.left():
            return None, f"time budget (--budget-s {self.budget_s:g}) used up: predicted {need_s:.1f} s"
        reps = int(self.target_point_s * 1e3 / max(est_ms, 1e-3))
        reps = max(self.min_repeats, min(self.max_repeats, reps))
        return common.wall_clock(fn, self.device, warmup=warm, repeats=reps), None


def predict_ms(measured: list, k: int) -> float:
    """Time of a K-step call from the measured (steps, ms) points: the last point plus the per-step
    slope of the last two (at least a quarter of the last point's ms per step, against noise)."""
    k1, t1 = measured[-1]
    if len(measured) == 1:
        return t1 * k / k1
    k0, t0 = measured[-2]
    slope = max((t1 - t0) / (k1 - k0), 0.25 * t1 / k1)
    return t1 + (k - k1) * slope


def _row(timing: dict, batch: int) -> dict:
    med = timing["median_ms"]
    return timing | {"ms_per_sentence": med / batch, "sentences_per_s": batch * 1e3 / med}


# ----------------------------------------------------------------------------- the run

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="preset: base model on CUDA, bf16, ~75 s budget")
    p.add_argument("--quick", action="store_true", help="preset: tiny model on CPU, capped, ~2.5 min")
    p.add_argument("--preset", default=None, choices=("tiny", "small", "base", "large"))
    p.add_argument("--checkpoint", help="a trained diffusion checkpoint (default: random init)")
    p.add_argument("--ar-checkpoint", help="a trained AR checkpoint (default: random init, same size)")
    p.add_argument("--task", default="kjv2web", help="test sources and tokenizer")
    p.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    p.add_argument("--engines", nargs="*", default=None, help="default: every engine present")
    p.add_argument("--ar-beam", type=int, default=4)
    p.add_argument("--no-ar", action="store_true")
    p.add_argument("--dtype", default=None, choices=("auto", "fp32", "bf16"), help="auto: bf16 on a GPU with it")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new points after this")
    p.add_argument("--max-point-s", type=float, default=None, help="skip a point predicted to take longer")
    p.add_argument("--target-point-s", type=float, default=None, help="aim for this much timing per point")
    p.add_argument("--few-max", type=int, default=100, help="steps up to this are timed first, for every engine")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-repeats", type=int, default=20)
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--work-dir", default=str(common.REPO_ROOT / "runs" / "bench" / "latency"),
                   help="cache of engine artifacts (the C++ engine's export); not committed")
    p.add_argument("--tag", default=None, help="file latency-<tag>.json (default: the device tag)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.gpu and args.quick:
        p.error("--gpu and --quick are exclusive")
    base = PRESETS["gpu" if args.gpu else "quick" if args.quick else "quick"] | {}
    if not (args.gpu or args.quick):
        base.update(preset="small", device="auto", dtype="auto", budget_s=600.0, max_point_s=60.0, target_point_s=2.0)
    for k in ("preset", "device", "dtype", "budget_s", "max_point_s", "target_point_s"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    amp = None
    if device.type == "cuda" and args.dtype in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        amp = torch.bfloat16
    elif args.dtype == "bf16" and device.type == "cpu":
        amp = torch.bfloat16
    dtype_name = "bf16 autocast" if amp is not None else "fp32"

    model, cfg, ar, tok, provenance = load_models(args, device)
    steps = sorted(set(args.steps))
    where = engine_option()
    engines = args.engines if args.engines is not None else (engine_names(device) if where else ["python"])
    config = {"preset": args.preset, "task": args.task, "steps": steps, "batch_sizes": args.batch_sizes,
              "ar_beam": args.ar_beam, "dtype": dtype_name, "random_init": not (args.checkpoint or args.ar_checkpoint),
              "models": provenance, "budget_s": args.budget_s, "max_point_s": args.max_point_s,
              "target_point_s": args.target_point_s, "min_repeats": args.min_repeats,
              "engine_option": where or "none (Sampler has no engine argument: Python loop only)",
              "use_kernels": cfg.model.use_kernels, "model": cfg.to_dict()["model"]}
    from benchmarks.quality import code_state
    result = {"header": common.run_header("latency", device, config), "code": code_state(), "inputs": {},
              "engines": {},
              "engine_setup_s": {},
              "diffusion": [], "ar": [], "errors": [],
              "notes": ["diffusion: one candidate per sentence, target lengths = the references (given), "
                        "K network calls per sentence; AR: max_len = longest reference of the batch.",
                        "times: wall clock with device synchronisation, median (p20, p80) over repeats."]}
    out_path = common.results_path("latency", args.tag or common.device_tag(device), args.out_dir)
    clock = Clock(device, args.budget_s, args.max_point_s, args.target_point_s, args.min_repeats, args.max_repeats)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext

    inputs = {}
    for b in args.batch_sizes:
        src, mask, lens, meta = pick_inputs(args.task, tok, cfg.model.max_len, b)
        inputs[b] = (src.to(device), mask.to(device), lens.to(device))
        result["inputs"][str(b)] = meta

    def save():
        common.write_json(result, out_path)

    gens: dict = {}       # engine -> generate function (None: unavailable)
    measured: dict = {}   # (engine, batch) -> [(steps, median ms)], for predicting the next point

    def engine_gen(engine):
        """Set an engine up once (C++: the AOTInductor export, cached); None when unavailable."""
        if engine in gens:
            return gens[engine]
        gens[engine] = None
        if engine == "cpp" and clock.left() < 30:
            result["engines"][engine] = "skipped: less than 30 s of the budget left for its export"
            return None
        t_setup = time.perf_counter()
        try:
            options = engine_setup(engine, model, cfg, args.work_dir, device)
            gens[engine] = make_generate(model, cfg, engine, where, options)
        except Exception as e:  # unknown engine name, missing build, export failure ...
            result["engines"][engine] = f"unavailable: {common.error_text(e)}"
            save()
            return None
        result["engines"][engine] = "ok"
        result["engine_setup_s"][engine] = round(time.perf_counter() - t_setup, 2)
        return gens[engine]

    def diffusion_points(engine, ks):
        """Time `engine` at steps ks (increasing) for every batch size."""
        gen = engine_gen(engine)
        if gen is None or not ks:
            return
        for b in args.batch_sizes:
            src, mask, lens = inputs[b]
            done = measured.setdefault((engine, b), [])
            for k in ks:
                def fn(k=k):
                    with torch.no_grad(), autocast():
                        return gen(src, mask, k, lens)
                rec = {"engine": engine, "batch": b, "steps": k, "calls_per_sentence": k}
                try:
                    timing, why = clock.measure(fn, predict_ms(done, k) if done else None)
                except Exception as e:
                    rec["error"] = common.error_text(e)
                    result["errors"].append(f"{engine} batch {b} K={k}: {rec['error']}")
                    result["diffusion"].append(rec)
                    save()
                    if common.is_fatal_cuda_error(e):
                        raise
                    if not done:
                        result["engines"][engine] = f"failed: {rec['error']}"
                        gens[engine] = None
                        return
                    continue
                if timing is None:
                    rec["skipped"] = why
                else:
                    rec.update(_row(timing, b), ms_per_step=timing["median_ms"] / k)
                    done.append((k, timing["median_ms"]))
                result["diffusion"].append(rec)
                print(f"  diffusion {engine:10s} batch {b:3d} K={k:<5d} "
                      + (f"{rec['median_ms']:10.2f} ms  {rec['ms_per_sentence']:9.3f} ms/sent"
                         if "median_ms" in rec else f"skipped: {why}"), flush=True)
                save()

    def ar_decoders():
        for b in args.batch_sizes:
            src, mask, lens = inputs[b]
            max_len = int(lens.max())
            for beam in sorted({1, args.ar_beam}):
                name = "greedy" if beam == 1 else f"beam{beam}"
                rec = {"decoder": name, "beam": beam, "batch": b, "max_len": max_len}
                out = []

                def fn(beam=beam):
                    with torch.no_grad(), autocast():
                        out[:] = ar.generate(src, mask, beam=beam, max_len=max_len)
                try:
                    timing, why = clock.measure(fn, None)
                except Exception as e:
                    rec["error"] = common.error_text(e)
                    result["errors"].append(f"AR {name} batch {b}: {rec['error']}")
                    timing, why = None, None
                if timing is not None:
                    rec.update(_row(timing, b), output_tokens=statistics.fmean(len(o) for o in out))
                elif why:
                    rec["skipped"] = why
                result["ar"].append(rec)
                print(f"  AR {name:8s} batch {b:3d} "
                      + (f"{rec['median_ms']:10.2f} ms  {rec['ms_per_sentence']:9.3f} ms/sent "
                         f"({rec['output_tokens']:.1f} tokens)" if "median_ms" in rec else
                         f"{rec.get('skipped') or rec.get('error')}"), flush=True)
                save()

    print(f"latency on {device} ({dtype_name}), engines {engines}, budget {args.budget_s:g} s", flush=True)
    # Order: what the comparison needs most comes first, so a budget cut loses the least: the Python
    # loop at few steps, the AR baseline, the other engines at few steps, the many-step points; the
    # C++ engine last, because its one-off export (AOTInductor) can take minutes.
    py = [e for e in engines if e == "python"]
    others = [e for e in engines if e not in ("python", "cpp")]
    cpp = [e for e in engines if e == "cpp"]
    few, many = [k for k in steps if k <= args.few_max], [k for k in steps if k > args.few_max]
    for engine in py:
        diffusion_points(engine, few)
    if not args.no_ar:
        ar_decoders()
    for engine in others:
        diffusion_points(engine, few)
    for engine in py + others:
        diffusion_points(engine, many)
    for engine in cpp:
        diffusion_points(engine, few)
        diffusion_points(engine, many)
    result["measure_seconds"] = round(time.perf_counter() - clock.t0, 1)
    save()
    print(f"wrote {out_path}", flush=True)
    if not args.no_plots:
        from benchmarks import plot_quality
        for made in plot_quality.plot_latency(result, out_path.parent, out_path.stem):
            print(f"wrote {made}", flush=True)
    return result


if __name__ == "__main__":
    main()
