"""Loads the compiled extension fastdiss._C, or explains how to build it.

`import fastdiss` must work without the extension (pure PyTorch paths), and quietly: the ops that
use it fall back to their PyTorch references, so a warning at import would fire where nothing
needs it. `available()` / `build_info()` say why it is missing (`fastdiss env` prints it), and
code that cannot run without the C++ ops calls `require()`, whose error names the build command.
"""
from __future__ import annotations

import functools

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make test`) in the fastdiss checkout"
_C = None
_error: str | None = None

try:
    import importlib

    _module = importlib.import_module("fastdiss._C")
    importlib.import_module("fastdiss._ops_meta")  # fake impls of the C++ ops (torch.compile / export)
    _C = _module
except Exception as e:  # ImportError, or an ABI mismatch with the installed torch
    _error = f"{type(e).__name__}: {e}"


def available() -> bool:
    return _C is not None


def require(what: str = "this feature") -> None:
    if _C is None:
        raise RuntimeError(f"{what} needs the compiled extension fastdiss._C, which failed to load ({_error}); "
                           f"{_BUILD_HINT}")


def build_info() -> dict:
    """What the extension was built with (torch version, CUDA archs), or why it is missing."""
    if _C is None:
        return {"available": False, "error": _error}
    import torch
    info = {"available": True}
    try:
        info.update(dict(x.split("=", 1) for x in torch.ops.fastdiss.build_info().split(";") if "=" in x))
    except Exception as e:  # older build without build_info
        info["build_info_error"] = str(e)
    return info


def supports(device: "torch.device") -> bool:
    """True if the compiled ops can run on `device` (CPU always when built; CUDA only if built with CUDA)."""
    if _C is None:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return _built_with_cuda()
    return False


@functools.lru_cache(maxsize=None)
def _built_with_cuda() -> bool:
    return build_info().get("cuda") == "yes"
