"""Ahead-of-time compilation of the Triton kernels for given GPU architectures, without a GPU.

Why: the CPU CI runs the kernels only under the interpreter, which accepts code that the real
compiler rejects (or that needs more shared memory than the GPU has). Compiling every kernel for
sm_80 and sm_90 here (Triton -> PTX -> cubin with the bundled ptxas) catches that.

Contract for kernel modules: each module in fastdiss.kernels that defines @triton.jit kernels
exposes `aot_specs() -> list[spec]`, a spec being a tuple
    (name, kernel, signature, constexprs)  or  (name, kernel, signature, constexprs, options)
- name: unique label, e.g. "attn_fwd_bf16_d64";
- kernel: the @triton.jit function (an autotuned/heuristics wrapper is unwrapped);
- signature: {arg_name: type} for EVERY argument in order, types like "*fp32", "*bf16", "*u8",
  "i32", "i64", "fp32", and "constexpr" for the constexpr arguments (`make_signature` builds it);
- constexprs: {arg_name: value} for the constexpr arguments;
- options: optional {"num_warps": 4, "num_stages": 3}, the launch config the launcher uses.
A @triton.jit function that is only called from other kernels (a device helper) needs no spec.

Run: python -m fastdiss.kernels._aot [--archs 80,90] [--shard 0/2] (TRITON_INTERPRET must be unset:
kernels defined under the interpreter cannot be compiled).
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import sys
import time

# Largest shared memory one block may use (opt-in), by compute capability major*10 + minor.
SHARED_MEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def make_signature(fn, constexprs: dict, pointers: dict, scalars: dict | None = None, default: str = "i32") -> dict:
    """Signature for `fn` in argument order: constexprs -> "constexpr", `pointers` names -> "*<elem>",
    `scalars` names -> their type, the rest (strides, sizes) -> `default`. Names a kernel lacks are ignored,
    so a module can share one pointer table across its kernels."""
    fn = _unwrap(fn)
    scalars = scalars or {}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = scalars.get(name, default)
    return sig


def _unwrap(fn):
    """The JITFunction inside triton.autotune / triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"expected a @triton.jit kernel, got {type(fn).__name__} (is TRITON_INTERPRET set?)")
    return fn


