"""Hostile inputs at the command line (issue 17): `generate`, `evaluate` and `train` read files of
random bytes, random UTF-8, very long lines, NUL bytes, CRLF / CR line ends, byte-order marks, TSV
lines with missing or extra columns, parallel files of unequal length, and .gz files that are cut,
damaged or not gzip at all. Each run must end in a result or one clear error (exit 2) --
never a traceback, never a partial output file.

Each verb gets 200 generated inputs, in process (fastdiss.cli.main) against one small checkpoint
built once per module; --steps 1. Whether an input is valid is decided by an oracle written from the
documented input rules (one sentence per line, UTF-8, a leading BOM ignored, no empty lines; TSV: two
tab-separated non-empty columns), and the command must agree with it: a refused valid input or an
accepted invalid one fails the test, as does any output that does not have one line per input.
"""
import contextlib
import gzip
import io
import itertools
import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastdiss import checkpoint as ckpt
from fastdiss import cli
from fastdiss.config import ModelConfig, preset

BOM = b"\xef\xbb\xbf"
WORDS = "thou shalt not kill thee ye hath said unto them and the lord god spake light day night".split()
EXAMPLES = 200
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------------------- inputs

ODD = ["\x00", "\t", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u00a0", "\ufeff", "\r", "é", "日", "🙂", " "]


@st.composite
def rows(draw, tsv: bool = False, n: int | None = None) -> list[str]:
    """The lines of a file, as text: clean sentences, random Unicode, odd characters (NUL, tabs,
    other line separators, BOMs inside), TSV lines with missing or extra columns, or a very long line."""
    kind = draw(st.sampled_from(["clean", "clean", "unicode", "odd", "columns", "long"]))
    if n is None:
        n = draw(st.integers(1 if kind in ("clean", "long") else 0, 6))
    words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)
    if kind == "unicode":
        cell = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
    elif kind == "odd":
        cell = st.lists(st.sampled_from(WORDS + ODD), min_size=1, max_size=8).map("".join)
    elif kind == "columns":
        cell = st.one_of(words, st.just(""), st.just(" "))
    else:
        cell = words
    out = []
    for _ in range(n):
        cols = draw(st.sampled_from([2, 2, 1, 3, 0, 4])) if kind == "columns" else 2
        out.append("\t".join(draw(cell) for _ in range(cols)) if tsv else draw(cell))
    if kind == "long":   # thousands of words, or one token of thousands of characters
        out = out or [""]
        big = draw(st.sampled_from([" ".join(WORDS) * draw(st.integers(50, 300)), "x" * draw(st.integers(1000, 20000))]))
        out[draw(st.integers(0, len(out) - 1))] = f"{big}\t{big}" if tsv else big
    return out


