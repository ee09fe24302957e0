"""The command line's dealings with the user's files: reading input lines, pair files and
checkpoints, and writing outputs, with every user mistake (a missing or unreadable file, bad UTF-8,
an empty line, an over-long input) turned into a CLIError: one line on stderr and exit code 2 in
fastdiss.cli, never a traceback."""
from __future__ import annotations

import os
import sys


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def warn(message: str) -> None:
    """A user-facing warning: one line on stderr (printed, not through `warnings`, so it is never
    filtered or deduplicated)."""
    print(f"fastdiss: warning: {message}", file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    """Output text on one line: byte-level BPE can decode to any character, including line breaks
    (\r, \x85, \u2028, ...), which would shift every later output against its input line."""
    return " ".join(text.splitlines())


def os_error(path, e: OSError) -> CLIError:
    if isinstance(e, FileNotFoundError):
        return CLIError(f"{path}: file not found")
    if isinstance(e, IsADirectoryError):
        return CLIError(f"{path}: is a directory, expected a file")
    if isinstance(e, PermissionError):
        return CLIError(f"{path}: cannot read the file (permission denied)")
    return CLIError(f"{path}: cannot read the file ({e.strerror or e})")


def read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 text file ('-' = stdin), one sentence each. Bad UTF-8 and empty lines are
    errors that name the file and line."""
    name = "<stdin>" if path == "-" else path
    try:
        f = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as e:
        raise os_error(name, e) from None
    lines = []
    try:
        for lineno, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CLIError(f"{name}:{lineno}: invalid UTF-8 at byte {e.start} of the line; "
                               f"save the file as UTF-8") from None
            if not text.strip():
                raise CLIError(f"{name}:{lineno}: empty line; every line must hold one sentence")
            lines.append(text.strip())
    except OSError as e:
        raise os_error(name, e) from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    if not lines:
        raise CLIError(f"{name}: no input lines")
    return lines


def read_pairs_or_fail(path: str) -> list[tuple[str, str]]:
    """All pairs of a user TSV / parallel-file set, with loader errors turned into one-line CLI errors."""
    import gzip
    import zlib

    from fastdiss.data.loader import DataError, read_pairs
    gz_fix = "compress it again (gzip FILE) or give the uncompressed file"
    try:
        pairs = list(read_pairs(path))
    except DataError as e:
        raise CLIError(str(e)) from None
    except gzip.BadGzipFile as e:   # a .gz name on other bytes, or a damaged checksum
        what = "is not a gzip file" if "Not a gzipped file" in str(e) else "is a damaged gzip file (checksum)"
        raise CLIError(f"{path}: {what}; {gz_fix}") from None
    except EOFError:   # gzip stream cut short (an interrupted copy or download)
        raise CLIError(f"{path}: the gzip file is cut short (it ends before its end-of-stream marker); "
                       f"{gz_fix}") from None
    except zlib.error:
        raise CLIError(f"{path}: the gzip file is damaged (its compressed data cannot be decoded); {gz_fix}") from None
    except OSError as e:
        raise os_error(path, e) from None
    if not pairs:
        raise CLIError(f"{path}: no sentence pairs")
    return pairs


def load_checkpoint(path: str | None, device: str = "cpu"):
    """A checkpoint file, a shipped-model folder (model.safetensors + config.json), or with no path
    the model shipped with fastdiss (fastdiss.pretrained.DEFAULT_MODEL)."""
    from fastdiss import checkpoint, pretrained
    if path is None or (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))):
        try:
            return pretrained.load_pretrained(path, device)
        except pretrained.PretrainedError as e:
            raise CLIError(str(e)) from None
    if not os.path.exists(path):
        raise CLIError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        hint = [f for f in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, f))]
        raise CLIError(f"{path}: is a directory; pass a checkpoint file"
                       + (f" such as {os.path.join(path, hint[0])}" if hint else ""))
    try:
        ck = checkpoint.load(path, map_location=device)
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    if ck.tokenizer is None or isinstance(ck.tokenizer, str):
        raise CLIError(f"{path}: the checkpoint holds no usable tokenizer; it cannot turn text into ids")
    return ck


def encode_sources(tokenizer, lines: list[str], max_len: int, strict: bool = False,
                   what: str = "input") -> list[list[int]]:
    """Token ids per line, truncated to max_len tokens with one warning (or refused when strict)."""
    ids = tokenizer.encode_batch(lines) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(x) for x in lines]
    long = [i for i, x in enumerate(ids) if len(x) > max_len]
    if long:
        first = long[0]
        msg = (f"{len(long)} {what} line(s) are longer than the model's max_len={max_len} tokens "
               f"(first: line {first + 1}, {len(ids[first])} tokens)")
        if strict:
            raise CLIError(msg + "; shorten them or drop --strict-length to truncate")
        warn(msg + "; truncated to the first max_len tokens")
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise CLIError(f"{what} line {empty[0] + 1} encodes to no tokens")
    return [list(x[:max_len]) for x in ids]


def write_text(path: str, text: str) -> None:
    """UTF-8 text written atomically (fastdiss.atomic); a failure is a CLIError naming the file."""
    from fastdiss.atomic import write_bytes
    try:
        write_bytes(path, text.encode("utf-8"))
    except OSError as e:
        raise CLIError(f"{path}: cannot write the output ({e.strerror or e})") from None