def compile_for(fn, signature: dict, constexprs: dict, arch: int, options: dict | None = None):
    """Compile `fn` for CUDA compute capability `arch` (80, 90, ...); returns Triton's compiled kernel
    (`.asm["ptx"]`, `.asm["cubin"]`, `.metadata.shared`). Pointer arguments are assumed 16-byte aligned,
    as Triton specialises them at run time for torch allocations."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _unwrap(fn)
    if list(signature) != list(fn.arg_names):
        raise ValueError(f"signature for {fn.__name__} must list every argument in order {fn.arg_names}, "
                         f"got {list(signature)}")
    for name, ty in signature.items():
        if (ty == "constexpr") != (name in constexprs):
            raise ValueError(f"{fn.__name__}: argument {name!r} has type {ty!r} in the signature but is "
                             f"{'' if name in constexprs else 'not '}in constexprs; constexpr args need both")
    attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values()) if ty.startswith("*")}
    src = ASTSource(fn=fn, signature=dict(signature), constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options=dict(options or {}))


def check_compiled(name: str, compiled, arch: int) -> dict:
    """Raise if PTX or cubin is missing or the kernel needs more shared memory than `arch` has."""
    ptx, cubin = compiled.asm.get("ptx", ""), compiled.asm.get("cubin", b"")
    if not ptx or not cubin:
        raise RuntimeError(f"{name} for sm_{arch}: empty {'PTX' if not ptx else 'cubin'}")
    shared = int(getattr(compiled.metadata, "shared", 0))
    limit = SHARED_MEM_LIMIT.get(int(arch))
    if limit is not None and shared > limit:
        raise RuntimeError(f"{name} for sm_{arch} needs {shared} bytes of shared memory, the GPU has {limit}: "
                           "use smaller blocks or fewer stages")
    return {"ptx_chars": len(ptx), "cubin_bytes": len(cubin), "shared_bytes": shared}


def _kernels_in(module) -> dict:
    """{name: JITFunction} for the Triton functions defined in `module` itself."""
    from triton.runtime.jit import KernelInterface

    found = {}
    for attr, obj in vars(module).items():
        if isinstance(obj, KernelInterface):
            fn = _unwrap(obj)
            if getattr(fn.fn, "__module__", None) == module.__name__:
                found[attr] = fn
    return found


def collect_specs(package: str = "fastdiss.kernels"):
    """All specs of all kernel modules, after checking each module that defines @triton.jit kernels
    has aot_specs covering every kernel (a jit function may instead be a helper called by a covered one)."""
    specs, problems = [], []
    try:
        pkg = importlib.import_module(package)
    except Exception as e:
        return specs, [f"{package} failed to import: {type(e).__name__}: {e}"]
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{package}.{info.name}")
        except Exception as e:
            problems.append(f"{package}.{info.name} failed to import: {type(e).__name__}: {e}")
            continue
        kernels = _kernels_in(module)
        if not hasattr(module, "aot_specs"):
            if kernels:
                problems.append(f"{module.__name__} defines Triton kernels {sorted(kernels)} but no aot_specs()")
            continue
        try:
            mod_specs = [tuple(s) for s in module.aot_specs()]
        except Exception as e:
            problems.append(f"{module.__name__}.aot_specs() raised {type(e).__name__}: {e}")
            continue
        covered = {id(_unwrap(s[1])) for s in mod_specs}
        sources = " ".join(_unwrap(s[1]).src for s in mod_specs)
        for attr, fn in kernels.items():
            if id(fn) not in covered and not re.search(rf"\b{re.escape(fn.__name__)}\b", sources):
                problems.append(f"{module.__name__}.{attr} is neither in aot_specs() nor called by a kernel that is")
        for s in mod_specs:
            if len(s) not in (4, 5):
                problems.append(f"{module.__name__}: spec {s[0] if s else s!r} must be (name, kernel, signature, "
                                "constexprs[, options])")
                continue
            specs.append((f"{info.name}.{s[0]}",) + s[1:4] + ((s[4] if len(s) == 5 else {}),))
    names = [s[0] for s in specs]
    problems += [f"duplicate spec name {n}" for n in sorted({n for n in names if names.count(n) > 1})]
    return specs, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="80,90", help="comma-separated compute capabilities")
    parser.add_argument("--shard", default="0/1", help="i/n: compile only specs with index %% n == i")
    parser.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",") if a.strip()]
    shard, nshards = (int(x) for x in args.shard.split("/"))

    t0 = time.perf_counter()
    specs, problems = collect_specs()
    if shard != 0:
        problems = []  # reported once, by shard 0
    results, failures = [], []
    for i, (name, fn, sig, const, options) in enumerate(specs):
        if i % nshards != shard:
            continue
        for arch in archs:
            t = time.perf_counter()
            try:
                info = check_compiled(name, compile_for(fn, sig, const, arch, options), arch)
                results.append(dict(name=name, arch=arch, seconds=round(time.perf_counter() - t, 2), **info))
            except Exception as e:  # report every failure, not just the first
                failures.append(f"{name} sm_{arch}: {type(e).__name__}: {e}"[:2000])
    report = dict(specs=len(specs), compiled=results, failures=failures, problems=problems,
                  seconds=round(time.perf_counter() - t0, 2))
    if args.json:
        print(json.dumps(report))
    else:
        for r in results:
            print(f"ok   {r['name']:<48} sm_{r['arch']}  {r['seconds']:5.2f}s  shared={r['shared_bytes']}")
        for f in problems + failures:
            print(f"FAIL {f}")
        print(f"{len(results)} compiled, {len(failures) + len(problems)} problems, {report['seconds']}s")
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
