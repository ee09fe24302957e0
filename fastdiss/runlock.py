"""One training per output folder: an advisory lock on OUT/.fastdiss-train.lock.

Two trainings writing the same last.pt would overwrite each other's checkpoints and logs, so the second
one is refused (RunDirBusy, exit 2 in the CLI). The lock is fcntl.flock on a file descriptor held open
for the life of the run: the kernel drops it when the process ends in any way (exit, exception,
SIGKILL, power loss), so a killed run never leaves the folder locked and nothing needs a stale-lock
timeout. The file itself is never deleted (deleting a lock file races with a process opening it); it
holds the pid, host and start time of the last holder, for the error message only.

The lock is re-entrant within one process (the CLI takes it before it looks at the folder, and the
training loop it calls takes it again). Under torchrun only rank 0 takes it: the ranks of one run share
the folder by design. On platforms without fcntl (Windows) there is no lock.

With the lock held, the temporary files of atomic writes that a killed run left behind
(`last.pt.XXXX.tmp`, ...) belong to no live writer, and `remove_leftovers` deletes them.
"""
from __future__ import annotations

import contextlib
import glob
import os
import socket
import time

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

LOCK_NAME = ".fastdiss-train.lock"
_held: dict[str, int] = {}   # realpath of a lock file -> nesting depth in this process


class RunDirBusy(RuntimeError):
    """Another live process trains into the same output folder."""


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(200).strip()
    except OSError:
        return "another process"
    return text or "another process"


@contextlib.contextmanager
def hold(out_dir: str):
    """Hold the training lock of `out_dir` (created if missing) for the body of the `with`; raise
    RunDirBusy at once (no waiting) when a live process holds it."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    key = os.path.realpath(path)
    if fcntl is None or key in _held:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(f"{out_dir} is in use by a training that is still running ({_holder(path)}); wait "
                             f"for it to finish or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)   # releases the flock; the kernel does the same when the process dies


def discard_if_unused(out_dir: str) -> None:
    """Remove a folder that holds nothing but the lock file: a training that failed before writing
    anything leaves no trace (call with the lock held, for a folder this run created)."""
    with contextlib.suppress(OSError):
        if os.listdir(out_dir) == [LOCK_NAME]:
            os.unlink(os.path.join(out_dir, LOCK_NAME))
            os.rmdir(out_dir)


def is_rank0() -> bool:
    """True unless this process is a non-zero rank of a torchrun job."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def hold_if_rank0(out_dir: str):
    return hold(out_dir) if is_rank0() else contextlib.nullcontext()


# the temporary names of fastdiss.atomic (.NAME.XXXXXX.tmp: checkpoints, the log, the CLI's run.json)
# for the files a training writes, and those of releases before it (NAME.XXXXXX.tmp)
_LEFTOVER_PATTERNS = (".*.pt.*.tmp", ".*.jsonl.*.tmp", ".*.json.*.tmp", "*.pt.*.tmp", "*.jsonl.*.tmp")


def remove_leftovers(out_dir: str) -> list[str]:
    """Delete the temporary files of atomic writes that a killed run left in `out_dir`. Call only with
    the lock held: then no live process is writing them. Returns the names removed."""
    removed = []
    for pattern in _LEFTOVER_PATTERNS:
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.unlink(path)
                removed.append(os.path.basename(path))
    return sorted(removed)
