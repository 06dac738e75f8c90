"""dist_soup.moo.recipe: schedules, the VS/VC/VM recipes and user levels on a planted Gram."""

import pytest
import torch

from dist_soup.moo.recipe import Level, Recipe, Schedule, build_recipe

NAMES = ("asr_en", "asr_fr", "st", "ssl")
GROUPS = {"asr": ("asr_en", "asr_fr"), "st": ("st",), "ssl": ("ssl",)}
# Orthogonal gradients with squared norms 1, 4, 2, 8: MGDA on any subset weights each
# objective proportionally to 1 / ||g_k||^2.
GRAM = torch.diag(torch.tensor([1.0, 4.0, 2.0, 8.0], dtype=torch.float64))
LOSSES = torch.tensor([1.0, 2.0, 3.0, 4.0])


def _close(a, b):
    torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_schedule():
    s = Schedule(0.1, 0.02, 1.5)
    assert s.value(0) == pytest.approx(0.1)
    assert s.value(10) == pytest.approx(0.3)
    assert s.value(1000) == 1.5
    assert Schedule().value(7.5) == 1.0
    assert Schedule(2.0, -0.5).value(2) == pytest.approx(1.0)
    assert Schedule(2.0, -0.5).value(10) == 0.0  # a decaying weight stops at 0
    with pytest.raises(ValueError, match="start must be >= 0"):
        Schedule(-0.1)
    assert Schedule.from_spec({"start": 0.5, "step": 0.1}).value(1) == pytest.approx(0.6)
    assert Schedule.from_spec(0.3).value(9) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="epoch"):
        s.value(-1)
    with pytest.raises(ValueError, match="unknown keys"):
        Schedule.from_spec({"begin": 1})
    with pytest.raises(ValueError, match="finite"):
        Schedule(float("nan"))


def test_vs_weights():
    r = build_recipe("vs", NAMES, GROUPS)
    w, info = r.weights(GRAM, LOSSES, NAMES, epoch=3)
    inv = torch.tensor([1, 1 / 4, 1 / 2, 1 / 8])
    _close(w, (inv / inv.sum()).tolist())
    assert info["etas"] == [1.0] and len(info["lambdas"]) == 1
    assert r.objectives == NAMES and r.needs_gram


def test_vc_weights_and_penalty_ramp():
    r = build_recipe("vc", NAMES, GROUPS, constraint="ssl")
    assert [lv.penalty for lv in r.levels] == [False, True]
    assert r.levels[1].solver == "ew"
    inv = torch.tensor([1, 1 / 4, 1 / 2])
    sup = (inv / inv.sum()).tolist()
    w, info = r.weights(GRAM, LOSSES, NAMES, epoch=5)
    _close(w, sup + [0.1 + 0.02 * 5])
    assert info["etas"] == [1.0, pytest.approx(0.2)]
    w, _ = r.weights(GRAM, LOSSES, NAMES, epoch=100)
    _close(w, sup + [1.5])
    slow = build_recipe("vc", NAMES, GROUPS, constraint="ssl", eta=Schedule(0.1, 0.002, 1.5))
    _close(slow.weights(GRAM, LOSSES, NAMES, epoch=50)[0], sup + [0.2])


def test_vm_orders():
    uas = build_recipe("vm", NAMES, GROUPS, order=("asr", "st", "ssl"))
    assert [lv.objectives for lv in uas.levels] == [("asr_en", "asr_fr"), ("st",), ("ssl",)]
    w, info = uas.weights(GRAM, LOSSES, NAMES, epoch=5)
    _close(w, [0.8, 0.2, 0.2, 0.2])
    assert [float(x.sum()) for x in info["lambdas"]] == pytest.approx([1.0, 1.0, 1.0])
    usa = build_recipe("vm", NAMES, GROUPS, order=["st", "asr", "ssl"])
    w, _ = usa.weights(GRAM, LOSSES, NAMES, epoch=5)
    _close(w, [0.8 * 0.2, 0.2 * 0.2, 1.0, 0.2])
    # A group that the task lacks is skipped.
    two = build_recipe("vm", ("a", "b", "c"), {"asr": ("a", "b"), "ssl": ("c",)}, order=("asr", "st", "ssl"))
    assert [lv.objectives for lv in two.levels] == [("a", "b"), ("c",)]


def test_names_order_is_respected():
    r = build_recipe("vm", NAMES, GROUPS, order=("asr", "st", "ssl"))
    perm = [3, 1, 0, 2]
    names = [NAMES[i] for i in perm]
    gram = GRAM[perm][:, perm]
    w, _ = r.weights(gram, LOSSES[perm], names, epoch=5)
    _close(w, [[0.8, 0.2, 0.2, 0.2][i] for i in perm])


