"""`fastdiss env`: what this installation runs on and which implementation each op uses.

The first thing to paste into a bug report, and the quick check after an install: versions (python,
torch, triton, CUDA), the GPU, what the extension fastdiss._C was built with, the backend
(fastdiss.set_backend / FASTDISS_BACKEND), and for every op of fastdiss.functional the code that runs
on CPU tensors and on CUDA tensors.
"""
from __future__ import annotations

import json
import platform
import sys

# functional op -> (custom op behind it, kind). "triton": a torch.library custom op whose CUDA kernel
# launches Triton and whose CPU kernel is the PyTorch reference (eager CUDA calls reach the same
# Triton launchers through an autograd.Function, which costs less host time); "cpp": an op of fastdiss._C.
OPS = {
    "attention": ("attention_fwd", "triton"),
    "layer_norm": ("layer_norm_fwd", "triton"),
    "q_sample": ("q_sample_fwd", "triton"),
    "embed_and_noise": ("embed_and_noise_fwd", "triton"),
    "self_cond_project": ("self_cond_project_fwd", "triton"),
    "rounding_cross_entropy": ("rounding_ce_fwd", "triton"),
    "ddim_step": ("ddim_step", "cpp"),
}


def _has_kernel(op: str, key: str) -> bool:
    import torch
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiss::{op}", key))
    except Exception:  # op not registered (kernels not importable, extension missing)
        return False


def op_implementations() -> dict[str, dict[str, str]]:
    """{op: {"cpu": description, "cuda": description}} for the current backend and build."""
    from fastdiss import _ext
    from fastdiss.kernels import _backend

    try:
        import fastdiss.kernels  # noqa: F401  (registers the Triton custom ops)
    except Exception:
        pass
    backend, has_triton, interp = _backend.get_backend(), _backend.triton_available(), _backend.interpreter_enabled()
    out = {}
    for name, (op, kind) in OPS.items():
        if kind == "cpp":
            if not _ext.available():
                cpu = cuda = "PyTorch reference (fastdiss._C not built)"
            else:
                cpu = "C++ op (at::parallel_for)" if _has_kernel(op, "CPU") else "missing CPU kernel in fastdiss._C"
                cuda = ("CUDA op (fastdiss._C)" if _has_kernel(op, "CUDA") else
                        "none: fastdiss._C was built without CUDA (rebuild on a machine with nvcc)")
        else:
            if backend == "torch":
                cpu = cuda = "PyTorch reference (backend 'torch')"
            elif not has_triton:
                cpu = cuda = "PyTorch reference (triton not installed)"
            else:
                cuda = "Triton kernel" if _has_kernel(op, "CUDA") else "PyTorch reference (no CUDA kernel registered)"
                if backend == "triton":
                    cpu = ("Triton kernel under the interpreter (TRITON_INTERPRET=1)" if interp else
                           "error: backend 'triton' on CPU needs TRITON_INTERPRET=1")
                else:
                    cpu = "PyTorch reference"
        out[name] = {"cpu": cpu, "cuda": cuda}
    return out


def collect() -> dict:
    """Everything `fastdiss env` reports, as a JSON-ready dict."""
    import torch

    import fastdiss
    from fastdiss import _ext
    from fastdiss.kernels import _backend

    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:
        triton_version = f"not installed ({type(e).__name__})"
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        caps = [".".join(map(str, torch.cuda.get_device_capability(i))) for i in range(torch.cuda.device_count())]
    else:
        gpus, caps = [], []
    return {
        "fastdiss": fastdiss.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "cuda_available": torch.cuda.is_available(),
        "gpu": ", ".join(gpus) if gpus else "none",
        "gpu_capability": ", ".join(caps) if caps else "none",
        "cpu_threads": torch.get_num_threads(),
        "extension": _ext.build_info(),
        "backend": _backend.get_backend(),
        "triton_interpreter": _backend.interpreter_enabled(),
        "ops": op_implementations(),
    }


def format_report(info: dict) -> str:
    ext = info["extension"]
    if ext.get("available"):
        ext_line = ", ".join(f"{k}={v}" for k, v in ext.items() if k != "available")
        ext_line = f"built ({ext_line})"
    else:
        ext_line = f"not available ({ext.get('error')}); build with `pip install --no-build-isolation -e .`"
    lines = [
        f"fastdiss    {info['fastdiss']}",
        f"python      {info['python']} ({info['platform']})",
        f"torch       {info['torch']} (CPU threads: {info['cpu_threads']})",
        f"triton      {info['triton']}{' (interpreter on: TRITON_INTERPRET=1)' if info['triton_interpreter'] else ''}",
        f"CUDA        {info['cuda']}{'' if info['cuda_available'] else ' (no usable GPU)'}",
        f"GPU         {info['gpu']}"
        + (f" (compute capability {info['gpu_capability']})" if info["gpu"] != "none" else ""),
        f"fastdiss._C {ext_line}",
        f"backend     {info['backend']} (set with fastdiss.set_backend or FASTDISS_BACKEND=auto|triton|torch)",
        "ops:",
    ]
    width = max(len(n) for n in info["ops"])
    for name, impl in info["ops"].items():
        lines.append(f"  {name:<{width}}  cpu: {impl['cpu']}; cuda: {impl['cuda']}")
    return "\n".join(lines)


def main(argv=None, as_json: bool | None = None) -> int:
    if as_json is None:
        import argparse
        p = argparse.ArgumentParser(prog="fastdiss env", description=__doc__.splitlines()[0])
        p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
        as_json = p.parse_args(argv).json
    info = collect()
    print(json.dumps(info, indent=1) if as_json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
