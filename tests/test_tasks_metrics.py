"""Sequence metrics of dist_soup.tasks.metrics checked on hand-worked examples."""

import functools
import math

import pytest
import torch

from dist_soup.tasks.metrics import bleu, ctc_greedy_decode, edit_distance, token_error_rate


@pytest.mark.parametrize(
    "ref, hyp, d",
    [
        ([], [], 0),
        ([1, 2, 3], [], 3),
        ([], [4, 5], 2),
        ([1, 2, 3], [1, 2, 3], 0),
        # "kitten" -> "sitting": k->s, e->i, insert g.
        ([11, 9, 20, 20, 5, 14], [19, 9, 20, 20, 9, 14, 7], 3),
        ([1, 2, 3, 4], [2, 3, 4, 5], 2),  # delete 1, insert 5
        ([1, 2], [2, 1], 2),
    ],
)
def test_edit_distance_hand_cases(ref, hyp, d):
    assert edit_distance(ref, hyp) == d
    assert edit_distance(hyp, ref) == d  # symmetric with unit costs


def test_edit_distance_matches_bruteforce_on_small_random_pairs():
    # Reference: plain recursion with memo over all alignments.

    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        a = torch.randint(0, 3, (int(torch.randint(0, 6, (1,), generator=gen)),), generator=gen).tolist()
        b = torch.randint(0, 3, (int(torch.randint(0, 6, (1,), generator=gen)),), generator=gen).tolist()

        @functools.cache
        def d(i, j, a=a, b=b):
            if i == 0 or j == 0:
                return i + j
            return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

        assert edit_distance(a, b) == d(len(a), len(b))


def test_token_error_rate_is_corpus_level():
    refs = [[1, 2, 3, 4], [5, 6]]
    hyps = [[1, 2, 3, 4], [7]]  # 0 errors + 2 errors over 6 reference tokens
    assert token_error_rate(refs, hyps) == pytest.approx(2 / 6)
    assert token_error_rate([[1]], [[2, 3, 4]]) == pytest.approx(3.0)  # can exceed 1
    with pytest.raises(ValueError, match="same number"):
        token_error_rate([[1]], [])
    with pytest.raises(ValueError, match="empty"):
        token_error_rate([[]], [[1]])


def test_bleu_identical_disjoint_and_hand_computed():
    refs = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(refs, [[20, 21, 22, 23, 24, 25], [26, 27, 28, 29, 30]]) == 0.0
    assert bleu(refs, [[], []]) == 0.0
    # One substitution at the end of a 5-token sentence: p1..p4 = 4/5, 3/4, 2/3, 1/2, BP = 1.
    expected = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 6]]) == pytest.approx(expected)
    # A correct but short hypothesis: all precisions 1, brevity penalty exp(1 - 8/6).
    assert bleu([list(range(1, 9))], [list(range(1, 7))]) == pytest.approx(100 * math.exp(1 - 8 / 6))
    # Clipping: repeating a reference word does not earn extra matches.
    assert bleu([[1, 2]], [[1, 1, 1]], max_n=1) == pytest.approx(100 / 3)


def test_bleu_smoothing_and_errors():
    # No 4-gram matches: unsmoothed BLEU is 0, add-one smoothing keeps it positive.
    refs, hyps = [[1, 2, 3, 4, 5]], [[1, 2, 3, 9, 5]]
    assert bleu(refs, hyps) == 0.0
    smoothed = bleu(refs, hyps, smooth=True)
    expected = 100 * (4 / 5 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert smoothed == pytest.approx(expected)
    with pytest.raises(ValueError, match="max_n"):
        bleu(refs, hyps, max_n=0)
    with pytest.raises(ValueError, match="same number"):
        bleu(refs, [])


def _one_hot_path(path, classes):
    return torch.nn.functional.one_hot(torch.tensor(path), classes).float()


def test_ctc_greedy_collapses_repeats_then_removes_blanks():
    # Paths: "a a - a b b" -> [a, a, b]; "- - c c -" -> [c]; all blanks -> [].
    logits = torch.stack(
        [
            _one_hot_path([1, 1, 0, 1, 2, 2], 4),
            _one_hot_path([0, 0, 3, 3, 0, 0], 4),
            _one_hot_path([0, 0, 0, 0, 0, 0], 4),
        ]
    )
    assert ctc_greedy_decode(logits) == [[1, 1, 2], [3], []]
    # Frames beyond an example's length are ignored.
    assert ctc_greedy_decode(logits, torch.tensor([3, 6, 0])) == [[1], [3], []]
    # Another blank id.
    assert ctc_greedy_decode(_one_hot_path([3, 1, 3, 1, 1], 4).unsqueeze(0), blank=3) == [[1, 1]]


def test_ctc_greedy_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        ctc_greedy_decode(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="lengths"):
        ctc_greedy_decode(torch.zeros(2, 3, 4), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="blank"):
        ctc_greedy_decode(torch.zeros(1, 3, 4), blank=4)
