"""fastdiss.atomic: the one way files are written for keeps, and the cleanup of what a kill leaves."""
import os

import pytest
import torch

from fastdiss import atomic, checkpoint, runlock
from fastdiss.config import preset
from fastdiss.model import Denoiser


def test_write_bytes_and_streaming_writer(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    atomic.write_bytes(path, b"one")
    assert path.read_bytes() == b"one" and (path.stat().st_mode & 0o777) == 0o644
    atomic.write_with(path, lambda f: torch.save({"x": torch.arange(3)}, f))
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.bin"]


def test_failed_writer_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    atomic.write_bytes(path, b"old")

    def torn(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_with(path, torn)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.txt"]


def test_checkpoint_temporaries_are_what_runlock_removes(tmp_path, monkeypatch):
    """A kill between the temporary's write and its rename leaves a file remove_leftovers knows."""
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(os, "unlink", lambda *a: None)   # the kill also skips the cleanup
    cfg = preset("tiny")
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "last.pt", Denoiser(cfg.model, 50, 0), cfg, None)
    monkeypatch.undo()
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".last.pt.") and left[0].endswith(".tmp")
    with runlock.hold(tmp_path):
        assert runlock.remove_leftovers(str(tmp_path)) == left
