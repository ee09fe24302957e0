"""Compile check of the CUDA sources, so CUDA code that does not compile fails CI on machines without a
GPU and with a CPU build of torch: every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90, and the
torch glue csrc/cuda/*.cpp with the host compiler, with the flags setup.py uses.

The kernels (step_kernels.cu) need nothing but the CUDA toolkit. The glue (step_cuda.cpp) uses c10/cuda
(current stream, device guard), whose headers a CPU wheel ships except one that torch's build generates,
c10/cuda/impl/cuda_cmake_macros.h (a single #define); we supply it when it is missing. No ATen/cuda
header is used: those need cuBLAS/cuSPARSE headers that a bare CUDA toolkit lacks."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
GLUE_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
ARCHS = ("80", "90")
HALF_FLAGS = ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def find_nvcc():
    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")


def torch_cxx_standard():
    """The C++ standard torch's headers need, as its CMake config declares it (17 if it says nothing)."""
    config = Path(torch.utils.cmake_prefix_path) / "Torch" / "TorchConfig.cmake"
    match = re.search(r"CXX_STANDARD\s+(\d+)", config.read_text()) if config.exists() else None
    return match.group(1) if match else "17"


def common_flags(tmp_path):
    """-std, the C++ ABI of this torch, WITH_CUDA, and include dirs: torch, CUDA, the c10/cuda stub."""
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-I{Path(NVCC).resolve().parent.parent / 'include'}")
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in cpp_extension.include_paths()):
        header = tmp_path / "c10_stub" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        header.parent.mkdir(parents=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")  # as torch's CUDA builds generate it
        includes.append(f"-I{tmp_path / 'c10_stub'}")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [f"-std=c++{torch_cxx_standard()}", abi, "-DWITH_CUDA", *includes]


def compile_ok(command, source):
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"compiling {source.name} failed:\n{' '.join(command)}\n{result.stderr[-6000:]}"
    return result


def test_there_are_cuda_sources():
    assert CU_FILES and GLUE_FILES, "csrc/cuda has no .cu or no .cpp files: nothing would be compile-checked"


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_for_sm80_and_sm90(source, tmp_path):
    """nvcc -c with setup.py's flags (torch's common nvcc flags first, then ours) for both architectures."""
    gencode = [f for a in ARCHS for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    command = [NVCC, "-c", str(source), "-o", str(tmp_path / "out.o"), *common_flags(tmp_path),
               "-Xcompiler", "-fPIC", *cpp_extension.COMMON_NVCC_FLAGS, "-O3", "--use_fast_math", "-lineinfo",
               *HALF_FLAGS, *gencode, "-Xptxas", "-v"]
    result = compile_ok(command, source)
    # ptxas -v names every kernel it compiled and its architecture: each kernel file must have both.
    if "__global__" in source.read_text():
        for arch in ARCHS:
            assert f"for 'sm_{arch}'" in result.stderr, f"no sm_{arch} kernels compiled from {source.name}"


@needs_nvcc
@pytest.mark.parametrize("source", GLUE_FILES, ids=lambda p: p.name)
def test_cuda_glue_compiles_with_the_host_compiler(source, tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    command = [cxx, "-c", str(source), "-o", str(tmp_path / "out.o"), "-fPIC", *common_flags(tmp_path)]
    compile_ok(command, source)
