"""Builds fastdiss: the Python package, fastdiss.kernels (from kernels/), and the extension fastdiss._C.

C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu, plus the torch
glue csrc/cuda/*.cpp for the host compiler) are built when torch has CUDA and nvcc is found (or
FASTDISS_FORCE_CUDA=1), for the architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX").
FASTDISS_NO_EXT=1 installs the pure-Python package.
MAX_JOBS limits parallel compile jobs (read by torch's ninja build).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _log(msg):
    print(f"[fastdiss setup] {msg}", file=sys.stderr, flush=True)


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def ext_modules_and_cmdclass():
    if os.environ.get("FASTDISS_NO_EXT", "0") == "1":
        _log("FASTDISS_NO_EXT=1: skipping the C++/CUDA extension (pure-Python install)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # building metadata without torch
        _log(f"torch not importable ({e}); skipping the extension. Install torch, then "
             "`pip install --no-build-isolation -e .`")
        return [], {}

    cpp_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))
                       + glob.glob(os.path.join(HERE, "csrc", "sampler", "*.cpp")))
    cu_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    cuda_glue_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))  # host code, needs CUDA headers
    if not cpp_sources:
        _log("no C++ sources under csrc/: skipping the extension")
        return [], {}

    force_cuda = os.environ.get("FASTDISS_FORCE_CUDA", "0") == "1"
    nvcc = CUDA_HOME and (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    with_cuda = bool(cu_sources) and (torch.version.cuda is not None and bool(nvcc) or force_cuda)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if with_cuda and not archs:
        archs = DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    build_info = f"torch={torch.__version__};cuda={'yes' if with_cuda else 'no'};archs={archs if with_cuda else 'none'}"

    # No -std flag: torch's BuildExtension adds the C++ standard its own headers need (C++20 for recent torch).
    # -Wno-unknown-pragmas: torch's CPU vector headers use "#pragma unroll", which GCC does not know.
    cxx = ["-O3", "-Wno-unknown-pragmas", f'-DFASTDISS_BUILD_INFO="{build_info}"']
    if with_cuda:
        _log(f"building fastdiss._C: C++ ({len(cpp_sources)} files) + CUDA ({len(cu_sources)} .cu, "
             f"{len(cuda_glue_sources)} .cpp files) for TORCH_CUDA_ARCH_LIST={archs}")
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "-DWITH_CUDA",
                      f'-DFASTDISS_BUILD_INFO="{build_info}"',
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        ext = CUDAExtension("fastdiss._C", cpp_sources + cuda_glue_sources + cu_sources,
                            extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": nvcc_flags})
    else:
        why = ("no .cu sources" if not cu_sources else
               "torch is a CPU build" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)")
        _log(f"building fastdiss._C: C++ only ({len(cpp_sources)} files); CUDA skipped: {why}")
        ext = CppExtension("fastdiss._C", cpp_sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    name="fastdiss",
    version="0.1.0",
    description="Few-step self-conditioned embedding diffusion for seq2seq (FastDiSS), with Triton kernels and a C++ sampler",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdiss", "fastdiss.*"]) + ["fastdiss.kernels"],
    package_dir={"fastdiss.kernels": "kernels"},
    package_data={"fastdiss.data": ["corpora/*.tsv.gz", "corpora/*.json", "corpora/*.md"],
                  "fastdiss": ["pretrained/*/*.json", "pretrained/*/*.safetensors"]},
    include_package_data=True,
    install_requires=["torch>=2.4", "numpy", "tokenizers", "sacrebleu", "tqdm", "safetensors"],
    extras_require={"kernels": ["triton"], "bench": ["matplotlib", "pytest-benchmark"]},
    entry_points={"console_scripts": ["fastdiss=fastdiss.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
