"""fastdiss.metrics against sacrebleu itself, and MBR selection against a brute-force definition."""
import random

import pytest
import sacrebleu

from fastdiss import metrics

WORDS = "the a cat dog sat on mat and he she said unto them lord , . ' ! ?".split()


def _random_sentence(rng, lo=0, hi=12):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def test_bleu_matches_sacrebleu_corpus_score():
    rng = random.Random(1)
    hyps = [_random_sentence(rng, 1) for _ in range(30)]
    refs = [_random_sentence(rng, 1) for _ in range(30)]
    score, sig = metrics.bleu(hyps, refs)
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert score == pytest.approx(expected, abs=1e-9)
    assert 0.0 < score < 100.0
    assert "nrefs:1" in sig and "tok:13a" in sig and f"version:{sacrebleu.__version__}" in sig
    assert metrics.bleu(refs, refs)[0] == pytest.approx(100.0)


def test_chrf_matches_sacrebleu_corpus_score():
    rng = random.Random(2)
    hyps = [_random_sentence(rng, 1) for _ in range(20)]
    refs = [_random_sentence(rng, 1) for _ in range(20)]
    score, sig = metrics.chrf(hyps, refs)
    assert score == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert sig.startswith("nrefs:1") and "nc:6" in sig


def test_sentence_bleu_matches_sacrebleu_on_random_pairs():
    rng = random.Random(3)
    for _ in range(300):
        h, r = _random_sentence(rng), _random_sentence(rng)
        assert metrics.sentence_bleu(h, r) == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score, abs=1e-9), (h, r)


def _mbr_brute_force(cands):
    n = len(cands)
    means = [sum(sacrebleu.sentence_bleu(cands[i], [cands[j]]).score for j in range(n) if j != i) / (n - 1)
             for i in range(n)]
    best = max(means)
    return min(i for i, m in enumerate(means) if abs(m - best) < 1e-9)


def test_mbr_select_matches_brute_force():
    rng = random.Random(4)
    for _ in range(20):
        base = _random_sentence(rng, 4, 10).split()
        cands = []
        for _ in range(rng.randint(2, 8)):  # noisy copies of one sentence, like diffusion samples
            w = [x if rng.random() > 0.3 else rng.choice(WORDS) for x in base]
            cands.append(" ".join(w))
        assert metrics.mbr_select(cands) == _mbr_brute_force(cands), cands


def test_mbr_select_picks_the_consensus_and_breaks_ties_low():
    cands = ["x y z w", "the cat sat on the mat", "the cat sat on a mat", "the cat sat on the mat"]
    assert metrics.mbr_select(cands) == 1  # identical to index 3; tie -> lowest index
    assert metrics.mbr_select(["only one"]) == 0
    assert metrics.mbr_select(["same", "same", "same"]) == 0
    assert metrics.mbr_select(["", "", "a"]) == 0


def test_pairwise_bleu_diagonal_and_asymmetry():
    m = metrics.pairwise_bleu(["a b c d", "a b c d e f g", "a b"])
    assert all(m[i][i] == 0.0 for i in range(3))
    assert m[0][1] != m[1][0]  # brevity penalty makes BLEU asymmetric


@pytest.mark.parametrize("fn", [metrics.bleu, metrics.chrf])
def test_corpus_metrics_reject_bad_input(fn):
    with pytest.raises(ValueError, match="same length"):
        fn(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(TypeError, match="single str"):
        fn("abc", "abc")
    with pytest.raises(TypeError, match=r"hyps\[1\] must be str"):
        fn(["a", 3], ["a", "b"])


def test_mbr_select_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        metrics.mbr_select([])
    with pytest.raises(TypeError, match=r"candidates\[0\]"):
        metrics.mbr_select([[1, 2]])
