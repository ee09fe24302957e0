"""Host overhead per sampling step and end-to-end latency: Python loop, C++ loop, CUDA-graph replay.

    python -m benchmarks.bench_sampler --quick                 # CPU, tiny preset (+ a one-time export)
    python -m benchmarks.bench_sampler --gpu                   # GPU: python loop vs graph replay, small preset
    python -m benchmarks.bench_sampler --export-dir DIR ...    # time the C++ loop on an existing export

What is timed, per engine, batch B in --batches and K in --steps: one generation
    encode(src)  ->  K denoising steps from fixed noise  ->  rounding (argmax over the vocabulary)
with fixed target lengths (no length-prediction variance). Wall clock, device synchronised before
and after each call (what a caller waits for, launch gaps included; device-event timing alone
would hide the host overhead we are after). Runs are paired and interleaved: every repeat times
each engine once, in an order that rotates, so machine noise falls on all engines alike. Medians
and 20/80 percentiles are reported.

Per-step numbers (from the medians):
    step_ms(e)      = (T_e(K=Kmax) - T_e(K=Kmin)) / (Kmax - Kmin): marginal wall-clock cost of one step
    network_ms(e)   = one bare network call as engine e makes it (Python: model(...) in a Python loop;
                      C++: the AOTInductor decoder timed inside C++; graph: device time per step)
    compute_ms      = the cheapest measured way to run the network once: the AOTInductor decoder
                      timed in C++ on CPU (no interpreter, fused kernels), and on GPU the device time
                      of one step inside the replayed graph (CUDA events: no launch gaps)
    host_overhead_ms(e) = step_ms(e) - compute_ms     <- "per-step host overhead"
    loop_overhead_ms(e) = step_ms(e) - network_ms(e)  (the loop around the call: step op, copies, dispatch)
host_overhead charges an engine for everything that is not the bare network compute: Python and
dispatcher time, launch gaps, the step op, and (Python loop on CPU) eager kernels that Inductor
fuses. The JSON keeps every raw number so other splits can be recomputed.

The C++ loop needs the model exported with AOTInductor (about a minute for the tiny preset on
two cores): done once and cached under build/bench_sampler/<fingerprint> unless --export-dir is
given. CUDA graphs run only on a GPU. Random-init weights: latency does not depend on them.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks import common

PRESETS = {
    # threads=1: on a small shared CPU, two OpenMP threads make every small op wait for a descheduled
    # partner thread (50x slower per op under load), which swamps what this benchmark measures
    "quick": dict(preset="tiny", device="cpu", batches=(1, 64), steps=(1, 4, 16), tgt_len=16, src_len=16,
                  repeats=7, vocab=1000, threads=1),
    "gpu": dict(preset="small", device="cuda", batches=(1, 64), steps=(1, 4, 16), tgt_len=32, src_len=32,
                repeats=15, vocab=8000, threads=None),
}


# ----------------------------------------------------------------------------- setup

def build_model(preset: str, vocab: int, device, seed: int = 0):
    from fastdiss.config import preset as make_preset
    from fastdiss.model import Denoiser
    cfg = make_preset(preset)
    torch.manual_seed(seed)
    return Denoiser(cfg.model, vocab, 0).to(device).eval(), cfg


def make_inputs(model, batch: int, src_len: int, tgt_len: int, device, seed: int = 0):
    """Sources with ~1/4 padding in every other row, fixed target lengths, fixed noise."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(1, model.vocab_size, (batch, src_len), generator=gen)
    src_mask = torch.zeros(batch, src_len, dtype=torch.bool)
    src_mask[1::2, src_len - src_len // 4:] = True
    lens = torch.full((batch,), tgt_len)
    lens[1::2] = max(1, tgt_len - tgt_len // 4)
    tgt_mask = torch.arange(tgt_len)[None] >= lens[:, None]
    noise = torch.randn(batch, tgt_len, model.cfg.d_latent, generator=gen)
    return [t.to(device) for t in (src, src_mask, tgt_mask, noise)]


def cached_export(model, cfg, export_dir: str | None) -> str:
    from fastdiss.export import export_denoiser, load_manifest, weights_fingerprint
    fp = weights_fingerprint(model)
    out = Path(export_dir) if export_dir else common.REPO_ROOT / "build" / "bench_sampler" / fp[:16]
    try:
        if load_manifest(out)["weights_sha256"] == fp:
            return str(out)
    except (FileNotFoundError, ValueError):
        pass
    print(f"[bench_sampler] exporting the model to {out} (AOTInductor, once) ...", flush=True)
    t0 = time.perf_counter()
    export_denoiser(model, cfg.diffusion, out, cfg.sample, device=next(model.parameters()).device)
    print(f"[bench_sampler] export took {time.perf_counter() - t0:.0f} s", flush=True)
    return str(out)


def make_engines(names, model, cfg, device, export_dir):
    """{name: engine} for the engines that can run here; {name: reason} for those that cannot."""
    from fastdiss.python_engine import PythonEngine
    engines, skipped = {}, {}
    for name in names:
        try:
            if name == "python":
                engines[name] = PythonEngine(model, cfg.diffusion)
            elif name == "cpp":
                from fastdiss.cpp_engine import CppEngine
                engines[name] = CppEngine(cached_export(model, cfg, export_dir), model=model)
                if engines[name].device.type != device.type:
                    raise RuntimeError(f"the export is for {engines[name].device}, the benchmark runs on {device}")
            elif name == "cuda-graph":
                if device.type != "cuda":
                    raise RuntimeError("CUDA graphs need a GPU")
                from fastdiss.cuda_graphs import CUDAGraphEngine
                engines[name] = CUDAGraphEngine(model, cfg.diffusion)
            else:
                raise ValueError(f"unknown engine {name!r}")
        except Exception as e:  # an engine that cannot run is recorded, the others still run
            skipped[name] = common.error_text(e)
            print(f"[bench_sampler] engine {name} skipped: {skipped[name]}", flush=True)
    return engines, skipped


def generation(engine, model, src, src_mask, tgt_mask, noise, steps: int):
    """fn() running one whole generation with `engine` (encoder, K steps, rounding)."""
    from fastdiss.schedule import time_grid
    grid = time_grid(steps, "uniform", device=noise.device)
    cpp = getattr(engine, "name", "") == "cpp"

    @torch.no_grad()
    def run():
        enc = engine.encode(src, src_mask)
        _, sc = engine.denoise(enc, noise, tgt_mask, grid)
        return engine.sampler.round(sc)[0] if cpp else model.logits(sc).argmax(-1)
    return run


# ----------------------------------------------------------------------------- measuring

def interleaved_wall_clock(fns: dict, device, repeats: int, warmup: int = 2) -> dict:
    """{name: summary} of sync'd wall-clock times; each repeat times every fn once, rotating the order."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            common.synchronize(device)
            t0 = time.perf_counter()
            fns[n]()
            common.synchronize(device)
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: common.summarize(v, "wall_clock_sync_interleaved") for n, v in times.items()}


def python_network_ms(model, src, src_mask, tgt_mask, noise, device, repeats: int) -> float:
    """One eager model(...) call as the Python loop makes it (median, wall clock, sync'd)."""
    with torch.no_grad():
        enc = model.encode(src, src_mask)
        t = torch.full(tgt_mask.shape, 0.5, device=noise.device)
        sc = torch.zeros_like(noise)
        return common.wall_clock(lambda: model(noise, sc, t, enc, tgt_mask), device, warmup=2,
                                 repeats=repeats)["median_ms"]


def graph_device_ms_per_step(engine, model, src, src_mask, tgt_mask, noise, steps, repeats: int) -> float:
    """Device time of one step inside the replayed graph: CUDA events around generations at the
    largest and smallest K, difference over the step count."""
    from fastdiss.schedule import time_grid
    k_lo, k_hi = min(steps), max(steps)
    out = {}
    with torch.no_grad():
        enc = model.encode(src, src_mask)
        for k in (k_lo, k_hi):
            grid = time_grid(k, "uniform", device=noise.device)
            engine.denoise(enc, noise, tgt_mask, grid)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            vals = []
            for _ in range(repeats):
                start.record()
                engine.denoise(enc, noise, tgt_mask, grid)
                end.record()
                torch.cuda.synchronize()
                vals.append(start.elapsed_time(end))
            out[k] = statistics.median(vals)
    return (out[k_hi] - out[k_lo]) / (k_hi - k_lo)


def per_step(table: dict, steps) -> float:
    k_lo, k_hi = min(steps), max(steps)
    return (table[k_hi]["median_ms"] - table[k_lo]["median_ms"]) / (k_hi - k_lo)


# ----------------------------------------------------------------------------- report

def overhead_table(result: dict) -> str:
    """Markdown table: per-step host overhead and end-to-end latency per engine and batch."""
    steps = result["config"]["steps"]
    head = ["batch", "engine", "step ms", "compute ms", "host overhead ms/step"] + [f"K={k} ms" for k in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in result["batches"]:
        for name, rec in b["engines"].items():
            row = [str(b["batch"]), name, f"{rec['step_ms']:.3f}", f"{b['compute_ms']:.3f}",
                   f"{rec['host_overhead_ms']:.3f}"] + [f"{rec['latency'][str(k)]['median_ms']:.2f}" for k in steps]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = result["batches"]
    names = sorted({n for b in batches for n in b["engines"]})
    color = {n: f"C{i}" for i, n in enumerate(names)}  # one colour per engine in every panel
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4))
    steps = result["config"]["steps"]
    for ax, b in zip(axes, batches):
        for name, rec in b["engines"].items():
            ax.plot(steps, [rec["latency"][str(k)]["median_ms"] for k in steps], marker="o", label=name,
                    color=color[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("steps K")
        ax.set_ylabel("latency (ms, median)")
        ax.set_title(f"batch {b['batch']}")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[-1]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [b["engines"].get(name, {}).get("host_overhead_ms", math.nan) for b in batches]
        ax.bar([j + (i - (len(names) - 1) / 2) * width for j in range(len(batches))], vals, width, label=name,
               color=color[name])
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([f"batch {b['batch']}" for b in batches])
    ax.set_ylabel("host overhead per step (ms)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"sampler engines on {result['header']['machine']['device']} ({result['config']['preset']} preset)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", dest="mode", action="store_const", const="quick", help="CPU, tiny preset")
    p.add_argument("--gpu", dest="mode", action="store_const", const="gpu", help="GPU, small preset")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: the mode's)")
    p.add_argument("--preset", default=None, help="model size: tiny | small | base | large")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes, e.g. 1,64")
    p.add_argument("--steps", default=None, help="comma-separated step counts, e.g. 1,4,16 (at least two)")
    p.add_argument("--tgt-len", type=int, default=None)
    p.add_argument("--src-len", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--engines", default="python,cpp,cuda-graph", help="comma-separated subset")
    p.add_argument("--export-dir", default=None, help="existing (or where to write) the AOTInductor export")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the mode's; quick: 1)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    conf = dict(PRESETS[args.mode or "quick"])
    for key in ("preset", "tgt_len", "src_len", "repeats", "threads"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    if args.batches:
        conf["batches"] = tuple(int(x) for x in args.batches.split(","))
    if args.steps:
        conf["steps"] = tuple(sorted(int(x) for x in args.steps.split(",")))
    if len(set(conf["steps"])) < 2:
        raise ValueError(f"--steps needs at least two different step counts, got {conf['steps']}")
    if conf["threads"]:
        torch.set_num_threads(conf["threads"])
    device = common.pick_device(args.device or conf["device"])
    conf["device"] = str(device)
    conf["steps"], conf["batches"] = list(conf["steps"]), list(conf["batches"])

    model, cfg = build_model(conf["preset"], conf["vocab"], device)
    engines, skipped = make_engines([e for e in args.engines.split(",") if e], model, cfg, device, args.export_dir)
    result = {"header": common.run_header("sampler", device, conf), "config": conf, "skipped": skipped,
              "batches": []}
    path = common.results_path("sampler", common.device_tag(device), args.out)
    for batch in conf["batches"]:
        src, src_mask, tgt_mask, noise = make_inputs(model, batch, conf["src_len"], conf["tgt_len"], device)
        latency = {name: {} for name in engines}
        for k in conf["steps"]:
            fns = {name: generation(e, model, src, src_mask, tgt_mask, noise, k) for name, e in engines.items()}
            for name, summary in interleaved_wall_clock(fns, device, conf["repeats"]).items():
                latency[name][k] = summary
        rec = {"batch": batch, "engines": {}}
        network = {}
        if "python" in engines:
            network["python"] = python_network_ms(model, src, src_mask, tgt_mask, noise, device, conf["repeats"])
        if "cpp" in engines:
            enc = engines["cpp"].encode(src, src_mask)
            network["cpp"] = 1e3 * engines["cpp"].time_decoder(enc, noise, tgt_mask, iters=max(10, conf["repeats"]))
        if "cuda-graph" in engines:
            network["cuda-graph"] = graph_device_ms_per_step(engines["cuda-graph"], model, src, src_mask, tgt_mask,
                                                             noise, conf["steps"], conf["repeats"])
        compute = network.get("cuda-graph") if device.type == "cuda" and "cuda-graph" in network else \
            network.get("cpp", min(network.values()) if network else math.nan)
        rec["compute_ms"] = compute
        rec["compute_source"] = ("graph device time per step" if device.type == "cuda" and "cuda-graph" in network
                                 else "AOTInductor decoder timed in C++" if "cpp" in network
                                 else "fastest network call measured")
        for name in engines:
            step = per_step(latency[name], conf["steps"])
            rec["engines"][name] = {
                "latency": {str(k): v for k, v in latency[name].items()},
                "step_ms": step,
                "network_ms": network.get(name),
                "host_overhead_ms": step - compute,
                "loop_overhead_ms": step - network[name] if name in network else None,
            }
        if "cuda-graph" in engines:
            # captures / replays / eager fallbacks so far (cumulative over the batches measured)
            rec["graph_cache_cumulative"] = engines["cuda-graph"].cache_info()
        result["batches"].append(rec)
        common.write_json(result, path)  # a run cut short keeps what it measured
    result["table_markdown"] = overhead_table(result)
    common.write_json(result, path)
    png = plot(result, path.with_suffix(".png"))
    print(result["table_markdown"])
    print(f"wrote {path} and {png}")
    return result


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        main()
