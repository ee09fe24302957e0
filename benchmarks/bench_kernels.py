"""Speed and peak memory of each fastdiss op against the PyTorch paths a user would otherwise take.

For every op (attention, layer_norm, q_sample, embed_and_noise, self_cond_project,
rounding_cross_entropy) and every shape of the preset, forward and forward+backward are timed
(median, p20, p80) and their peak memory taken, for these providers:

  fastdiss        fastdiss.functional.<op> (Triton on CUDA tensors, the reference on CPU)
  eager           the op's PyTorch reference (kernels/*.py `*_reference`)
  compile         torch.compile(reference); compile failures are recorded, not fatal
  sdpa_flash / sdpa_efficient / sdpa_cudnn   (attention) F.scaled_dot_product_attention with one
                  backend; flash takes no mask, so masked cases record 'unsupported with mask' and
                  the no-mask cases time it as the reference
  logits_ce       (rounding CE) logits = x @ E^T in the input dtype, then F.cross_entropy

Memory-bound ops report GB/s (minimum bytes: each input read once, each output written once) and,
when benchmarks/results/ceilings-<tag>.json exists, the fraction of the measured copy bandwidth;
attention and the rounding head report TFLOP/s. Every (case, provider, mode) catches its own
failure and records it, so one broken kernel never hides the other numbers. The JSON is
rewritten after every case, so a run cut short still leaves what it measured.

    python -m benchmarks.bench_kernels --quick --device cpu --no-compile   # seconds, CPU
    python -m benchmarks.bench_kernels --gpu                                # ~2 min on an H100
    python -m benchmarks.bench_kernels --summarize benchmarks/results/kernels-<tag>.json
"""
from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.bench_ceilings import load_ceilings

OPS = ("attention", "layer_norm", "q_sample", "embed_and_noise", "self_cond_project", "rounding_cross_entropy")
MODES = ("fwd", "fwd_bwd")
UNSUPPORTED_MASK = "unsupported with mask"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Shapes. Model: sequences 32-1024, batch 1-256, head dim 64/128, hidden 512, latent d 128,
# vocabulary ~8k. Attention cases carry ~10% key padding (mask=True) unless mask=False.
SDPA_ONLY = ["fastdiss", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]
PRESETS = {
    # Tiny shapes for the 2-core CPU and the smoke test: seconds in total.
    "quick": {
        "attention": [dict(B=2, H=2, Lq=16, Lk=16, D=16, mask=True),
                      dict(B=2, H=2, Lq=12, Lk=20, D=16, mask=True),
                      dict(B=2, H=2, Lq=16, Lk=16, D=16, mask=False)],
        "layer_norm": [dict(N=64, C=32, residual=False), dict(N=64, C=32, residual=True)],
        "q_sample": [dict(B=2, L=16, d=8, per_token=True)],
        "embed_and_noise": [dict(B=2, L=16, V=50, d=8)],
        "self_cond_project": [dict(B=2, L=16, d=8, H=32)],
        "rounding_cross_entropy": [dict(N=64, V=50, d=8)],
    },
    # About 2 minutes on an H100: the model's training shapes, large enough to fill the chip.
    "gpu": {
        "attention": [dict(B=32, H=8, Lq=128, Lk=128, D=64, mask=True),
                      dict(B=8, H=8, Lq=512, Lk=512, D=64, mask=True),
                      dict(B=4, H=8, Lq=1024, Lk=1024, D=128, mask=True),
                      dict(B=64, H=8, Lq=64, Lk=64, D=64, mask=True),
                      dict(B=256, H=8, Lq=32, Lk=32, D=64, mask=True),
                      dict(B=32, H=8, Lq=128, Lk=144, D=64, mask=True),   # cross-attention
                      dict(B=32, H=8, Lq=128, Lk=128, D=64, mask=False, providers=SDPA_ONLY),
                      dict(B=8, H=8, Lq=512, Lk=512, D=64, mask=False, providers=SDPA_ONLY),
                      dict(B=4, H=8, Lq=1024, Lk=1024, D=128, mask=False, providers=SDPA_ONLY),
                      dict(B=64, H=8, Lq=64, Lk=64, D=64, mask=False, providers=SDPA_ONLY)],
        "layer_norm": [dict(N=65536, C=512, residual=False), dict(N=65536, C=512, residual=True)],
        "q_sample": [dict(B=256, L=256, d=128, per_token=True), dict(B=128, L=512, d=512, per_token=True)],
        "embed_and_noise": [dict(B=256, L=256, V=8192, d=128)],
        "self_cond_project": [dict(B=256, L=256, d=128, H=512)],
        "rounding_cross_entropy": [dict(N=16384, V=8192, d=128)],
    },
}


