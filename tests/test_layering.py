"""The package layering: fastdiss uses fastdiss.kernels, never the other way round, so the kernels
(ops, backend choice, the schedule formulas they compute) stand alone below the library."""
import ast
from pathlib import Path

import fastdiss.kernels

KERNELS = Path(fastdiss.kernels.__file__).parent


def _imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_kernels_import_nothing_from_fastdiss():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) >= 6
    found = {f.name: m for f in files for m in _imported_modules(f) if m == "fastdiss" or m.startswith("fastdiss.")}
    assert not found, f"kernel modules import the library above them: {found}"


def test_library_names_are_the_kernel_package_objects():
    import fastdiss
    from fastdiss import schedule
    from fastdiss.kernels import _backend
    from fastdiss.kernels import schedule as kernel_schedule
    assert fastdiss.set_backend is _backend.set_backend and fastdiss.get_backend is _backend.get_backend
    assert schedule.alpha_sigma is kernel_schedule.alpha_sigma and schedule.SCHEDULES is kernel_schedule.SCHEDULES
