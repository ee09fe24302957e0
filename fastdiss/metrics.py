"""Quality metrics: corpus SacreBLEU and chrF (with their signatures, so scores are comparable
across papers) and MBR selection among sampled candidates by mutual sentence-BLEU.

MBR needs n*(n-1) sentence-BLEU scores per source; calling sacrebleu.sentence_bleu for each pair
re-tokenizes every string n times, so we tokenize and count n-grams once per candidate and feed
the clipped counts to sacrebleu's own BLEU formula (tests check the result equals
sacrebleu.sentence_bleu).
"""
from __future__ import annotations

import math
from collections import Counter

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.helpers import extract_all_word_ngrams
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

MAX_ORDER = 4

__all__ = ["bleu", "chrf", "sentence_bleu", "mbr_select", "pairwise_bleu"]


def _check_corpus(hyps, refs) -> tuple[list[str], list[str]]:
    if isinstance(hyps, str) or isinstance(refs, str):
        raise TypeError("hyps and refs must be lists of strings (one per sentence), got a single str")
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"hyps and refs must have the same length, got {len(hyps)} hypotheses and "
                         f"{len(refs)} references")
    if not hyps:
        raise ValueError("hyps and refs are empty: need at least one sentence to score")
    for name, xs in (("hyps", hyps), ("refs", refs)):
        for i, x in enumerate(xs):
            if not isinstance(x, str):
                raise TypeError(f"{name}[{i}] must be str, got {type(x).__name__}")
    return hyps, refs


def bleu(hyps, refs) -> tuple[float, str]:
    """Corpus SacreBLEU (13a tokenization, exp smoothing, one reference) -> (score, signature)."""
    hyps, refs = _check_corpus(hyps, refs)
    metric = BLEU(force=True)  # our outputs are detokenized text; silence the "tokenized period" heuristic
    score = metric.corpus_score(hyps, [refs])
    return float(score.score), str(metric.get_signature())


def chrf(hyps, refs) -> tuple[float, str]:
    """Corpus chrF (character 6-grams, beta 2) -> (score, signature)."""
    hyps, refs = _check_corpus(hyps, refs)
    metric = CHRF()
    score = metric.corpus_score(hyps, [refs])
    return float(score.score), str(metric.get_signature())


_tokenize = Tokenizer13a()


def _ngrams(text: str) -> tuple[Counter, int]:
    return extract_all_word_ngrams(_tokenize(text.rstrip()), 1, MAX_ORDER)


def _sentence_bleu_from_counts(hyp: tuple[Counter, int], ref: tuple[Counter, int]) -> float:
    (h_ngrams, h_len), (r_ngrams, r_len) = hyp, ref
    correct = [0] * MAX_ORDER
    total = [0] * MAX_ORDER
    for ng, c in h_ngrams.items():
        n = len(ng) - 1
        total[n] += c
        rc = r_ngrams.get(ng)
        if rc:
            correct[n] += min(c, rc)
    return BLEU.compute_bleu(correct, total, h_len, r_len, smooth_method="exp",
                             effective_order=True, max_ngram_order=MAX_ORDER).score


def sentence_bleu(hyp: str, ref: str) -> float:
    """Sentence BLEU as sacrebleu.sentence_bleu computes it (exp smoothing, effective order)."""
    return _sentence_bleu_from_counts(_ngrams(hyp), _ngrams(ref))


def pairwise_bleu(candidates: list[str]) -> list[list[float]]:
    """m[i][j] = sentence-BLEU of candidate i against candidate j as the reference (m[i][i] = 0)."""
    counts = [_ngrams(c) for c in candidates]
    n = len(candidates)
    return [[0.0 if i == j else _sentence_bleu_from_counts(counts[i], counts[j]) for j in range(n)]
            for i in range(n)]


def mbr_select(candidates: list[str]) -> int:
    """Index of the candidate with the highest mean sentence-BLEU against all the others
    (minimum Bayes risk with BLEU as the utility). Ties go to the lowest index."""
    if isinstance(candidates, str):
        raise TypeError("candidates must be a list of strings, got a single str")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates is empty: need at least one candidate to select from")
    for i, c in enumerate(candidates):
        if not isinstance(c, str):
            raise TypeError(f"candidates[{i}] must be str, got {type(c).__name__}")
    if len(candidates) == 1:
        return 0
    m = pairwise_bleu(candidates)
    best, best_score = 0, float("-inf")
    for i, row in enumerate(m):
        s = math.fsum(row)  # same denominator (n - 1) for every row; fsum is order-independent, so
        # identical candidates tie exactly and the lowest index wins
        if s > best_score:
            best, best_score = i, s
    return best
