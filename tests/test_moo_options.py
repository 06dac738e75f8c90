"""Options that make the recipes usable on real run lengths (issue 9): penalty schedules in steps
or fractions of the run, and MGDA's normalization modes and momentum on lambda."""

import io

import pytest
import torch

from dist_soup import builders, tasks
from dist_soup import config as C
from dist_soup.moo.recipe import Recipe, Schedule, build_recipe
from dist_soup.moo.solvers import build

NAMES = ("asr_en", "asr_fr", "st", "ssl")
GROUPS = {"asr": ("asr_en", "asr_fr"), "st": ("st",), "ssl": ("ssl",)}
UAS = ("asr", "st", "ssl")
MSP = tasks.task_class("msp_synth")  # its named orders and constraint group (class attributes)


def _gram(*rows):
    j = torch.tensor(rows, dtype=torch.float64)
    return j @ j.T


def _close(w, expected):
    torch.testing.assert_close(w.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)


# --- penalty schedules -----------------------------------------------------------------------
def test_schedule_in_steps_linear_and_stairs():
    spe = 7  # the engine passes epoch = step / 7, which is not exact in binary
    lin = Schedule(0.1, 0.01, 1.5, unit="steps")
    assert lin.value(0 / spe, steps_per_epoch=spe) == pytest.approx(0.1)
    assert lin.value(30 / spe, steps_per_epoch=spe) == pytest.approx(0.4)  # 0.1 + 30 * 0.01
    assert lin.value(500 / spe, steps_per_epoch=spe) == 1.5  # capped
    stairs = Schedule(0.1, 0.02, None, unit="steps", every=10)
    assert stairs.value(9 / spe, steps_per_epoch=spe) == pytest.approx(0.1)
    assert stairs.value(10 / spe, steps_per_epoch=spe) == pytest.approx(0.12)
    assert stairs.value(29 / spe, steps_per_epoch=spe) == pytest.approx(0.14)
    # Every step of a long run lands on its stair, whatever the division's rounding.
    for s in range(0, 1000):
        assert stairs.value(s / spe, steps_per_epoch=spe) == pytest.approx(0.1 + 0.02 * (s // 10)), s


def test_schedule_as_fraction_of_the_run():
    spe, total = 7, 200
    ramp = Schedule(0.1, 1.4, unit="fraction")  # 0.1 at the start, 1.5 at the end of any run
    assert ramp.value(0, steps_per_epoch=spe, total_steps=total) == pytest.approx(0.1)
    assert ramp.value(100 / spe, steps_per_epoch=spe, total_steps=total) == pytest.approx(0.8)
    assert ramp.value(199 / spe, steps_per_epoch=spe, total_steps=total) == pytest.approx(0.1 + 1.4 * 199 / 200)
    quarters = Schedule(0.1, 0.35, unit="fraction", every=0.25)
    assert quarters.value(49 / spe, steps_per_epoch=spe, total_steps=total) == pytest.approx(0.1)
    assert quarters.value(50 / spe, steps_per_epoch=spe, total_steps=total) == pytest.approx(0.45)
    assert quarters.value(150 / spe, steps_per_epoch=spe, total_steps=total) == pytest.approx(1.15)
    tenths = Schedule(0.0, 1.0, unit="fraction", every=0.1)  # 0.3 / 0.1 < 3 in floats
    for s in range(total):
        assert tenths.value(s / spe, steps_per_epoch=spe, total_steps=total) == pytest.approx(s * 10 // total), s


def test_schedule_in_epochs_keeps_its_meaning_and_gets_stairs():
    assert Schedule(0.1, 0.02, 1.5).value(1.5) == pytest.approx(0.13)  # linear within the epoch
    per_epoch = Schedule(0.1, 0.02, 1.5, every=1)  # the paper's code: one increase per epoch
    assert per_epoch.value(0.99) == pytest.approx(0.1)
    assert per_epoch.value(1.5) == pytest.approx(0.12)
    assert per_epoch.value(3.0) == pytest.approx(0.16)
    assert Schedule.from_spec({"start": 0.1, "step": 0.02, "unit": "steps", "every": 10}).every == 10


def test_schedule_errors_name_the_field_and_allowed_values():
    with pytest.raises(ValueError, match="unit 'hours' is not allowed; use one of epochs, steps, fraction"):
        Schedule(unit="hours")
    with pytest.raises(ValueError, match="every must be > 0"):
        Schedule(unit="steps", every=0)
    with pytest.raises(ValueError, match="whole number of steps"):
        Schedule(unit="steps", every=2.5)
    with pytest.raises(ValueError, match=r"every must be in \(0, 1\] with unit fraction"):
        Schedule(unit="fraction", every=2)
    with pytest.raises(ValueError, match="unknown keys.*allowed: start, step, cap, unit, every"):
        Schedule.from_spec({"start": 1, "per": "steps"})
    with pytest.raises(ValueError, match="needs the run length"):
        Schedule(unit="steps").value(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        Schedule(unit="fraction").value(1.0, steps_per_epoch=5)


def test_recipe_reads_the_run_length():
    r = build_recipe("vm", NAMES, GROUPS, order=UAS, solver="ew", eta=Schedule(0.1, 0.01, 1.5, unit="steps"))
    losses = torch.ones(4)
    with pytest.raises(ValueError, match=r"level 1 \(st\).*'steps'.*steps_per_epoch.*set_run_length"):
        r.weights(None, losses, NAMES, epoch=0.0)
    r.set_run_length(steps_per_epoch=7, total_steps=200)
    w, info = r.weights(None, losses, NAMES, epoch=30 / 7)
    assert info["etas"] == [1.0, pytest.approx(0.4), pytest.approx(0.4)]
    _close(w, [1.0, 1.0, 0.4, 0.4])  # ew: the plain sum within a level
    assert r.etas(60 / 7) == [1.0, pytest.approx(0.7), pytest.approx(0.7)]
    with pytest.raises(ValueError, match="steps_per_epoch must be an integer >= 1"):
        r.set_run_length(steps_per_epoch=0)
    frac = Recipe.from_levels(
        [
            {"objectives": ["a"], "solver": "ew"},
            {"objectives": ["b"], "solver": "ew", "eta": {"start": 0.0, "step": 2.0, "unit": "fraction"}},
        ]
    )
    frac.set_run_length(steps_per_epoch=10)
    with pytest.raises(ValueError, match="needs total_steps"):
        frac.etas(1.0)
    frac.set_run_length(total_steps=40)  # keeps steps_per_epoch
    assert frac.etas(1.0) == [1.0, pytest.approx(0.5)]  # step 10 of 40
    with pytest.raises(ValueError, match="level 1: eta: schedule unit 'week'"):
        Recipe.from_levels(
            [{"objectives": ["a"], "solver": "ew"}, {"objectives": ["b"], "solver": "ew", "eta": {"unit": "week"}}]
        )


def test_config_schedule_reaches_the_recipe_through_train():
    cfg = C.from_dict(
        {
            "recipe": {"kind": "vm", "eta": {"start": 0.1, "step": 0.05, "cap": 1.0, "unit": "steps", "every": 10}},
            "solver": {"name": "ew"},
            "train": {"steps": 300},
        }
    )
    assert (cfg.recipe.eta.unit, cfg.recipe.eta.every) == ("steps", 10)
    r = builders.recipe_from_config(cfg, MSP, NAMES, GROUPS, steps_per_epoch=13)
    assert (r.steps_per_epoch, r.total_steps) == (13, 300)
    assert r.etas(25 / 13) == [1.0, pytest.approx(0.2), pytest.approx(0.2)]  # two stairs at step 25
    assert r.etas(299 / 13)[1] == 1.0
    frac = C.from_dict(
        {
            "recipe": {"kind": "vc", "eta": {"start": 0.0, "step": 1.0, "cap": None, "unit": "fraction"}},
            "solver": {"name": "ew"},
            "train": {"steps": 80},
        }
    )
    assert builders.recipe_from_config(frac, MSP, NAMES, GROUPS, steps_per_epoch=8).etas(20 / 8) == [
        1.0,
        pytest.approx(0.25),
    ]
    # An epoch schedule (the default) needs no run length and keeps its meaning.
    old = C.from_dict({"recipe": {"kind": "vm", "eta": {"start": 0.1, "step": 0.02, "cap": 1.5}}})
    assert (old.recipe.eta.unit, old.recipe.eta.every) == ("epochs", None)
    etas = builders.recipe_from_config(old, MSP, NAMES, GROUPS).etas(2.5)
    assert etas == [1.0, pytest.approx(0.15), pytest.approx(0.15)]


def test_config_schedule_from_set_overrides():
    data = C.apply_overrides(
        {"recipe": {"kind": "vm"}}, ["recipe.eta.unit=fraction", "recipe.eta.every=0.25"], on_note=lambda m: None
    )
    cfg = C.from_dict(data)
    assert (cfg.recipe.eta.unit, cfg.recipe.eta.every) == ("fraction", 0.25)


@pytest.mark.parametrize(
    "eta, message",
    [
        ({"unit": "hours"}, "recipe.eta.unit: 'hours' is not allowed; use one of 'epochs', 'steps', 'fraction'"),
        ({"unit": "steps", "every": 2.5}, "recipe.eta.every: 2.5 must be a whole number of steps"),
        ({"unit": "fraction", "every": 2}, r"recipe.eta.every: 2.0 must be in \(0, 1\]"),
        ({"every": 0}, "recipe.eta.every: 0.0 must be > 0"),
        ({"start": -1}, "recipe.eta.start: -1.0 must be >= 0"),
        ({"cap": -0.5}, "recipe.eta.cap: -0.5 must be >= 0"),
        ({"per": "steps"}, "unknown key recipe.eta.per; allowed keys in recipe.eta: start, step, cap, unit, every"),
    ],
)
def test_config_schedule_errors(eta, message):
    with pytest.raises(C.ConfigError, match=message):
        C.from_dict({"recipe": {"kind": "vm", "eta": eta}})


def test_config_custom_levels_checked():
    with pytest.raises(C.ConfigError, match="recipe.levels: level 1: eta: schedule unit 'weeks' is not allowed"):
        C.from_dict(
            {
                "recipe": {
                    "kind": "custom",
                    "levels": [
                        {"objectives": ["a"], "solver": "mgda"},
                        {"objectives": ["b"], "solver": "ew", "eta": {"unit": "weeks"}},
                    ],
                }
            }
        )
    with pytest.raises(C.ConfigError, match="recipe.levels: .*momentum must be a number in"):
        C.from_dict(
            {
                "recipe": {
                    "kind": "custom",
                    "levels": [{"objectives": ["a", "b"], "solver": "mgda", "solver_options": {"momentum": 2}}],
                }
            }
        )


def test_deepspeed_section_refuses_fraction():
    with pytest.raises(C.ConfigError, match="dist_soup.recipe.eta.unit: 'fraction' needs the run's number of steps"):
        C.deepspeed_section({"recipe": {"kind": "vm", "order": ["a"], "eta": {"unit": "fraction"}}})
    with pytest.raises(C.ConfigError, match=r"dist_soup.recipe.levels\[1\].eta.unit: 'fraction'"):
        C.deepspeed_section(
            {
                "recipe": {
                    "kind": "custom",
                    "levels": [
                        {"objectives": ["a"], "solver": "ew"},
                        {"objectives": ["b"], "solver": "ew", "eta": {"unit": "fraction"}},
                    ],
                }
            }
        )
    sec = C.deepspeed_section({"recipe": {"kind": "vm", "order": ["a"], "eta": {"unit": "steps"}}})
    assert sec.recipe.eta.unit == "steps"
    # no task here to name an order or a constraint: the section names its own groups
    with pytest.raises(C.ConfigError, match=r"dist_soup.recipe.order: 'uas': recipe vm needs the names of"):
        C.deepspeed_section({"recipe": {"kind": "vm", "order": "uas"}})
    with pytest.raises(C.ConfigError, match="dist_soup.recipe.constraint: recipe vc needs the name"):
        C.deepspeed_section({"recipe": {"kind": "vc"}})


# --- MGDA normalization: hand-computed K = 2 cases --------------------------------------------
# g1 = (2, 0), g2 = (0, 1), losses (2, 0.5). With u_k = g_k / n_k the min-norm weight is
# mu_1 = clip((u2 - u1).u2 / ||u1 - u2||^2, 0, 1), and lambda = mu / n.
G_ORTH = _gram([2.0, 0.0], [0.0, 1.0])
L_ORTH = torch.tensor([2.0, 0.5])
NORMALIZED_CASES = [
    # none: n = (1, 1); (-2, 1).(0, 1) / 5 = 1/5.
    ("none", [0.2, 0.8], [0.4, 0.8]),
    # l2: n = (2, 1); u = (1, 0), (0, 1); (-1, 1).(0, 1) / 2 = 1/2; lambda = (1/4, 1/2).
    ("l2", [0.25, 0.5], [0.5, 0.5]),
    # loss: n = (2, 0.5); u = (1, 0), (0, 2); (-1, 2).(0, 2) / 5 = 4/5; lambda = (0.4, 0.4).
    ("loss", [0.4, 0.4], [0.8, 0.4]),
    # loss+: n = (4, 0.5); u = (0.5, 0), (0, 2); (-0.5, 2).(0, 2) / 4.25 = 16/17;
    # lambda = (16/17 / 4, 1/17 / 0.5) = (4/17, 2/17).
    ("loss+", [4 / 17, 2 / 17], [8 / 17, 2 / 17]),
]


@pytest.mark.parametrize("mode, weights, direction", NORMALIZED_CASES)
def test_mgda_normalization_hand_computed(mode, weights, direction):
    w = build("mgda", normalization=mode).weights(G_ORTH, L_ORTH)
    _close(w, weights)
    j = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    _close(j.T @ w.double(), direction)  # the normalized combination sum_k mu_k g_k / n_k


def test_mgda_normalization_at_a_vertex():
    # g1 = (2, 0), g2 = (1, 1): g1.g2 = ||g2||^2, so plain MGDA sits on the vertex of g2, while
    # l2 makes both unit vectors and takes the bisector (mu = 1/2 for any two nonzero rows).
    g = _gram([2.0, 0.0], [1.0, 1.0])
    _close(build("mgda").weights(g, torch.ones(2)), [0.0, 1.0])
    _close(build("mgda", normalization="l2").weights(g, torch.ones(2)), [0.25, 0.5 / 2**0.5])


def test_mgda_option_errors():
    with pytest.raises(ValueError, match="unknown normalization 'l1'; allowed: none, l2, loss, loss\\+"):
        build("mgda", normalization="l1")
    for bad in (1.0, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"option momentum must be a number in \[0, 1\)"):
            build("mgda", momentum=bad)
    with pytest.raises(ValueError, match="unknown options \\['beta'\\]; allowed: normalization='none', momentum=0.0"):
        build("mgda", beta=0.9)
    with pytest.raises(
        C.ConfigError,
        match="solver.options.beta: solver 'mgda' has no option 'beta'; its options: normalization, momentum",
    ):
        C.from_dict({"solver": {"name": "mgda", "options": {"beta": 0.9}}})
    with pytest.raises(C.ConfigError, match=r"solver.options: .*momentum.*\[0, 1\)"):
        C.from_dict({"solver": {"name": "mgda", "options": {"momentum": 1.5}}})
    with pytest.raises(C.ConfigError, match="solver.options: .*allowed: none, l2, loss, loss\\+"):
        C.from_dict({"solver": {"name": "mgda", "options": {"normalization": "max"}}})
    with pytest.raises(C.ConfigError, match="solver.name: 'mgdb' is not a solver; use one of ew, mgda"):
        C.from_dict({"solver": {"name": "mgdb"}})
    cfg = C.from_dict({"solver": {"name": "mgda", "options": {"normalization": "loss+", "momentum": 0.9}}})
    assert cfg.solver.options == {"normalization": "loss+", "momentum": 0.9}


# --- MGDA momentum ----------------------------------------------------------------------------
# G_A: g1 = (2, 0), g2 = (1, 1) -> vertex of g2, (0, 1); G_B: the rows swapped -> (1, 0).
G_A = _gram([2.0, 0.0], [1.0, 1.0])
G_B = _gram([1.0, 1.0], [2.0, 0.0])


def test_mgda_flips_and_momentum_smooths_hand_computed():
    plain = build("mgda")
    assert [plain.weights(g, torch.ones(2)).tolist() for g in (G_A, G_B, G_A, G_B)] == [
        [0.0, 1.0],
        [1.0, 0.0],
        [0.0, 1.0],
        [1.0, 0.0],
    ]
    smooth = build("mgda", momentum=0.5)
    # mu_1 = (0, 1); mu_2 = (0, 0.5) + (0.5, 0) = (0.5, 0.5); mu_3 = (0.25, 0.25) + (0, 0.5);
    # mu_4 = (0.125, 0.375) + (0.5, 0).
    expected = [[0.0, 1.0], [0.5, 0.5], [0.25, 0.75], [0.625, 0.375]]
    for g, e in zip((G_A, G_B, G_A, G_B), expected):
        _close(smooth.weights(g, torch.ones(2)), e)


def test_mgda_momentum_on_the_simplex_then_current_normalizers():
    s = build("mgda", normalization="loss", momentum=0.5)
    # Solve 1: the "loss" case above, mu* = (0.8, 0.2), n = (2, 0.5): lambda = (0.4, 0.4).
    _close(s.weights(G_ORTH, L_ORTH), [0.4, 0.4])
    # Solve 2: losses (1, 1), so n = 1 and mu* = the plain (0.2, 0.8);
    # mu_2 = 0.5 (0.8, 0.2) + 0.5 (0.2, 0.8) = (0.5, 0.5), divided by the current n = (1, 1).
    _close(s.weights(G_ORTH, torch.ones(2)), [0.5, 0.5])
    _close(s.state_dict()["mu"], [0.5, 0.5])


def test_mgda_momentum_state_round_trip():
    a = build("mgda", momentum=0.8)
    assert a.state_dict() == {"mu": None}
    for g in (G_A, G_B, G_ORTH):
        a.weights(g, torch.ones(2))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as a checkpoint stores it
    buf.seek(0)
    b = build("mgda", momentum=0.8)
    b.load_state_dict(torch.load(buf))
    fresh = build("mgda", momentum=0.8)
    for g, losses in ((G_B, torch.ones(2)), (G_A, torch.tensor([2.0, 3.0]))):
        wa, wb, wf = (s.weights(g, losses) for s in (a, b, fresh))
        torch.testing.assert_close(wa, wb, rtol=0, atol=0)
    assert not torch.equal(wa, wf)  # the state matters: a fresh solver gives other weights
    # Through a recipe, as the engine's checkpoint does.
    r1 = build_recipe("vm", NAMES, GROUPS, order=UAS, solver="mgda", solver_options={"momentum": 0.9})
    r2 = build_recipe("vm", NAMES, GROUPS, order=UAS, solver="mgda", solver_options={"momentum": 0.9})
    gram = _gram([2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0])
    r1.weights(gram, torch.ones(4), NAMES, epoch=0)
    r2.load_state_dict(r1.state_dict())
    torch.testing.assert_close(
        r1.weights(gram.flip(0, 1), torch.ones(4), NAMES, epoch=1)[0],
        r2.weights(gram.flip(0, 1), torch.ones(4), NAMES, epoch=1)[0],
        rtol=0,
        atol=0,
    )


def test_mgda_state_errors():
    assert build("mgda").state_dict() == {}  # no momentum: stateless, as before
    with pytest.raises(ValueError, match="without momentum the solver keeps no state"):
        build("mgda").load_state_dict({"mu": None})
    m = build("mgda", momentum=0.5)
    with pytest.raises(ValueError, match="key 'mu' only"):
        m.load_state_dict({})
    with pytest.raises(ValueError, match="point of the simplex"):
        m.load_state_dict({"mu": torch.tensor([0.7, 0.7])})
    m.load_state_dict({"mu": torch.tensor([0.25, 0.25, 0.5])})
    with pytest.raises(ValueError, match="holds 3 weights but this Gram has 2 objectives"):
        m.weights(G_A, torch.ones(2))


# --- end to end: the options through `dist-soup train`, resumed exactly ------------------------
@pytest.mark.slow
def test_train_with_step_schedule_and_mgda_momentum_resumes_exactly(tmp_path):
    import json

    import yaml

    from .test_train import SMALL, cli, summary

    data = json.loads(json.dumps(SMALL))
    data["task"]["options"]["objectives"] = ["left", "right", "sum"]
    data["recipe"] = {
        "kind": "custom",
        "levels": [
            {
                "objectives": ["left", "right"],
                "solver": "mgda",
                "solver_options": {"normalization": "loss", "momentum": 0.8},
            },
            {
                "objectives": ["sum"],
                "solver": "ew",
                "penalty": True,
                "eta": {"start": 0.1, "step": 0.05, "every": 2, "unit": "steps"},
            },
        ],
    }
    data["train"]["steps"] = 8
    cfg = tmp_path / "options.yaml"
    cfg.write_text(yaml.safe_dump(data))
    straight, split = tmp_path / "straight", tmp_path / "split"
    out = cli("train", "--config", cfg, "--nproc", 2, "--run-dir", straight)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    # The penalty weight climbs a stair every 2 steps, well inside the first epoch.
    assert [l["weights"]["sum"] for l in lines] == pytest.approx([0.1 + 0.05 * (s // 2) for s in range(8)])
    first = cli("train", "--config", cfg, "--nproc", 2, "--run-dir", split, "--steps", 5)
    assert first.returncode == 0, first.stderr
    again = cli("train", "--config", cfg, "--nproc", 2, "--run-dir", split, "--resume")
    assert again.returncode == 0, again.stderr
    assert summary(split)["param_sha256"] == summary(straight)["param_sha256"]


def test_config_order_and_constraint_resolve_against_the_task():
    def levels(recipe):
        cfg = C.from_dict({"recipe": recipe, "solver": {"name": "ew"}})
        return [lv.objectives for lv in builders.recipe_from_config(cfg, MSP, NAMES, GROUPS).levels]

    assert levels({"kind": "vm"}) == [("asr_en", "asr_fr"), ("st",), ("ssl",)]  # the task's first order
    assert levels({"kind": "vm", "order": "usa"}) == [("st",), ("asr_en", "asr_fr"), ("ssl",)]
    assert levels({"kind": "vm", "order": ["ssl", "asr", "st"]}) == [("ssl",), ("asr_en", "asr_fr"), ("st",)]
    assert levels({"kind": "vc"})[1] == ("ssl",)  # the task's constraint group
    assert levels({"kind": "vc", "constraint": "st"}) == [("asr_en", "asr_fr", "ssl"), ("st",)]
    for bad in ([], ["asr", "asr"], ["asr", 3]):
        with pytest.raises(C.ConfigError, match="recipe.order: .* must be a non-empty list of distinct group names"):
            C.from_dict({"recipe": {"kind": "vm", "order": bad}})
    with pytest.raises(C.ConfigError, match="recipe.order: 'uas' is not an order of task 'multidigits'; use a list"):
        C.from_dict({"task": {"name": "multidigits"}, "recipe": {"kind": "vm", "order": "uas"}})
    with pytest.raises(C.ConfigError, match="recipe.constraint: 'ssl' is only used with recipe.kind vc"):
        C.from_dict({"recipe": {"kind": "vm", "constraint": "ssl"}})
    digits = tasks.build("multidigits")
    cfg = C.from_dict({"task": {"name": "multidigits"}, "recipe": {"kind": "vc"}})
    with pytest.raises(ValueError, match="task 'multidigits' has no constraint group; give recipe.constraint"):
        builders.recipe_from_config(cfg, digits, digits.objectives, digits.groups)