def test_user_levels_and_indefinite_sub_gram_is_clipped():
    spec = [
        {"objectives": ["st", "asr_en"], "solver": "mgda", "solver_options": {"normalization": "l2"}},
        {"objectives": ["asr_fr"], "solver": "ew", "eta": {"start": 0.5, "step": 0.1, "cap": 0.7}},
        {"objectives": ["ssl"], "solver": "famo", "eta": 0.25, "penalty": True},
    ]
    r = Recipe.from_levels(spec)
    assert r.objectives == ("st", "asr_en", "asr_fr", "ssl")
    w, info = r.weights(GRAM, LOSSES, NAMES, epoch=4)
    # l2-normalized orthogonal rows: lambda* = (1/2, 1/2) on unit rows, weights 0.5/||g||.
    _close(w, [0.5 / 1.0, 0.7, 0.5 / 2**0.5, 0.25])
    assert info["levels"][2]["penalty"] is True
    # An indefinite Gram (e.g. a cross estimate): the MGDA level sees its PSD clip.
    bad = GRAM.clone()
    bad[0, 0] = -1.0
    w, _ = build_recipe("vs", NAMES, GROUPS).weights(bad, LOSSES, NAMES, epoch=0)
    assert torch.isfinite(w).all() and float(w.sum()) == pytest.approx(1.0)
    # A loss-based-only recipe needs no Gram.
    lb = Recipe([Level(NAMES, "famo")])
    assert not lb.needs_gram
    assert lb.weights(None, LOSSES, NAMES, 0)[0].shape == (4,)


def test_state_dict_round_trip():
    r = build_recipe("vs", NAMES, GROUPS, solver="modo", solver_options={"gamma": 0.1})
    for e in range(3):
        r.weights(GRAM, LOSSES, NAMES, e)
    twin = build_recipe("vs", NAMES, GROUPS, solver="modo", solver_options={"gamma": 0.1})
    twin.load_state_dict(r.state_dict())
    torch.testing.assert_close(r.weights(GRAM, LOSSES, NAMES, 3)[0], twin.weights(GRAM, LOSSES, NAMES, 3)[0])
    with pytest.raises(ValueError, match="recipe state"):
        twin.load_state_dict({"levels": []})


def test_errors():
    with pytest.raises(ValueError, match="unknown recipe kind"):
        build_recipe("vx", NAMES, GROUPS)
    with pytest.raises(ValueError, match="unknown objectives"):
        build_recipe("vs", NAMES, {"ssl": ("speech",)})
    with pytest.raises(ValueError, match="needs a non-empty group 'ssl'"):
        build_recipe("vc", NAMES, {"asr": ("asr_en",)}, constraint="ssl")
    with pytest.raises(ValueError, match="needs constraint"):
        build_recipe("vc", NAMES, GROUPS)
    with pytest.raises(ValueError, match="belong to none"):
        build_recipe("vm", NAMES, {"asr": ("asr_en", "asr_fr"), "ssl": ("ssl",)}, order=("asr", "st", "ssl"))
    for bad in (None, "uas", ("asr", 3)):  # a task's named order is the task's to resolve
        with pytest.raises(ValueError, match="needs order: the group names"):
            build_recipe("vm", NAMES, GROUPS, order=bad)
    with pytest.raises(ValueError, match="only used by recipe 'vm'"):
        build_recipe("vs", NAMES, GROUPS, order=("asr",))
    with pytest.raises(ValueError, match="only used by recipe 'vc'"):
        build_recipe("vm", NAMES, GROUPS, order=("asr", "st", "ssl"), constraint="ssl")
    with pytest.raises(ValueError, match="unknown solver"):
        build_recipe("vs", NAMES, GROUPS, solver="sgd")
    with pytest.raises(ValueError, match="unknown options"):
        build_recipe("vs", NAMES, GROUPS, solver_options={"c": 0.5})
    with pytest.raises(ValueError, match="disjoint"):
        Recipe([Level(("a", "b"), "mgda"), Level(("b",), "ew")])
    with pytest.raises(ValueError, match="at least one objective"):
        Level((), "mgda")
    with pytest.raises(ValueError, match="at least one level"):
        Recipe([])
    with pytest.raises(ValueError, match="needs key 'solver'"):
        Recipe.from_levels([{"objectives": ["a"]}])
    with pytest.raises(ValueError, match="unknown keys"):
        Recipe.from_levels([{"objectives": ["a"], "solver": "ew", "weight": 2}])
    r = build_recipe("vs", NAMES, GROUPS)
    with pytest.raises(ValueError, match=r"unknown \['mt'\], missing \['ssl'\]"):
        r.weights(GRAM, LOSSES, ("asr_en", "asr_fr", "st", "mt"), 0)
    with pytest.raises(ValueError, match="shape"):
        r.weights(GRAM[:3, :3], LOSSES, NAMES, 0)
    with pytest.raises(ValueError, match="needs the Gram"):
        r.weights(None, LOSSES, NAMES, 0)
    nan = GRAM.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        r.weights(nan, LOSSES, NAMES, 0)
