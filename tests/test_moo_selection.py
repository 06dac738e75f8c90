"""dist_soup.moo.selection: conflict scores and the selection rules."""

import math

import pytest
import torch

from dist_soup.moo.gram import local_grams
from dist_soup.moo.selection import conflict_scores, select


def test_conflict_scores_by_hand():
    g1 = torch.tensor([1.0, 0.0])
    g2 = torch.tensor([-1.0, 1.0])
    g3 = torch.tensor([0.0, 2.0])
    j = torch.stack([g1, g2, g3])
    scores = conflict_scores((j @ j.T).unsqueeze(0).double())
    cos12 = -1 / math.sqrt(2)
    cos13 = 0.0
    cos23 = 1 / math.sqrt(2)
    assert scores.shape == (1,)
    assert abs(float(scores[0]) - (cos12 + cos13 + cos23) / 3) < 1e-12


def test_zero_rows_count_as_orthogonal():
    j = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    assert float(conflict_scores((j @ j.T).unsqueeze(0))[0]) == 0.0
    assert float(conflict_scores(torch.zeros(1, 3, 3))[0]) == 0.0
    with pytest.raises(ValueError, match="K >= 2"):
        conflict_scores(torch.ones(2, 1, 1))
    with pytest.raises(ValueError, match="non-finite"):
        conflict_scores(torch.full((1, 2, 2), float("nan")))


def _planted(seed=0):
    """Six tensors; in tensors 1 and 4 objective 0 opposes objectives 1 and 2, elsewhere all
    three agree. Returns rows and sizes."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4), (16,), (3, 3, 3), (10,), (5, 6), (7,)]
    rows = []
    for l, shape in enumerate(shapes):
        n = math.prod(shape)
        common = torch.randn(n, generator=g)
        noise = 0.3 * torch.randn(3, n, generator=g)
        if l in (1, 4):
            # Objective 0 against objectives 1 and 2: cosines about -0.9, -0.9, +0.9.
            r = torch.tensor([1.0, -1.0, -1.0]).unsqueeze(1) * common + noise
        else:
            r = common + noise
        rows.append(r.reshape(3, *shape))
    return rows, [math.prod(s) for s in shapes]


def test_selection_finds_planted_conflicts():
    rows, sizes = _planted()
    scores = conflict_scores(local_grams(rows))
    assert scores[1] < 0 and scores[4] < 0
    assert all(scores[l] > 0.5 for l in (0, 2, 3, 5))
    thr = select(scores, sizes)  # tau = 0
    assert thr.tolist() == [False, True, False, False, True, False]
    top1 = select(scores, sizes, rule="top_m", m=1)
    assert int(top1.sum()) == 1 and bool(top1[int(torch.argmin(scores))])
    top2 = select(scores, sizes, rule="top_m", m=2)
    assert top2.tolist() == thr.tolist()
    assert select(scores, sizes, rule="top_m", m=100).all()
    assert select(scores, sizes, rule="all").all()


def test_budget_rule_and_fallback():
    scores = torch.tensor([0.5, -0.9, 0.1, -0.2], dtype=torch.float64)
    sizes = [10, 100, 5, 20]
    # Order: 1 (100), 3 (20), 2 (5), 0 (10).
    assert select(scores, sizes, rule="budget", budget=125).tolist() == [False, True, True, True]
    assert select(scores, sizes, rule="budget", budget=120).tolist() == [False, True, False, True]
    # The most conflicting tensor alone exceeds the budget: fall back to it.
    assert select(scores, sizes, rule="budget", budget=50).tolist() == [False, True, False, False]
    # Threshold selecting nothing: fall back to the lowest score.
    assert select(scores, sizes, tau=-0.95).tolist() == [False, True, False, False]
    assert select(scores, torch.tensor(sizes), tau=0.2).tolist() == [False, True, True, True]


def test_selection_errors():
    s = torch.tensor([0.1, -0.1])
    with pytest.raises(ValueError, match="unknown selection rule"):
        select(s, [1, 1], rule="best")
    with pytest.raises(ValueError, match="needs an int m"):
        select(s, [1, 1], rule="top_m")
    with pytest.raises(ValueError, match="needs an int budget"):
        select(s, [1, 1], rule="budget", budget=0)
    with pytest.raises(ValueError, match="only used by rule 'top_m'"):
        select(s, [1, 1], rule="threshold", m=2)
    with pytest.raises(ValueError, match="one count per tensor"):
        select(s, [1, 1, 1])
    with pytest.raises(ValueError, match="non-finite"):
        select(torch.tensor([float("nan"), 0.0]), [1, 1])
    with pytest.raises(ValueError, match="integer"):
        select(s, [1.5, 2.0])


def test_selection_object_is_select_with_its_options():
    from dist_soup.moo.selection import Selection

    s, sizes = torch.tensor([0.3, -0.2, -0.5, 0.1]), [4, 4, 4, 4]
    assert torch.equal(Selection("top_m", m=2)(s, sizes), select(s, sizes, rule="top_m", m=2))
    assert Selection.from_spec(None) == Selection() and Selection().rule == "all"
    assert Selection.from_spec({"rule": "budget", "budget": 8}) == Selection("budget", budget=8)
    with pytest.raises(ValueError, match="'rule' must be one of"):
        Selection.from_spec({"tau": 0.0})  # no guessed rule
    with pytest.raises(ValueError, match=r"unknown options \['taus'\]"):
        Selection.from_spec({"rule": "threshold", "taus": 0.0})
    with pytest.raises(ValueError, match="needs an int m"):
        Selection("top_m")
    with pytest.raises(TypeError, match="a Selection, a mapping or None"):
        Selection.from_spec("threshold")  # type: ignore[arg-type]
