"""From sentence pairs to padded tensor batches: encode, bucket by length under a token budget, collate.

Length bucketing keeps padding low (sentences of similar length share a batch) and a token budget
keeps the memory of a step roughly constant whatever the sentence lengths.
"""
from __future__ import annotations

import warnings
from typing import Iterator, Sequence

import numpy as np
import torch


def encode_pairs(pairs, tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (src, tgt) pair, each side truncated to `max_len` tokens. No special tokens are
    added. Warns once with the count when any side was truncated; a side with no tokens is an error."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
    pairs = list(pairs)
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str)):
            raise TypeError(f"pairs[{i}]: expected a (src, tgt) pair of str, got {p!r:.80}")
    encode = getattr(tokenizer, "encode_batch", None) or (lambda texts: [tokenizer.encode(t) for t in texts])
    srcs, tgts = encode([p[0] for p in pairs]), encode([p[1] for p in pairs])
    out, truncated, longest = [], 0, 0
    for i, (s, t) in enumerate(zip(srcs, tgts)):
        if not s or not t:
            side = "source" if not s else "target"
            raise ValueError(f"pairs[{i}]: the {side} side encodes to no tokens ({pairs[i]!r:.80}); drop empty sides")
        longest = max(longest, len(s), len(t))
        if len(s) > max_len or len(t) > max_len:
            truncated += 1
        out.append((list(s[:max_len]), list(t[:max_len])))
    if truncated:
        warnings.warn(f"encode_pairs: {truncated} of {len(pairs)} pairs were truncated to max_len={max_len} "
                      f"tokens (longest side: {longest}); raise max_len or filter long pairs", stacklevel=2)
    return out


def collate(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads a list of (src_ids, tgt_ids) to the longest of each side. Masks are True at padding."""
    if len(examples) == 0:
        raise ValueError("examples: expected at least one (src_ids, tgt_ids) pair, got an empty list")
    batch = {}
    for side, col in (("src", 0), ("tgt", 1)):
        seqs = [ex[col] for ex in examples]
        lens = np.array([len(s) for s in seqs], dtype=np.int64)
        if lens.min() == 0:
            i = int(np.argmin(lens))
            raise ValueError(f"examples[{i}]: empty {side} sequence; every side needs at least one token")
        ids = np.full((len(seqs), int(lens.max())), pad_id, dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        batch[side] = torch.from_numpy(ids)
        batch[f"{side}_mask"] = torch.from_numpy(np.arange(ids.shape[1])[None, :] >= lens[:, None])
    return batch


class TokenBatchSampler:
    """Batches of example indices, grouped by length, each within a token budget.

    A batch's cost is `len(batch) * max(longest src, longest tgt)`: the padded tokens of the larger side.
    Every example appears exactly once per epoch. With shuffle=True, ties among equal lengths and the
    order of batches are random but fixed by (seed, epoch): call `set_epoch(e)` before each epoch.
    The number of batches is the same in every epoch.
    """

    def __init__(self, src_lens: Sequence[int], tgt_lens: Sequence[int], max_tokens: int,
                 shuffle: bool = True, seed: int = 0):
        src = np.asarray(src_lens, dtype=np.int64)
        tgt = np.asarray(tgt_lens, dtype=np.int64)
        if src.ndim != 1 or tgt.ndim != 1 or len(src) != len(tgt):
            raise ValueError(f"src_lens, tgt_lens: expected two 1-D sequences of equal length, "
                             f"got shapes {src.shape} and {tgt.shape}")
        if len(src) == 0:
            raise ValueError("src_lens: expected at least one example, got none")
        if src.min() < 1 or tgt.min() < 1:
            raise ValueError("src_lens, tgt_lens: every length must be >= 1")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
        self.src_lens, self.tgt_lens = src, tgt
        self.sizes = np.maximum(src, tgt)
        if self.sizes.max() > max_tokens:
            i = int(np.argmax(self.sizes))
            raise ValueError(f"max_tokens: {max_tokens} cannot hold example {i} ({int(self.sizes[i])} tokens); "
                             f"use max_tokens >= {int(self.sizes.max())} or truncate/filter long examples")
        self.max_tokens, self.shuffle, self.seed, self.epoch = max_tokens, bool(shuffle), int(seed), 0
        self._num_batches = len(self._batches(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self, epoch: int) -> list[list[int]]:
        n = len(self.sizes)
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            perm = rng.permutation(n)
            # lexsort is stable: equal lengths keep their random order from `perm`
            order = perm[np.lexsort((self.tgt_lens[perm], self.src_lens[perm], self.sizes[perm]))]
        else:
            order = np.lexsort((np.arange(n), self.tgt_lens, self.src_lens, self.sizes))
        batches, cur, cur_max = [], [], 0
        for i in order.tolist():
            size = int(self.sizes[i])
            if cur and (len(cur) + 1) * max(cur_max, size) > self.max_tokens:
                batches.append(cur)
                cur, cur_max = [], 0
            cur.append(i)
            cur_max = max(cur_max, size)
        batches.append(cur)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches(self.epoch))

    def __len__(self) -> int:
        return self._num_batches
