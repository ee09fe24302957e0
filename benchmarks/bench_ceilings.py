"""The two ceilings every kernel is judged against, measured on this machine.

Copy bandwidth: a large device-to-device copy, counting bytes read plus bytes written; the
practical limit for memory-bound ops (layer norm, noising). Matmul rate: a large bf16 product
(8192^3 on a GPU) in TFLOP/s; the practical limit for attention and the rounding head.
Datasheet numbers are only leads; these are what bench_kernels divides by.

    python -m benchmarks.bench_ceilings            # GPU if present
    python -m benchmarks.bench_ceilings --quick    # small CPU version (seconds)
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks import common

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure_copy(device, mib: int, timing: dict) -> dict:
    n = mib * 1024 * 1024 // 4
    src = torch.randn(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = common.time_fn(lambda: dst.copy_(src), device, **timing)
    if not torch.equal(dst, src):
        raise RuntimeError("copy benchmark: destination differs from source")
    moved = 2 * src.numel() * src.element_size()
    return {"bytes_per_buffer": src.numel() * src.element_size(), "bytes_moved": moved, **t,
            "GBps": moved / (t["median_ms"] * 1e-3) / 1e9}


def measure_matmul(device, n: int, dtype: torch.dtype, timing: dict) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = common.time_fn(lambda: a @ b, device, **timing)
    flops = 2 * n ** 3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops": flops, **t,
            "TFLOPs": flops / (t["median_ms"] * 1e-3) / 1e12}


def run(device, copy_mib: list[int], matmul_n: list[int], matmul_dtypes: list[str], timing: dict) -> dict:
    out = {"copy": [], "matmul": [], "errors": []}
    for mib in copy_mib:
        try:
            out["copy"].append(measure_copy(device, mib, timing))
        except Exception as e:  # recorded, not fatal: the other ceiling may still be measured
            out["errors"].append({"what": f"copy {mib} MiB", "error": common.error_text(e)})
        common.release_memory(device)
    for n in matmul_n:
        for dt in matmul_dtypes:
            try:
                out["matmul"].append(measure_matmul(device, n, DTYPES[dt], timing))
            except Exception as e:
                out["errors"].append({"what": f"matmul {n}^3 {dt}", "error": common.error_text(e)})
            common.release_memory(device)
    rates: dict[str, float] = {}
    for m in out["matmul"]:
        rates[m["dtype"]] = max(rates.get(m["dtype"], 0.0), m["TFLOPs"])
    out["summary"] = {"copy_GBps": max((c["GBps"] for c in out["copy"]), default=None),
                      "matmul_TFLOPs": rates}
    return out


def load_ceilings(tag: str, out_dir=None) -> dict | None:
    """The summary of a ceilings file for this device tag, or None if there is none (or it is broken)."""
    path = common.results_path("ceilings", tag, out_dir)
    try:
        data = common.read_json(path)
        summary = dict(data["summary"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    summary["source"] = str(path)
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--copy-mib", type=int, nargs="+", help="buffer size(s) of the copy, MiB")
    p.add_argument("--matmul-n", type=int, nargs="+", help="matrix size(s) n of the n^3 product")
    p.add_argument("--matmul-dtype", nargs="+", choices=sorted(DTYPES), help="dtype(s) of the product")
    p.add_argument("--out-dir", default=None, help=f"results folder (default {common.RESULTS_DIR})")
    args = p.parse_args(argv)

    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        copy_mib, mm_n, mm_dt = [1024], [8192], ["bfloat16"]
        timing = {"warmup_ms": 50, "rep_ms": 300}
    else:
        copy_mib, mm_n, mm_dt = ([8], [256], ["float32"]) if args.quick else ([64], [1024], ["float32"])
        timing = {"cpu_warmup": 1, "cpu_repeats": 5 if args.quick else 10, "cpu_max_time_s": 5.0}
    copy_mib = args.copy_mib or copy_mib
    mm_n = args.matmul_n or mm_n
    mm_dt = args.matmul_dtype or mm_dt

    t0 = time.perf_counter()
    config = {"copy_mib": copy_mib, "matmul_n": mm_n, "matmul_dtypes": mm_dt, "timing": timing}
    result = {"header": common.run_header("ceilings", device, config)}
    result.update(run(device, copy_mib, mm_n, mm_dt, timing))
    result["elapsed_s"] = time.perf_counter() - t0
    path = common.write_json(result, common.results_path("ceilings", common.device_tag(device), args.out_dir))

    for c in result["copy"]:
        print(f"copy   {c['bytes_per_buffer'] / 2**20:8.0f} MiB  {c['median_ms']:9.3f} ms  "
              f"{c['GBps']:9.1f} GB/s (read+write)")
    for m in result["matmul"]:
        print(f"matmul {m['n']:5d}^3 {m['dtype']:9s} {m['median_ms']:9.3f} ms  {m['TFLOPs']:9.2f} TFLOP/s")
    for e in result["errors"]:
        print(f"ERROR  {e['what']}: {e['error']}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
