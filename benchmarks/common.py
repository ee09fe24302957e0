"""What every benchmark shares: the record of where and how it ran, timers, peak memory, and
an atomic JSON writer.

A results file must say which machine, software and commit produced it, or its numbers cannot be
trusted later; `run_header` gathers that once. Timers return the median with the 20th and 80th
percentiles, because one number hides noise. GPU times come from device events
(`triton.testing.do_bench`, which also flushes the L2 cache between runs); CPU times from
`time.perf_counter`.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80


# ----------------------------------------------------------------------------- where it ran

def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was asked for but torch sees no CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return dev


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (safe in file names)."""
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s or "unknown"


def device_tag(device: torch.device) -> str:
    """'cpu' or the GPU's name as a slug; part of every results file name."""
    device = torch.device(device)
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return "cpu"


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return getattr(mod, "__version__", None)


def gpu_info(device: torch.device) -> dict | None:
    """Name, memory, SM count, capability and driver of a CUDA device; None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    info = {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "multiprocessors": p.multi_processor_count,
        "memory_bytes": p.total_memory,
        "l2_cache_bytes": getattr(p, "L2_cache_size", None),
        "count": torch.cuda.device_count(),
        "driver": None,
        "clocks_max_sm_mhz": None,
    }
    smi = _run(["nvidia-smi", f"--id={device.index or 0}",
                "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader,nounits"])
    if smi:
        parts = [x.strip() for x in smi.splitlines()[0].split(",")]
        info["driver"] = parts[0] if parts else None
        if len(parts) > 1:
            info["clocks_max_sm_mhz"] = parts[1]
    return info


def machine_info(device: torch.device) -> dict:
    """Software and hardware versions (no host name): enough to reproduce or compare a run."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        import fastdiss
        backend = fastdiss.get_backend()
    except Exception:
        backend = None
    try:
        from fastdiss import _ext
        ext = _ext.build_info()
    except Exception as e:
        ext = {"available": False, "error": error_text(e)}
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "fastdiss_backend": backend,
        "fastdiss_ext": ext,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "device": str(device),
        "gpu": gpu_info(device),
    }


def git_info() -> dict:
    """Commit and dirty flag of the checkout (results files under benchmarks/results/ do not count:
    they are outputs, not code). FASTDISS_GIT_COMMIT / FASTDISS_GIT_DIRTY override (the GPU machine
    gets a copy of the tree without .git)."""
    commit = os.environ.get("FASTDISS_GIT_COMMIT") or _run(["git", "rev-parse", "HEAD"])
    dirty_env = os.environ.get("FASTDISS_GIT_DIRTY")
    if dirty_env is not None:
        dirty = dirty_env.strip().lower() in ("1", "true", "yes")
    else:
        status = _run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                       ":(exclude)benchmarks/results"])
        dirty = None if status is None else bool(status)
    return {"commit": commit or None, "dirty": dirty}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def run_header(name: str, device: torch.device, config: dict | None = None) -> dict:
    """The record at the top of every results file."""
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": name,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git": git_info(),
        "machine": machine_info(device),
        "config": config or {},
    }


# ----------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_ms: Iterable[float], method: str) -> dict:
    vals = sorted(float(t) for t in times_ms)
    if not vals:
        raise ValueError("summarize() needs at least one time")
    return {"median_ms": _quantile(vals, 0.5), "p20_ms": _quantile(vals, 0.2), "p80_ms": _quantile(vals, 0.8),
            "samples": len(vals), "method": method}


def _clear_grads(grad_to_none):
    for x in grad_to_none or ():
        x.grad = None


def time_cpu(fn: Callable, warmup: int = 2, repeats: int = 10, max_time_s: float | None = None,
             grad_to_none=None) -> dict:
    """perf_counter per call after `warmup` calls; stops early after max_time_s (at least 3 runs)."""
    for _ in range(warmup):
        _clear_grads(grad_to_none)
        fn()
    times = []
    t_start = time.perf_counter()
    for i in range(repeats):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if max_time_s is not None and i >= 2 and time.perf_counter() - t_start > max_time_s:
            break
    return summarize(times, "perf_counter")


_L2_FLUSH: dict = {}


def time_cuda_events(fn: Callable, warmup_ms: float = 25, rep_ms: float = 100, grad_to_none=None,
                     device: torch.device | None = None) -> dict:
    """Fallback when triton is absent: CUDA events around each call, L2 flushed before each."""
    device = torch.device(device or "cuda")
    key = str(device)
    if key not in _L2_FLUSH:
        _L2_FLUSH[key] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    flush = _L2_FLUSH[key]
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        _clear_grads(grad_to_none)
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda_events")


def time_gpu(fn: Callable, warmup_ms: float = 25, rep_ms: float = 100, grad_to_none=None,
             device: torch.device | None = None) -> dict:
    """Median and 20/80 percentiles from triton.testing.do_bench (device events, L2 flushed)."""
    try:
        from triton.testing import do_bench
    except Exception:
        return time_cuda_events(fn, warmup_ms, rep_ms, grad_to_none, device)
    with torch.cuda.device(device or torch.cuda.current_device()):
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                 quantiles=list(QUANTILES))
    return {"median_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80), "samples": None,
            "method": "triton.do_bench"}


def time_fn(fn: Callable, device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_warmup: int = 2, cpu_repeats: int = 10, cpu_max_time_s: float | None = 5.0,
            grad_to_none=None) -> dict:
    """Kernel-style timing on either device (see time_gpu / time_cpu)."""
    if torch.device(device).type == "cuda":
        return time_gpu(fn, warmup_ms, rep_ms, grad_to_none, device)
    return time_cpu(fn, cpu_warmup, cpu_repeats, cpu_max_time_s, grad_to_none)


def wall_clock(fn: Callable, device: torch.device, warmup: int = 1, repeats: int = 5) -> dict:
    """End-to-end host time per call with the device synchronised before and after each call
    (sampler latency: includes launch gaps and host work, unlike event timing)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, "wall_clock_sync")


def peak_memory(fn: Callable, device: torch.device) -> int | None:
    """Bytes allocated by one call of fn above what was allocated before it (its working memory
    and outputs); None on CPU, where torch keeps no such counter."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


# ----------------------------------------------------------------------------- errors and files

def error_text(exc: BaseException, limit: int = 800) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:limit]}"


def is_fatal_cuda_error(exc: BaseException) -> bool:
    """Errors after which the CUDA context is unusable, so later GPU measurements would be junk."""
    text = str(exc).lower()
    return any(s in text for s in ("illegal memory access", "device-side assert", "unspecified launch failure",
                                   "misaligned address", "illegal instruction"))


def release_memory(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:
            pass


def results_path(name: str, tag: str, out_dir: str | Path | None = None) -> Path:
    return Path(out_dir or RESULTS_DIR) / f"{name}-{tag}.json"


def _jsonable(obj):
    """Plain JSON: NaN/inf -> None, tuples -> lists, dtypes/devices/paths -> str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _jsonable(obj.item())
    return str(obj)


def write_json(obj, path: str | Path) -> Path:
    """Write JSON atomically (fastdiss.atomic): a reader never sees a half-written file."""
    from fastdiss.atomic import write_bytes
    path = Path(path)
    write_bytes(path, (json.dumps(_jsonable(obj), indent=1, sort_keys=False, allow_nan=False) + "\n").encode())
    return path


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
