"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (PTX and cubin, shared memory within
the GPU's limit), so a kernel that only works under the interpreter fails CI.

Runs `python -m fastdiss.kernels._aot` in 2 subprocesses (half the specs each) without TRITON_INTERPRET:
kernels defined under the interpreter cannot be compiled. Triton's on-disk cache makes reruns fast.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)
SHARDS = 2


@pytest.mark.slow
def test_all_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastdiss.kernels._aot", "--json", "--archs", ",".join(map(str, ARCHS))]
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/{SHARDS}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(SHARDS)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert out.strip(), f"AOT compile produced no report (exit {p.returncode}):\n{err[-4000:]}"
        reports.append(json.loads(out.strip().splitlines()[-1]))

    problems = [x for r in reports for x in r["problems"] + r["failures"]]
    assert not problems, "AOT compile problems:\n" + "\n".join(problems)
    compiled = [c for r in reports for c in r["compiled"]]
    n_specs = reports[0]["specs"]
    assert any(c["name"].startswith("attention.") for c in compiled)
    assert sorted((c["name"], c["arch"]) for c in compiled) == sorted(
        {(c["name"], a) for c in compiled for a in ARCHS}), "each spec must be built for every arch"
    assert len(compiled) == n_specs * len(ARCHS)
    for c in compiled:
        assert c["ptx_chars"] > 0 and c["cubin_bytes"] > 0, c
    print(f"AOT: {n_specs} specs x {len(ARCHS)} archs in {max(r['seconds'] for r in reports):.1f}s "
          f"({SHARDS} processes)")
