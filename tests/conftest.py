"""Test setup: the Triton interpreter is switched on before any kernel is defined (CPU machines),
seeds are fixed, and markers select GPU-only tests."""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede `import fastdiss.kernels`

import torch  # noqa: E402



@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Fixed seed; one intra-op thread: the test shapes are tiny and gain nothing from a second thread,
    while on a busy 2-core machine OpenMP's spinning threads slow small ops down many times over."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device():
    return torch.device("cuda" if _HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_backend():
    """Route fastdiss ops through the Triton kernels (the interpreter on CPU) for one test."""
    import fastdiss
    before = fastdiss.get_backend()
    fastdiss.set_backend("triton")
    yield
    fastdiss.set_backend(before)
