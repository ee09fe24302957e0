"""Byte-level BPE tokenizer (a thin wrapper over the `tokenizers` library).

Byte-level BPE needs no unknown token and no text normalisation, so `decode(encode(s)) == s` holds for
every string: we add no prefix space, apply no Unicode normalisation, and treat text that looks like a
special token ("<eos>") as plain text. The four special tokens have fixed ids so that model code can
rely on them: <pad>=0, <unk>=1, <bos>=2, <eos>=3. Ids carry no special tokens unless a model adds them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


class Tokenizer:
    """Joint source+target subword vocabulary. Wraps a `tokenizers.Tokenizer` built by `train`."""

    def __init__(self, hf_tokenizer: _HFTokenizer):
        if not isinstance(hf_tokenizer, _HFTokenizer):
            raise TypeError(f"hf_tokenizer: expected tokenizers.Tokenizer, got {type(hf_tokenizer).__name__}")
        ids = [hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise ValueError(f"hf_tokenizer: special tokens {SPECIAL_TOKENS} must have ids 0..3, got {ids}")
        # Text such as "<eos>" inside a sentence stays text; otherwise decode() would drop it.
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    # ---- training -----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> "Tokenizer":
        """Learns a byte-level BPE vocabulary of at most `vocab_size` ids (specials included) from `texts`.
        Training is deterministic: the same texts give the same vocabulary."""
        if isinstance(texts, str):
            raise TypeError("texts: expected an iterable of strings, got a single str")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size: expected an int >= {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} specials), got {vocab_size!r}")
        tok = _HFTokenizer(models.BPE())  # byte-level: every byte is in the alphabet, so no unk_token
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

        def checked(it):
            for i, t in enumerate(it):
                if not isinstance(t, str):
                    raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
                yield t

        tok.train_from_iterator(checked(texts), trainer=trainer)
        return cls(tok)

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Same as [encode(t) for t in texts], parallel inside the Rust library."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping special ids (pad/unk/bos/eos)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids: expected token ids in [0, {self.vocab_size}), got {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=True)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # ---- persistence --------------------------------------------------------------------------
    def to_json_str(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json_str(cls, s: str) -> "Tokenizer":
        if not isinstance(s, str):
            raise TypeError(f"s: expected a JSON str, got {type(s).__name__}")
        try:
            hf = _HFTokenizer.from_str(s)
        except Exception as e:  # the Rust error names the JSON problem
            raise ValueError(f"s: not a valid tokenizer JSON ({e})") from None
        return cls(hf)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the JSON atomically (fastdiss.atomic: a reader never sees a half-written file)."""
        from fastdiss.atomic import write_bytes
        write_bytes(path, (self.to_json_str() + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: tokenizer file {str(path)!r} does not exist")
        return cls.from_json_str(path.read_text(encoding="utf-8"))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, byte-level BPE)"