def _full_preset() -> dict:
    """A wider sweep over the model's shapes (several minutes on a GPU)."""
    att = []
    for D in (64, 128):
        for L in (32, 64, 128, 256, 512, 1024):
            att.append(dict(B=min(256, max(1, 16384 // L)), H=8, Lq=L, Lk=L, D=D, mask=True))
    for L in (128, 512, 1024):
        att.append(dict(B=min(256, max(1, 16384 // L)), H=8, Lq=L, Lk=L, D=64, mask=False, providers=SDPA_ONLY))
    att.append(dict(B=1, H=8, Lq=128, Lk=128, D=64, mask=True))
    return {
        "attention": att,
        "layer_norm": [dict(N=n, C=c, residual=r) for n in (4096, 65536, 262144) for c in (512, 1024)
                       for r in (False, True)],
        "q_sample": [dict(B=b, L=256, d=128, per_token=pt) for b in (16, 256, 1024) for pt in (False, True)],
        "embed_and_noise": [dict(B=b, L=256, V=8192, d=128) for b in (16, 256)],
        "self_cond_project": [dict(B=b, L=256, d=128, H=h) for b in (16, 256) for h in (512, 1024)],
        "rounding_cross_entropy": [dict(N=n, V=8192, d=128) for n in (4096, 16384, 65536)],
    }


PRESETS["full"] = _full_preset()


@dataclass
class Case:
    """One op at one shape: how to build its inputs and what each provider computes."""
    op: str
    name: str
    params: dict
    make: Callable[[], dict]               # fresh, seeded inputs on the device
    grad: tuple[str, ...]                  # inputs that get gradients in fwd_bwd
    providers: dict[str, Callable | str]   # provider -> fn(inputs), or why it cannot run
    bytes: dict = field(default_factory=dict)   # minimum bytes moved per mode
    flops: dict = field(default_factory=dict)   # floating-point operations per mode


# ----------------------------------------------------------------------------- providers

def _fastdiss():
    import fastdiss.functional as fd
    return fd


def _refs():
    from fastdiss.kernels import attention, layer_norm, noising, rounding_ce, self_cond_proj
    return {"attention": attention.attention_reference, "layer_norm": layer_norm.layer_norm_reference,
            "q_sample": noising.q_sample_reference, "embed_and_noise": noising.embed_and_noise_reference,
            "self_cond_project": self_cond_proj.self_cond_project_reference,
            "rounding_cross_entropy": rounding_ce.rounding_cross_entropy_reference}


def _compiled(fn):
    """torch.compile(fn), static shapes; raises the dynamo recompile limits so a preset's many
    shapes never fall back to eager silently (which would report eager numbers as 'compile')."""
    import torch._dynamo
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    return torch.compile(fn, dynamic=False)


def _sdpa(backend_name: str):
    def fn(x):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            raise RuntimeError(f"this torch has no SDPBackend.{backend_name}")
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x.get("attn_mask"))
    return fn


def _with_baselines(op: str, ours: Callable, ref_call: Callable) -> dict:
    """fastdiss, eager and compile providers, built lazily so an import failure is per provider."""
    def fastdiss_fn(x):
        return ours(_fastdiss(), x)

    def eager_fn(x):
        return ref_call(_refs()[op], x)

    compiled = {}

    def compile_fn(x):
        if "fn" not in compiled:
            compiled["fn"] = _compiled(_refs()[op])
        return ref_call(compiled["fn"], x)

    return {"fastdiss": fastdiss_fn, "eager": eager_fn, "compile": compile_fn}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, device, dtype, g, scale=1.0):
    return (torch.randn(shape, device=device, generator=g, dtype=torch.float32) * scale).to(dtype)


# ----------------------------------------------------------------------------- cases

def attention_case(p, device, dtype, seed=0) -> Case:
    B, H, Lq, Lk, D, mask = p["B"], p["H"], p["Lq"], p["Lk"], p["D"], p["mask"]
    pad_frac = p.get("pad_frac", 0.1)

    def make():
        g = _gen(device, seed)
        x = {n: _randn((B, H, L, D), device, dtype, g) for n, L in (("q", Lq), ("k", Lk), ("v", Lk))}
        if mask:
            # Each row pads 0..2*pad_frac of its keys (mean pad_frac); at least one key stays valid.
            n_pad = (torch.rand(B, device=device, generator=g) * 2 * pad_frac * Lk).long().clamp(max=Lk - 1)
            kpm = torch.arange(Lk, device=device)[None, :] >= (Lk - n_pad)[:, None]
            x["key_padding_mask"] = kpm
            x["attn_mask"] = ~kpm[:, None, None, :]   # SDPA convention: True = attend
        return x

    prov = _with_baselines(
        "attention",
        lambda fd, x: fd.attention(x["q"], x["k"], x["v"], key_padding_mask=x.get("key_padding_mask")),
        lambda f, x: f(x["q"], x["k"], x["v"], x.get("key_padding_mask")))
    prov["sdpa_flash"] = UNSUPPORTED_MASK if mask else _sdpa("FLASH_ATTENTION")
    prov["sdpa_efficient"] = _sdpa("EFFICIENT_ATTENTION")
    prov["sdpa_cudnn"] = _sdpa("CUDNN_ATTENTION")
    s = torch.empty((), dtype=dtype).element_size()
    fwd_flops = 4 * B * H * Lq * Lk * D          # QK^T and PV; padded keys counted (the usual convention)
    name = f"B{B} H{H} L{Lq}x{Lk} D{D} {'mask' if mask else 'nomask'}"
    return Case("attention", name, dict(p, dtype=_dtype_name(dtype)), make, ("q", "k", "v"), prov,
                bytes={"fwd": B * H * D * s * (2 * Lq + 2 * Lk), "fwd_bwd": B * H * D * s * (6 * Lq + 6 * Lk)},
                flops={"fwd": fwd_flops, "fwd_bwd": int(3.5 * fwd_flops)})   # backward = 2.5 forward


def layer_norm_case(p, device, dtype, seed=0) -> Case:
    N, C, res = p["N"], p["C"], p["residual"]

    def make():
        g = _gen(device, seed)
        x = {"x": _randn((N, C), device, dtype, g), "weight": _randn((C,), device, dtype, g, 0.1) + 1,
             "bias": _randn((C,), device, dtype, g, 0.1)}
        if res:
            x["residual"] = _randn((N, C), device, dtype, g)
        return x

    prov = _with_baselines(
        "layer_norm",
        lambda fd, x: fd.layer_norm(x["x"], x["weight"], x["bias"], residual=x.get("residual")),
        lambda f, x: f(x["x"], x["weight"], x["bias"], 1e-5, x.get("residual")))
    s = torch.empty((), dtype=dtype).element_size()
    # fwd: x (+ residual) in, y (+ h) out. bwd: dy (+ dh) and x/h in, dx (= dresidual) out.
    fwd, bwd = (4, 4) if res else (2, 3)
    grad = ("x", "weight", "bias", "residual") if res else ("x", "weight", "bias")
    name = f"{N}x{C}{' +residual' if res else ''}"
    return Case("layer_norm", name, dict(p, dtype=_dtype_name(dtype)), make, grad, prov,
                bytes={"fwd": fwd * N * C * s, "fwd_bwd": (fwd + bwd) * N * C * s})


def q_sample_case(p, device, dtype, seed=0) -> Case:
    B, L, d, per_token = p["B"], p["L"], p["d"], p["per_token"]

    def make():
        g = _gen(device, seed)
        t_shape = (B, L) if per_token else (B,)
        return {"z0": _randn((B, L, d), device, dtype, g), "eps": _randn((B, L, d), device, dtype, g),
                "t": torch.rand(t_shape, device=device, generator=g)}

    prov = _with_baselines(
        "q_sample",
        lambda fd, x: fd.q_sample(x["z0"], x["t"], x["eps"], schedule="sqrt", noise_factor=1.0),
        lambda f, x: f(x["z0"], x["t"], x["eps"], "sqrt", 1.0))
    s = torch.empty((), dtype=dtype).element_size()
    n = B * L * d
    t_bytes = 4 * (B * L if per_token else B)
    return Case("q_sample", f"{B}x{L}x{d} t/{'token' if per_token else 'seq'}", dict(p, dtype=_dtype_name(dtype)), make,
                ("z0",), prov,
                bytes={"fwd": 3 * n * s + t_bytes, "fwd_bwd": 5 * n * s + t_bytes})   # bwd: dy in, dz0 out


def embed_and_noise_case(p, device, dtype, seed=0) -> Case:
    B, L, V, d = p["B"], p["L"], p["V"], p["d"]

    def make():
        g = _gen(device, seed)
        return {"tokens": torch.randint(0, V, (B, L), device=device, generator=g),
                "weight": _randn((V, d), device, dtype, g), "t": torch.rand((B, L), device=device, generator=g),
                "eps": _randn((B, L, d), device, dtype, g),
                "ln_weight": _randn((d,), device, dtype, g, 0.1) + 1, "ln_bias": _randn((d,), device, dtype, g, 0.1)}

    prov = _with_baselines(
        "embed_and_noise",
        lambda fd, x: fd.embed_and_noise(x["tokens"], x["weight"], x["t"], x["eps"], ln_weight=x["ln_weight"],
                                         ln_bias=x["ln_bias"], schedule="sqrt"),
        lambda f, x: f(x["tokens"], x["weight"], x["t"], x["eps"], x["ln_weight"], x["ln_bias"], "sqrt"))
    s = torch.empty((), dtype=dtype).element_size()
    n = B * L * d
    # fwd: tokens (8 B), t (4 B), gathered rows, eps in; z0, x_t out.
    # bwd: dz0, dx_t and the rows again in; the dense embedding gradient (V x d) out.
    fwd = 4 * n * s + 12 * B * L
    return Case("embed_and_noise", f"{B}x{L} V{V} d{d}", dict(p, dtype=_dtype_name(dtype)), make,
                ("weight", "ln_weight", "ln_bias"), prov,
                bytes={"fwd": fwd, "fwd_bwd": fwd + 3 * n * s + V * d * s + 8 * B * L})


def self_cond_project_case(p, device, dtype, seed=0) -> Case:
    B, L, d, H = p["B"], p["L"], p["d"], p["H"]

    def make():
        g = _gen(device, seed)
        return {"x_t": _randn((B, L, d), device, dtype, g), "sc": _randn((B, L, d), device, dtype, g),
                "weight": _randn((H, 2 * d), device, dtype, g, (2 * d) ** -0.5),
                "bias": _randn((H,), device, dtype, g, 0.1), "add": _randn((B, L, H), device, dtype, g)}

    prov = _with_baselines(
        "self_cond_project",
        lambda fd, x: fd.self_cond_project(x["x_t"], x["sc"], x["weight"], bias=x["bias"], add=x["add"]),
        lambda f, x: f(x["x_t"], x["sc"], x["weight"], x["bias"], x["add"]))
    s = torch.empty((), dtype=dtype).element_size()
    N = B * L
    fwd_flops = 2 * N * (2 * d) * H
    # fwd: x_t, sc, add in, y out. bwd: dy, x_t, sc in; dx_t out (sc is stop-gradient; dadd = dy).
    fwd = N * (2 * d + 2 * H) * s
    return Case("self_cond_project", f"{B}x{L} d{d} H{H}", dict(p, dtype=_dtype_name(dtype)), make,
                ("x_t", "weight", "bias", "add"), prov,
                bytes={"fwd": fwd, "fwd_bwd": fwd + N * (H + 3 * d) * s},
                flops={"fwd": fwd_flops, "fwd_bwd": 2 * fwd_flops})   # bwd: dx_t and dW (sc gets none)


def rounding_ce_case(p, device, dtype, seed=0) -> Case:
    N, V, d = p["N"], p["V"], p["d"]

    def make():
        g = _gen(device, seed)
        targets = torch.randint(0, V, (N,), device=device, generator=g)
        targets[torch.rand(N, device=device, generator=g) < 0.1] = -100   # padding, as in training
        return {"x0_hat": _randn((N, d), device, dtype, g), "embedding": _randn((V, d), device, dtype, g),
                "targets": targets}

    prov = _with_baselines(
        "rounding_cross_entropy",
        lambda fd, x: fd.rounding_cross_entropy(x["x0_hat"], x["embedding"], x["targets"]),
        lambda f, x: f(x["x0_hat"], x["embedding"], x["targets"]))
    prov["logits_ce"] = lambda x: F.cross_entropy(x["x0_hat"] @ x["embedding"].t(), x["targets"])
    s = torch.empty((), dtype=dtype).element_size()
    fwd_flops = 2 * N * V * d
    io = (N + V) * d * s + 8 * N
    return Case("rounding_cross_entropy", f"N{N} V{V} d{d}", dict(p, dtype=_dtype_name(dtype)), make,
                ("x0_hat", "embedding"), prov,
                bytes={"fwd": io, "fwd_bwd": 2 * io + (N + V) * d * s},
                flops={"fwd": fwd_flops, "fwd_bwd": 3 * fwd_flops})   # bwd: dX = G E, dE = G^T X


BUILDERS = {"attention": attention_case, "layer_norm": layer_norm_case, "q_sample": q_sample_case,
            "embed_and_noise": embed_and_noise_case, "self_cond_project": self_cond_project_case,
            "rounding_cross_entropy": rounding_ce_case}


def build_cases(preset: dict, ops, device, dtype) -> list[Case]:
    cases = []
    for op in ops:
        for i, p in enumerate(preset.get(op, [])):
            p = dict(p)
            allowed = p.pop("providers", None)
            case = BUILDERS[op](p, device, dtype, seed=1000 + i)
            if allowed is not None:
                case.providers = {k: v for k, v in case.providers.items() if k in allowed}
            cases.append(case)
    return cases


# ----------------------------------------------------------------------------- measuring

def _tensors(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor)]


def measure(fn: Callable, inputs: dict, grad_names, mode: str, device, timing: dict) -> dict:
    """Time one provider in one mode, then take the peak memory of one more call."""
    leaves = [inputs[n] for n in grad_names]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(inputs)
        leaves = None
    else:
        outs = [o for o in _tensors(fn(inputs)) if o.requires_grad]
        if not outs:
            raise RuntimeError("no output requires grad: the op does not support backward")
        grads = [torch.randn_like(o) if o.dim() > 0 else torch.ones_like(o) for o in outs]
        del outs

        def run():
            torch.autograd.backward([o for o in _tensors(fn(inputs)) if o.requires_grad], grads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # SDPA explains at length why a backend was not used
        t = common.time_fn(run, device, grad_to_none=leaves, **timing)
        for x in leaves or ():
            x.grad = None
        t["peak_mem_bytes"] = common.peak_memory(run, device)
    for x in leaves or ():
        x.grad = None
    return t


def derive(meas: dict, case: Case, mode: str, dtype: torch.dtype, ceilings: dict | None) -> None:
    """Add GB/s, TFLOP/s and, with measured ceilings, the fractions of them and the floor time."""
    sec = meas["median_ms"] * 1e-3
    nbytes, flops = case.bytes.get(mode), case.flops.get(mode)
    if nbytes:
        meas["GBps"] = nbytes / sec / 1e9
    if flops:
        meas["TFLOPs"] = flops / sec / 1e12
    if not ceilings:
        return
    floors = []
    copy_gbps = ceilings.get("copy_GBps")
    rate = (ceilings.get("matmul_TFLOPs") or {}).get(_dtype_name(dtype))
    if nbytes and copy_gbps:
        meas["frac_copy_bw"] = meas["GBps"] / copy_gbps
        floors.append(nbytes / (copy_gbps * 1e9) * 1e3)
    if flops and rate:
        meas["frac_matmul_peak"] = meas["TFLOPs"] / rate
        floors.append(flops / (rate * 1e12) * 1e3)
    if floors:
        meas["floor_ms"] = max(floors)
        meas["frac_of_floor"] = meas["floor_ms"] / meas["median_ms"]


def summarize_case(rec: dict) -> dict:
    """Speed-up of fastdiss over each other provider (their time / ours) and peak-memory ratios."""
    out = {}
    for mode in MODES:
        ours = rec["providers"].get("fastdiss", {}).get(mode, {})
        if "median_ms" not in ours:
            continue
        speed, mem = {}, {}
        for name, by_mode in rec["providers"].items():
            other = by_mode.get(mode, {})
            if name == "fastdiss" or "median_ms" not in other:
                continue
            speed[name] = other["median_ms"] / ours["median_ms"]
            if other.get("peak_mem_bytes") and ours.get("peak_mem_bytes"):
                mem[name] = other["peak_mem_bytes"] / ours["peak_mem_bytes"]
        entry = {"speedup": speed, "peak_mem_ratio": mem}
        if speed:
            best = min(speed, key=lambda k: rec["providers"][k][mode]["median_ms"])
            entry["best_baseline"] = best
            entry["speedup_vs_best"] = speed[best]
        out[mode] = entry
    return out


def _record(case: Case) -> dict:
    pending = {"error": "pending: not reached (run ended early)", "skipped": True}
    return {"op": case.op, "name": case.name, "params": case.params, "bytes": case.bytes, "flops": case.flops,
            "grad_inputs": list(case.grad),
            "providers": {name: {m: dict(pending) for m in MODES} for name in case.providers}}


def run_case(case: Case, rec: dict, names, device, dtype, timing, ceilings, state) -> None:
    """Measure the named providers of one case; every failure is recorded in rec, never raised."""
    try:
        inputs = case.make()
        for n in case.grad:
            inputs[n].requires_grad_(True)
    except Exception as e:
        for name in names:
            rec["providers"][name] = {m: {"error": "building inputs: " + common.error_text(e)} for m in MODES}
        rec["summary"] = summarize_case(rec)
        common.release_memory(device)
        return
    for name in names:
        prov = case.providers[name]
        for mode in MODES:
            if state.get("fatal"):
                rec["providers"][name][mode] = {"error": f"skipped after a fatal CUDA error ({state['fatal']})",
                                                "skipped": True}
                continue
            if isinstance(prov, str):   # a reason it cannot run: unsupported, or skipped by an option
                kind = "skipped" if prov.startswith("skipped") else "unsupported"
                rec["providers"][name][mode] = {"error": prov, kind: True}
                continue
            if name == "compile" and mode == "fwd_bwd" and "error" in rec["providers"][name]["fwd"]:
                rec["providers"][name][mode] = {"error": "skipped: compile failed in fwd: "
                                                + rec["providers"][name]["fwd"]["error"], "skipped": True}
                continue
            try:
                meas = measure(prov, inputs, case.grad, mode, device, timing)
                derive(meas, case, mode, dtype, ceilings)
                rec["providers"][name][mode] = meas
            except Exception as e:
                rec["providers"][name][mode] = {"error": common.error_text(e)}
                if device.type == "cuda" and common.is_fatal_cuda_error(e):
                    state["fatal"] = f"{case.op} {case.name} {name} {mode}"
                common.release_memory(device)
    del inputs
    common.release_memory(device)
    rec["summary"] = summarize_case(rec)


def run_all(cases: list[Case], device, dtype, timing, ceilings, budget_s, write: Callable[[], None],
            records: list[dict], log=print) -> None:
    """Pass 1: every provider but compile, so the key comparisons land first. Pass 2: compile,
    while the time budget lasts (compiling costs seconds per shape)."""
    t0 = time.perf_counter()
    state: dict = {}
    for compile_pass in (False, True):
        for case, rec in zip(cases, records):
            names = [n for n in case.providers if (n == "compile") == compile_pass]
            if not names:
                continue
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                for n in names:
                    rec["providers"][n] = {m: {"error": f"skipped: time budget of {budget_s:.0f} s spent",
                                               "skipped": True} for m in MODES}
                rec["summary"] = summarize_case(rec)
                continue
            if all(isinstance(case.providers[n], str) for n in names):   # nothing to run: record why
                run_case(case, rec, names, device, dtype, timing, ceilings, state)
                continue
            tc = time.perf_counter()
            run_case(case, rec, names, device, dtype, timing, ceilings, state)
            log(f"[{time.perf_counter() - t0:6.1f}s] {case.op:23s} {case.name:28s} {','.join(names):55s} "
                f"{time.perf_counter() - tc:5.1f}s")
            write()


# ----------------------------------------------------------------------------- report

def _metric(meas: dict) -> str:
    if "TFLOPs" in meas:
        frac = meas.get("frac_matmul_peak")
        return f"{meas['TFLOPs']:7.1f} TF/s" + (f" {100 * frac:4.0f}%mm" if frac is not None else "")
    if "GBps" in meas:
        frac = meas.get("frac_copy_bw")
        return f"{meas['GBps']:7.0f} GB/s" + (f" {100 * frac:4.0f}%bw" if frac is not None else "")
    return ""


def summary_lines(result: dict) -> list[str]:
    lines = [f"{'op':23s} {'case':28s} {'mode':7s} {'fastdiss ms':>11s} {'best other':>16s} {'ms':>9s} "
             f"{'speed-up':>8s}  {'fastdiss rate':22s} {'mem x':>6s}"]
    for rec in result.get("cases", []):
        for mode in MODES:
            ours = rec["providers"].get("fastdiss", {}).get(mode, {})
            summ = rec.get("summary", {}).get(mode, {})
            best = summ.get("best_baseline")
            ours_ms = f"{ours['median_ms']:11.4f}" if "median_ms" in ours else f"{'ERR':>11s}"
            best_ms = f"{rec['providers'][best][mode]['median_ms']:9.4f}" if best else f"{'-':>9s}"
            speed = f"{summ['speedup_vs_best']:7.2f}x" if best else f"{'-':>8s}"
            mem = summ.get("peak_mem_ratio", {}).get(best) if best else None
            lines.append(f"{rec['op']:23s} {rec['name']:28s} {mode:7s} {ours_ms} {best or '-':>16s} {best_ms} "
                         f"{speed}  {_metric(ours):22s} {f'{mem:5.2f}x' if mem else '-':>6s}")
    n_err = sum(1 for rec in result.get("cases", []) for by_mode in rec["providers"].values()
                for m in by_mode.values() if "error" in m and not m.get("unsupported"))
    lines.append(f"{n_err} provider/mode entries without numbers (errors or skipped; see the JSON)")
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="shape set (default: gpu on CUDA, quick on CPU)")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick", help="= --preset quick")
    p.add_argument("--gpu", dest="preset", action="store_const", const="gpu", help="= --preset gpu")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--providers", nargs="+", help="only these providers (e.g. fastdiss eager sdpa_flash)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build on a small CPU)")
    p.add_argument("--budget-s", type=float, help="stop starting new cases after this many seconds "
                   "(the rest are recorded as skipped); default 150 for --gpu, none otherwise")
    p.add_argument("--warmup-ms", type=float, default=20.0, help="GPU warm-up per measurement (do_bench)")
    p.add_argument("--rep-ms", type=float, default=60.0, help="GPU timed time per measurement (do_bench)")
    p.add_argument("--cpu-repeats", type=int, help="CPU timed calls per measurement (default 5 quick, 10 else)")
    p.add_argument("--out-dir", default=None, help=f"results folder (default {common.RESULTS_DIR})")
    p.add_argument("--name", default="kernels", help="results file is <name>-<device tag>.json")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--summarize", metavar="JSON", help="only print the summary table of an existing results file")
    args = p.parse_args(argv)

    if args.summarize:
        result = common.read_json(args.summarize)
        print("\n".join(summary_lines(result)))
        return result

    device = common.pick_device(args.device)
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "quick")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    budget = args.budget_s if args.budget_s is not None else (150.0 if preset_name == "gpu" else None)
    repeats = args.cpu_repeats or (5 if preset_name == "quick" else 10)
    timing = ({"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms} if device.type == "cuda" else
              {"cpu_warmup": 1, "cpu_repeats": repeats, "cpu_max_time_s": 2.0})
    tag = common.device_tag(device)
    ceilings = load_ceilings(tag, args.out_dir)

    cases = build_cases(PRESETS[preset_name], args.ops, device, dtype)
    for case in cases:
        if args.no_compile and "compile" in case.providers:
            case.providers["compile"] = "skipped: --no-compile"
        if args.providers:
            case.providers = {k: v for k, v in case.providers.items() if k in args.providers}

    config = {"preset": preset_name, "dtype": _dtype_name(dtype), "ops": args.ops,
              "providers": args.providers, "compile": not args.no_compile, "budget_s": budget, "timing": timing,
              "conventions": {
                  "time": "median / p20 / p80 in ms; GPU: triton.testing.do_bench (events, L2 flushed), "
                          "CPU: time.perf_counter",
                  "fwd": "forward under torch.no_grad()", "fwd_bwd": "forward + backward with random output grads",
                  "peak_mem_bytes": "max_memory_allocated during one call minus allocated before it (None on CPU)",
                  "bytes": "minimum bytes moved: each input read once, each output written once",
                  "flops": "attention: 4*B*H*Lq*Lk*D fwd (padded keys counted), fwd_bwd = 3.5x fwd",
                  "speedup": "other provider's median / fastdiss median (> 1: fastdiss faster)",
                  "peak_mem_ratio": "other provider's peak / fastdiss peak (> 1: fastdiss uses less)"}}
    result = {"header": common.run_header(args.name, device, config), "ceilings": ceilings,
              "cases": [_record(c) for c in cases], "plots": [], "elapsed_s": None}
    path = common.results_path(args.name, tag, args.out_dir)
    t0 = time.perf_counter()

    def write():
        result["elapsed_s"] = time.perf_counter() - t0
        common.write_json(result, path)

    write()
    print(f"bench_kernels: preset={preset_name} device={device} ({tag}) dtype={config['dtype']} "
          f"cases={len(cases)} budget={budget} ceilings={'yes' if ceilings else 'no'}", flush=True)
    run_all(cases, device, dtype, timing, ceilings, budget, write, result["cases"],
            log=lambda s: print(s, flush=True))
    write()
    if not args.no_plot:
        try:
            from benchmarks import plot
            result["plots"] = [str(x) for x in plot.plot_kernels(result, path.parent, f"{args.name}-{tag}")]
        except Exception as e:   # a missing matplotlib must not lose the numbers
            result["plots"] = []
            result["plot_error"] = common.error_text(e)
            print(f"plotting failed: {result['plot_error']}")
        write()
    print("\n".join(summary_lines(result)))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
