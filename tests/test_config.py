"""Config loading, validation errors that name the key, overrides, fingerprints."""

import pytest

from dist_soup import config as C


def test_defaults_round_trip(tmp_path):
    cfg = C.from_dict({})
    path = tmp_path / "c.yaml"
    path.write_text(C.dump(cfg))
    again = C.load(path)
    assert again == cfg
    assert C.fingerprint(again) == C.fingerprint(cfg)


@pytest.mark.parametrize(
    "data, words",
    [
        ({"trian": {}}, ["unknown key trian", "train"]),
        ({"train": {"stepz": 3}}, ["unknown key train.stepz", "steps"]),
        ({"train": {"steps": "ten"}}, ["train.steps", "'ten'", "integer"]),
        ({"train": {"steps": 0}}, ["train.steps", "> 0"]),
        ({"compression": {"mode": "ring"}}, ["compression.mode", "'ring'", "allgather"]),
        ({"recipe": {"kind": "vm", "order": "asu"}}, ["recipe.order", "'asu'", "uas"]),
        ({"recipe": {"kind": "vs", "order": "uas"}}, ["recipe.order", "vm"]),
        ({"recipe": {"kind": "custom"}}, ["recipe.levels"]),
        ({"selection": {"rule": "budget"}}, ["selection.budget"]),
        ({"train": {"reuse_jacobian": "yes"}}, ["train.reuse_jacobian", "boolean"]),
        ({"optimizer": {"lr": -1}}, ["optimizer.lr", "> 0"]),
        ([1, 2], ["mapping"]),
    ],
)
def test_bad_values_name_key_and_allowed(data, words):
    with pytest.raises(C.ConfigError) as info:
        C.from_dict(data)
    for w in words:
        assert w in str(info.value)


def test_overrides_are_checked_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n")
    cfg = C.load(path, ["train.steps=7", "compression.jacobian.options.bits=8", "selection.tau=-0.1"])
    assert cfg.train.steps == 7 and cfg.compression.jacobian.options == {"bits": 8}
    assert cfg.selection.tau == -0.1
    with pytest.raises(C.ConfigError, match="train.nope"):
        C.load(path, ["train.nope=1"])
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load(path, ["train.steps"])
    with pytest.raises(C.ConfigError, match="is not a section"):
        C.load(path, ["train.steps.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load(top)


def test_fingerprint_changes_with_any_value():
    a = C.from_dict({})
    b = C.from_dict({"compression": {"update": {"name": "qsgd", "options": {"bits": 8}}}})
    assert C.fingerprint(a) != C.fingerprint(b)
    # every leaf counts, and an option mapping counts whole
    seen = {C.fingerprint(a), C.fingerprint(b)}
    for data in (
        {"seed": 1},
        {"recipe": {"eta": {"cap": 2.0}}},
        {"solver": {"options": {"momentum": 0.5}}},
        {"compression": {"update": {"name": "qsgd", "options": {}}}},
        {"task": {"objectives": ["st"]}},
    ):
        seen.add(C.fingerprint(C.from_dict(data)))
    assert len(seen) == 7


def test_fingerprint_ignores_keys_left_at_their_defaults():
    # What it hashes is what differs from the defaults, so a key added to the schema later (at a
    # default that keeps the old behaviour) leaves earlier configs' fingerprints, and with them
    # resumes and finished sweep cells, as they were.
    a = C.from_dict({"seed": 3})
    b = C.from_dict(
        {"seed": 3, "recipe": {"constraint": None, "order": None}, "train": {"steps": C.Config().train.steps}}
    )
    assert C.fingerprint(a) == C.fingerprint(b)
    assert C.fingerprint(a) != C.fingerprint(C.from_dict({}))


def test_fingerprint_follows_the_defaults_version(monkeypatch):
    cfg = C.from_dict({"seed": 3})
    before = C.fingerprint(cfg)
    monkeypatch.setattr(C, "DEFAULTS_VERSION", C.DEFAULTS_VERSION + 1)  # a default changed meaning
    assert C.fingerprint(cfg) != before


def test_learning_rate_schedules():
    from dist_soup.builders import lr_factor

    cfg = C.from_dict({"train": {"steps": 100}, "optimizer": {"schedule": "cosine", "warmup_steps": 10}})
    f = [lr_factor(cfg, s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5) and f[99] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    lin = C.from_dict({"train": {"steps": 10}, "optimizer": {"schedule": "linear"}})
    assert [lin_f for lin_f in (lr_factor(lin, s) for s in (0, 5, 9))] == pytest.approx([1.0, 0.5, 0.1])
    assert lr_factor(C.from_dict({}), 123) == 1.0
    with pytest.raises(C.ConfigError, match="optimizer.schedule"):
        C.from_dict({"optimizer": {"schedule": "step"}})
    with pytest.raises(C.ConfigError, match="optimizer.warmup_steps"):
        C.from_dict({"optimizer": {"warmup_steps": -1}})
