"""Streaming reader for the user's own parallel data: `src<TAB>tgt` TSV (optionally .gz) or `x.src`/`x.tgt`.

Malformed input stops with a `DataError` (a ValueError) naming the file and the 1-based line, so a bad
line in a million-line file is found without a debugger: wrong column count, invalid UTF-8, an empty
side, parallel files of different lengths, a missing file.
"""
from __future__ import annotations

import gzip
import os
from itertools import zip_longest
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """Malformed data file; `.path` and `.line` (1-based, or None) locate the problem."""

    def __init__(self, path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}")


class MissingDataFileError(DataError, FileNotFoundError):
    """A data file does not exist (also catchable as FileNotFoundError)."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the line ending) for each line; strict UTF-8, a leading BOM dropped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, f"invalid UTF-8 at byte {e.start} of the line "
                                              f"({raw[e.start:e.start + 4]!r}); save the file as UTF-8") from None


def _read_tsv(path: Path) -> Iterator[tuple[str, str]]:
    for lineno, line in _lines(path):
        cols = line.split("\t")
        if len(cols) != 2:
            what = "an empty line" if not line.strip() else f"{len(cols)} tab-separated column(s)"
            raise DataError(path, lineno, f"expected 2 tab-separated columns (src<TAB>tgt), found {what}")
        src, tgt = cols[0].strip(), cols[1].strip()
        if not src:
            raise DataError(path, lineno, "empty source side (column 1)")
        if not tgt:
            raise DataError(path, lineno, "empty target side (column 2)")
        yield src, tgt


def _read_parallel(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
    n = 0
    for s, t in zip_longest(_lines(src_path), _lines(tgt_path)):
        if s is None or t is None:
            short, long_ = (src_path, tgt_path) if s is None else (tgt_path, src_path)
            raise DataError(short, n + 1, f"file ended after {n} lines but {long_} has more: "
                                          "parallel files must have the same number of lines")
        n = s[0]
        if not s[1].strip():
            raise DataError(src_path, n, "empty source line")
        if not t[1].strip():
            raise DataError(tgt_path, n, "empty target line")
        yield s[1].strip(), t[1].strip()


def _require(path: Path) -> Path:
    if not path.is_file():
        raise MissingDataFileError(path, None, "file not found")
    return path


def read_pairs(path_or_prefix: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Iterates (src, tgt) pairs, one line at a time. Accepts a TSV file (`src<TAB>tgt` per line, .gz
    allowed), one of two parallel files (`x.src` or `x.tgt`), or their common prefix `x`. Surrounding
    whitespace of each side is stripped. Paths are checked now, lines while iterating."""
    if not isinstance(path_or_prefix, (str, os.PathLike)):
        raise TypeError(f"path_or_prefix: expected a path (str or PathLike), got {type(path_or_prefix).__name__}")
    p = Path(path_or_prefix)
    if p.suffix in (".src", ".tgt"):
        base = p.with_suffix("")
        return _read_parallel(_require(Path(f"{base}.src")), _require(Path(f"{base}.tgt")))
    if p.is_file():
        return _read_tsv(p)
    src, tgt = Path(f"{p}.src"), Path(f"{p}.tgt")
    if src.is_file() or tgt.is_file():
        return _read_parallel(_require(src), _require(tgt))
    raise MissingDataFileError(p, None, f"file not found (also tried the parallel files {src} and {tgt})")
