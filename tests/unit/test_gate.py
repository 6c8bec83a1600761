"""The promotion gate as pure functions: a metrics dict (the layout of ``reports/metrics.json``) in,
a decision out. Each rule is shown deciding on its own; the register stage on a real MLflow store is
tested in tests/flows/test_registry.py."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.errors import ConfigError, PigeonError
from pigeon.registry import ALL_PASSED, RULES, Scores, decide, gate
from tests.conftest import smoke_params

PASSING = {"pigeon": (0.60, 0.40), "stage1": (0.30, 0.40), "foundation": (0.20, 0.10)}


def evaluation(rows=PASSING, chance=None, protocol="ground_truth") -> dict:
    """An evaluation run: ``rows`` maps a method to (style_accuracy, content_accuracy)."""
    out = {protocol: {m: {"style_accuracy": p, "content_accuracy": s, "frechet_distance": 9.0}
                      for m, (p, s) in rows.items()},
           "ci95": {protocol: {"pigeon": {"style_accuracy": [0.0, 1.0]}}}}
    if chance is not None:
        out["chance"] = {"style_accuracy": chance[0], "content_accuracy": chance[1]}
    return out


def config(*overrides: str):
    return smoke_params(*overrides).register


def checks(decision) -> dict:
    return {c["rule"]: c for c in decision.report()["checks"]}


def test_defaults_are_above_chance_for_the_default_styles():
    from pigeon.config import STYLES

    cfg = config()
    assert cfg.min_personalization > 1 / len(STYLES) and cfg.min_semantic > 0.0
    assert (cfg.min_gain, cfg.semantic_tolerance) == (0.0, 0.02)


def test_a_passing_run_promotes_and_reports_every_rule():
    decision = decide(evaluation(), config())
    assert decision.promote and decision.rule == ALL_PASSED
    assert decision.why.startswith("promoted: no champion yet")
    report = json.loads(json.dumps(decision.report()))  # what reports/registry.json holds
    assert [c["rule"] for c in report["checks"]] == list(RULES)
    assert [c["passed"] for c in report["checks"]] == [True, True, True, None]  # no champion: n/a
    by_rule = checks(decision)
    assert by_rule["beats_zero_shot"]["figures"] == pytest.approx(
        {"metric": "style_accuracy", "candidate": 0.60, "row": "foundation", "zero_shot": 0.20, "gain": 0.40,
         "min_gain": 0.0})
    assert by_rule["keeps_semantics"]["figures"]["row"] == "stage1"
    assert by_rule["floors"]["figures"]["style_accuracy"] == {"candidate": 0.60, "floor": 0.15, "chance": None}


@pytest.mark.parametrize(("rows", "chance", "rule"), [
    # the incident: a first version with style 0.1375 and content 0.0 (below both floors)
    ({"pigeon": (0.1375, 0.0), "stage1": (0.10625, 0.0125), "foundation": (0.14375, 0.00625)}, None, "floors"),
    # below the style floor (0.15) though it beats the zero-shot row
    ({"pigeon": (0.14, 0.30), "foundation": (0.05, 0.1)}, None, "floors"),
    # below the content floor (0.01)
    ({"pigeon": (0.60, 0.005), "foundation": (0.05, 0.0)}, None, "floors"),
    # above the absolute style floor but not above chance (4 styles: 0.25)
    ({"pigeon": (0.25, 0.30), "foundation": (0.05, 0.1)}, (0.25, 0.001), "floors"),
    ({"pigeon": (0.26, 0.30), "foundation": (0.05, 0.1)}, (0.25, 0.001), ALL_PASSED),
    # worse than the zero-shot foundation row of the same run
    ({"pigeon": (0.30, 0.30), "foundation": (0.35, 0.1)}, None, "beats_zero_shot"),
    # equal to it: a gain of 0 is not > min_gain
    ({"pigeon": (0.30, 0.30), "foundation": (0.30, 0.1)}, None, "beats_zero_shot"),
    # no zero-shot row to compare with
    ({"pigeon": (0.30, 0.30), "stage1": (0.10, 0.1)}, None, "beats_zero_shot"),
    # loses content against the best generative baseline (stage1 0.40, tolerance 0.02)
    ({"pigeon": (0.60, 0.37), "foundation": (0.10, 0.05), "stage1": (0.40, 0.40)}, None, "keeps_semantics"),
    ({"pigeon": (0.60, 0.38), "foundation": (0.10, 0.05), "stage1": (0.40, 0.40)}, None, ALL_PASSED),
    # the best baseline may be the foundation row
    ({"pigeon": (0.60, 0.37), "foundation": (0.10, 0.40), "stage1": (0.40, 0.05)}, None, "keeps_semantics"),
])
def test_each_rule_decides_alone(rows, chance, rule):
    decision = decide(evaluation(rows, chance), config())
    assert (decision.rule, decision.promote) == (rule, rule == ALL_PASSED)
    assert decision.why.startswith("promoted" if decision.promote else f"not promoted ({rule})")
    assert [c["rule"] for c in decision.report()["checks"]] == list(RULES)


def test_only_stage1_and_foundation_are_generative_baselines():
    """Ablations and pigeon_select are the candidate itself; retrieval rows and truth generate nothing."""
    rows = {**PASSING, "pigeon_select": (0.6, 0.9), "untrained_mask_generator": (0.1, 0.9),
            "no_history_mask": (0.1, 0.9), "no_adapter": (0.1, 0.9), "reference_copy": (0.0, 1.0),
            "truth": (1.0, 1.0)}
    decision = decide(evaluation(rows), config())
    assert decision.promote and checks(decision)["keeps_semantics"]["figures"]["row"] == "stage1"


def test_a_run_without_baselines_fails_keeps_semantics_too():
    decision = decide(evaluation({"pigeon": (0.9, 0.9)}), config())
    assert not decision.promote and decision.rule == "beats_zero_shot"
    assert checks(decision)["keeps_semantics"]["passed"] is False


def test_the_champion_must_be_beaten():
    cfg = config("register.min_gain=0.05", "register.semantic_tolerance=0.02")
    champ = Scores(0.50, 0.40)
    run = {"stage1": (0.3, 0.40), "foundation": (0.2, 0.1)}
    cases = [((0.55, 0.40), False),  # gain equal to min_gain is not enough
             ((0.56, 0.38), True),  # a drop equal to the tolerance is allowed
             ((0.90, 0.37), False)]  # too much content lost (vs the champion and stage 1)
    for pigeon, promote in cases:
        decision = decide(evaluation({"pigeon": pigeon, **run}), cfg, champ, "3")
        assert decision.promote == promote, pigeon
    lost = decide(evaluation({"pigeon": (0.90, 0.39), **run}), cfg, Scores(0.5, 0.45), "3")
    assert lost.rule == "beats_champion" and "content_accuracy" in lost.why
    figures = checks(lost)["beats_champion"]["figures"]
    assert figures["champion_version"] == 3 and figures["content_accuracy"]["drop"] == pytest.approx(0.06)
    no_scores = decide(evaluation({"pigeon": (0.9, 0.9), **run}), cfg, None, "3")  # no recorded scores
    assert no_scores.rule == "beats_champion" and "pigeon promote" in no_scores.why


def test_beating_a_champion_does_not_excuse_the_other_rules():
    """A weak champion (crowned before the gate had floors) is no bar: the run's rows still are."""
    decision = decide(evaluation({"pigeon": (0.14, 0.30), "foundation": (0.16, 0.1)}), config(),
                      Scores(0.1375, 0.0), "1")
    assert not decision.promote and decision.rule == "floors"
    assert checks(decision)["beats_champion"]["passed"] is True
    assert checks(decision)["beats_zero_shot"]["passed"] is False


