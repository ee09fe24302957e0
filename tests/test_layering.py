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


def test_no_import_cycle_inside_fastdiss_even_through_imports_inside_functions():
    """Every `from fastdiss.X import ...` / `import fastdiss.X`, at the top or inside a function, is an
    edge X -> module; the graph of fastdiss's own modules (not counting a package and its own
    submodules) has no cycle."""
    import fastdiss
    root = Path(fastdiss.__file__).parent
    modules = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root).with_suffix("").parts
        name = ".".join(("fastdiss",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        modules[name] = f
    edges = {}
    for name, f in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("fastdiss"):
                targets |= {c for c in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if c in modules}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        edges[name] = {t for t in targets if not name.startswith(t + ".") and not t.startswith(name + ".") and t != name}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    assert len(modules) > 25
    for m in sorted(modules):
        if m not in state:
            visit(m)