@st.composite
def encoded(draw, lines: list[str]) -> bytes:
    """Lines as file bytes: LF, CRLF or CR line ends, with or without a last line end, maybe a BOM,
    maybe one byte that is not UTF-8 or a NUL byte somewhere."""
    eol = draw(st.sampled_from(["\n", "\n", "\r\n", "\r"]))
    data = (eol.join(lines) + (eol if lines and draw(st.booleans()) else "")).encode("utf-8")
    if draw(st.booleans()):
        data = BOM + data
    extra = draw(st.sampled_from([None] * 6 + [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\x00"]))
    if extra is not None:
        i = draw(st.integers(0, len(data)))
        data = data[:i] + extra + data[i:]
    return data


@st.composite
def files(draw, tsv: bool = False) -> bytes:
    """The bytes of an input file: random bytes (1 in 6) or encoded lines."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=300))
    return draw(encoded(draw(rows(tsv))))


@st.composite
def parallel_files(draw) -> tuple[bytes, bytes]:
    """--src and --ref: mostly the same number of lines (else refused for the count)."""
    src = draw(rows())
    ref = draw(rows(n=len(src))) if draw(st.integers(0, 3)) else draw(rows())
    return draw(encoded(src)), draw(encoded(ref))


@st.composite
def pair_data(draw) -> tuple[str, dict, object]:
    """Training / evaluation pairs in every layout the loader reads: (the path to pass, {file name:
    bytes}, the expected pairs or None). TSV; TSV.gz, intact or cut, with a flipped byte, or not
    gzip at all; parallel x.src / x.tgt files, passed as x.src or as the prefix x."""
    layout = draw(st.sampled_from(["tsv", "tsv", "gz", "parallel"]))
    if layout == "tsv":
        data = draw(files(tsv=True))
        return "data.tsv", {"data.tsv": data}, expected_pairs(data)
    if layout == "gz":
        raw = draw(files(tsv=True))
        comp = gzip.compress(raw, mtime=0)
        damage = draw(st.sampled_from(["none", "none", "cut", "flip", "plain"]))
        if damage == "cut":
            comp = comp[:draw(st.integers(0, len(comp) - 1))]
        elif damage == "flip":   # in the compressed data or the CRC-32 / size trailer, not the header
            i = draw(st.integers(10, len(comp) - 1))
            comp = comp[:i] + bytes([comp[i] ^ draw(st.integers(1, 255))]) + comp[i + 1:]
        elif damage == "plain":
            comp = raw
        want = expected_pairs(raw) if damage == "none" or (damage == "plain" and not raw) else None
        return "data.tsv.gz", {"data.tsv.gz": comp}, want
    src = draw(rows())
    tgt = draw(rows(n=len(src))) if draw(st.integers(0, 3)) else draw(rows())
    a, b = draw(encoded(src)), draw(encoded(tgt))
    return draw(st.sampled_from(["data.src", "data"])), {"data.src": a, "data.tgt": b}, expected_parallel(a, b)


# ----------------------------------------------------------------------------------------------- oracle

def _raw_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def expected_lines(data: bytes) -> list[str] | None:
    """The sentences of a one-sentence-per-line file, or None when it must be refused."""
    out = []
    for i, raw in enumerate(_raw_lines(data)):
        raw = raw.rstrip(b"\r")
        if i == 0 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not text.strip():
            return None
        out.append(text.strip())
    return out or None


def _decoded_lines(data: bytes) -> list[str] | None:
    """Lines of a data file as the pair loader reads them (one CR dropped, a BOM on line 1 dropped)."""
    out = []
    for i, raw in enumerate(_raw_lines(data)):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if i == 0 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return None
    return out


def expected_parallel(src: bytes, tgt: bytes) -> list[tuple[str, str]] | None:
    a, b = _decoded_lines(src), _decoded_lines(tgt)
    if a is None or b is None or len(a) != len(b) or any(not x.strip() for x in a + b):
        return None
    return [(x.strip(), y.strip()) for x, y in zip(a, b)] or None


def expected_pairs(data: bytes) -> list[tuple[str, str]] | None:
    """The pairs of a src<TAB>tgt file, or None when it must be refused."""
    lines = _decoded_lines(data)
    if lines is None:
        return None
    out = []
    for line in lines:
        cols = line.split("\t")
        if len(cols) != 2 or not cols[0].strip() or not cols[1].strip():
            return None
        out.append((cols[0].strip(), cols[1].strip()))
    return out or None


# ----------------------------------------------------------------------------------------------- running

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A small diffusion checkpoint with a tokenizer (random weights: the outputs do not matter here)."""
    from fastdiss.data.tokenizer import Tokenizer
    from fastdiss.model import Denoiser
    d = tmp_path_factory.mktemp("fuzz")
    cfg = preset("tiny")
    cfg.model = ModelConfig(**{**cfg.to_dict()["model"], "d_model": 32, "n_enc": 1, "n_dec": 1, "n_heads": 2,
                               "d_ff": 64, "d_latent": 16, "max_len": 16})
    cfg.sample.length_beam, cfg.sample.noise_draws, cfg.sample.steps = 1, 1, 1
    tok = Tokenizer.train([" ".join(WORDS)] * 4, vocab_size=300)
    torch.manual_seed(0)
    model = Denoiser(cfg.model, tok.vocab_size, tok.pad_id)
    ckpt.save(d / "model.pt", model, cfg, tok)
    return d


_counter = itertools.count()


def _new_dir(work: Path) -> Path:
    d = work / f"case{next(_counter)}"
    d.mkdir()
    return d


def run_cli(argv):
    """cli.main with stdout (a real byte buffer underneath, as in a terminal) and stderr captured."""
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
        out.flush()
    return rc, out.buffer.getvalue().decode("utf-8"), err.getvalue()


def assert_clean_end(rc, out, err, verb, valid):
    event("valid input: a result" if valid else "invalid input: one error")
    assert "Traceback" not in err, err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith(f"fastdiss {verb}: error: ")]
    if valid:
        assert rc == 0 and not errors, f"a valid input was refused (rc {rc}): {err}"
    else:
        assert rc == 2, f"an invalid input was accepted or failed otherwise (rc {rc}):\n{err}"
        assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line, last:\n{err}"
        assert out == "", f"partial output on stdout: {out[:200]!r}"


def _no_temporaries(folder: Path):
    left = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not left, f"temporary files left: {left}"


# ----------------------------------------------------------------------------------------------- the verbs

@FUZZ
@given(data=files(), to_file=st.booleans())
def test_generate_survives_any_input_file(work, data, to_file):
    d = _new_dir(work)
    (d / "in.txt").write_bytes(data)
    argv = ["generate", "--ckpt", str(work / "model.pt"), str(d / "in.txt"), "--steps", "1", "--device", "cpu"]
    if to_file:
        argv += ["-o", str(d / "out.txt")]
    rc, out, err = run_cli(argv)
    want = expected_lines(data)
    assert_clean_end(rc, out, err, "generate", want is not None)
    _no_temporaries(d)
    if to_file:
        assert out == ""
        if want is None:
            assert not (d / "out.txt").exists(), "an output file was written for a refused input"
            return
        out = (d / "out.txt").read_bytes().decode("utf-8")
    if want is not None:
        assert out.endswith("\n") and out.count("\n") == len(want), (len(want), out[:300])


@FUZZ
@given(src_ref=st.one_of(parallel_files(), st.tuples(files(), files())), data=pair_data(), use_data=st.booleans())
def test_evaluate_survives_any_input_files(work, src_ref, data, use_data):
    src, ref = src_ref
    d = _new_dir(work)
    argv = ["evaluate", "--ckpt", str(work / "model.pt"), "--steps", "1", "--device", "cpu", "--json"]
    if use_data:
        arg, blobs, pairs = data
        for name, blob in blobs.items():
            (d / name).write_bytes(blob)
        argv += ["--data", str(d / arg)]
        n = len(pairs) if pairs is not None else None
    else:
        (d / "test.src").write_bytes(src)
        (d / "test.ref").write_bytes(ref)
        argv += ["--src", str(d / "test.src"), "--ref", str(d / "test.ref")]
        a, b = expected_lines(src), expected_lines(ref)
        n = len(a) if a is not None and b is not None and len(a) == len(b) else None
    rc, out, err = run_cli(argv)
    assert_clean_end(rc, out, err, "evaluate", n is not None)
    if n is not None:
        report = json.loads(out)
        assert report["sentences"] == n and [r["steps"] for r in report["results"]] == [1]


@FUZZ
@given(train=pair_data(), valid=st.one_of(st.none(), files(tsv=True)))
def test_train_survives_any_input_files(work, train, valid):
    d = _new_dir(work)
    arg, blobs, pairs = train
    for name, blob in blobs.items():
        (d / name).write_bytes(blob)
    out = d / "run"
    argv = ["train", "--train", str(d / arg), "--preset", "tiny", "--vocab-size", "260", "--max-tokens",
            "128", "--max-steps", "1", "--out", str(out), "--quiet", "--device", "cpu"]
    ok = pairs is not None and len(pairs) >= 2   # without --valid one pair is held out for validation
    if valid is not None:
        (d / "valid.tsv").write_bytes(valid)
        argv += ["--valid", str(d / "valid.tsv")]
        ok = pairs is not None and expected_pairs(valid) is not None
    with mock.patch("os.fsync"):   # durability is not under test here; fsync of two checkpoints per case is
        rc, stdout, err = run_cli(argv)
    assert_clean_end(rc, stdout, err, "train", ok)
    if ok:
        assert ckpt.load(out / "last.pt").train_state["step"] == 1 and (out / "best.pt").exists()
        _no_temporaries(out)
    else:
        assert not out.exists(), f"a refused training left {sorted(os.listdir(out))}"