@settings(max_examples=300, deadline=None)
@given(zero_shot=st.floats(0.0, 1.0), shortfall=st.floats(0.0, 1.0), semantic=st.floats(0.0, 1.0),
       champion=st.one_of(st.none(), st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0))))
def test_a_version_no_better_than_zero_shot_is_never_promoted(zero_shot, shortfall, semantic, champion):
    personalization = max(0.0, zero_shot - shortfall)
    run = evaluation({"pigeon": (personalization, semantic), "stage1": (0.0, 0.0),
                      "foundation": (zero_shot, 0.0)})
    cfg = config("register.min_personalization=0", "register.min_semantic=0")  # the floors out of the way
    decision = decide(run, cfg, None if champion is None else Scores(*champion),
                      None if champion is None else "1")
    assert not decision.promote and checks(decision)["beats_zero_shot"]["passed"] is False


def test_the_protocol_and_metrics_come_from_the_config():
    rows = evaluation(PASSING, protocol="paper")
    with pytest.raises(PigeonError, match="no headline number ground_truth.pigeon.style_accuracy"):
        decide(rows, config())
    assert decide(rows, config("register.protocol=paper")).promote
    with pytest.raises(PigeonError, match=r"ground_truth\.pigeon\.content_top5_accuracy.*register\.protocol"):
        decide(evaluation(), config("register.semantic_metric=content_top5_accuracy"))  # not in the rows


def test_unreadable_numbers_fail_clearly():
    broken = evaluation()
    broken["ground_truth"]["foundation"]["style_accuracy"] = math.nan
    with pytest.raises(PigeonError, match=r"ground_truth\.foundation\.style_accuracy is not a finite number"):
        decide(broken, config())
    with pytest.raises(PigeonError, match=r"chance\.style_accuracy is not a finite number"):
        decide(evaluation(chance=("0.1", 0.001)), config())


@pytest.mark.parametrize(("override", "message"), [
    ("register.semantic_metric=frechet_distance", "lower-is-better"),
    ("register.protocol=gt", "'ground_truth' or 'paper'"),
    ("register.min_personalization=-0.1", "register.min_personalization"),
    ("register.min_floor=0.2", "register.min_floor"),
])
def test_bad_gate_config_fails_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config(override)


def test_gate_takes_scores_directly():
    base = {"foundation": Scores(0.20, 0.10), "stage1": Scores(0.30, 0.48)}
    assert gate(Scores(0.50, 0.50), None, config(), None, base).promote
    assert not gate(Scores(0.50, 0.50), None, config(), None, base, {"style_accuracy": 0.5}).promote
