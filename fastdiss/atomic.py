"""Atomic file writes: a temporary file in the same folder, flushed and fsynced, then renamed over
the target (and the folder fsynced), so a crash or a kill leaves the old file or the new one, never
a torn one. Every file fastdiss writes for keeps (checkpoints, logs, exports, shipped models) goes
through here; temporaries are named .NAME.XXXXXX.tmp (runlock.remove_leftovers knows the pattern)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, BinaryIO


def write_with(path: str | os.PathLike, write: Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """Call write(file) on a temporary file next to `path`, then move it into place atomically. The
    file gets `mode` (mkstemp alone would make it 0600); streaming writers such as torch.save need no
    copy of the bytes in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically."""
    write_with(path, lambda f: f.write(data), mode)
