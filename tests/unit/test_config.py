"""The typed config: every profile validates; bad params fail with a one-line message naming the key."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pigeon.config import Params, dump_params, load_params, params_from_dict, parse_override
from pigeon.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PROFILES = sorted(p.stem for p in (REPO / "profiles").glob("*.yaml"))


@pytest.fixture
def params_dir(tmp_path) -> Path:
    """A copy of params.yaml and profiles/ to break."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    return tmp_path


def _edit(path: Path, change) -> Path:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates(profile):
    params = load_params(REPO / "params.yaml", profile=profile)
    assert params.profile == profile
    assert params.simulate.window == params.model.history_len + 1


def test_params_round_trip_and_are_frozen():
    params = load_params(REPO / "params.yaml")
    assert params_from_dict(yaml.safe_load(dump_params(params))) == params
    with pytest.raises(ValidationError, match="frozen"):
        params.seed = 3


def test_profile_and_overrides_merge_deeply():
    params = load_params(
        REPO / "params.yaml", profile="smoke", overrides=["stage1.lora.r=4", "simulate.split=[0.6, 0.2, 0.2]"]
    )
    assert params.stage1.lora.r == 4 and params.stage1.lora.alpha == 16  # sibling keys kept
    assert params.stage1.max_steps == 30  # from the smoke profile
    assert params.simulate.split == (0.6, 0.2, 0.2)


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("PIGEON_PROFILE", "smoke")
    assert load_params(REPO / "params.yaml").profile == "smoke"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(sed=1), r"sed: unknown key"),
        (lambda d: d["simulate"].update(noise_rat=0.1), r"simulate\.noise_rat: unknown key"),
        (lambda d: d["stage1"]["lora"].update(rank=4), r"stage1\.lora\.rank: unknown key"),
        (lambda d: d["stage1"].update(lr=float("nan")), r"stage1\.lr: .*finite"),
        (lambda d: d["dpo"].update(beta=float("inf")), r"dpo\.beta: .*finite"),
        (
            lambda d: d["stage1"].update(batch_size=-4),
            r"stage1\.batch_size: .*greater than or equal to 1.*-4",
        ),
        (lambda d: d["simulate"].update(noise_rate=1.5), r"simulate\.noise_rate: .*less than 1.*1\.5"),
        (lambda d: d["model"]["mask"].update(alpha_hist=-0.1), r"model\.mask\.alpha_hist: "),
        (lambda d: d["stage1"].update(epochs="many"), r"stage1\.epochs: .*valid integer.*'many'"),
        (lambda d: d["data"].update(styles=["twemoji", "comic-sans"]), r"data\.styles: .*comic-sans"),
        (lambda d: d["data"].update(sizes=[48]), r"data\.sizes: .*sizes must be among"),
        (lambda d: d["backbone"].update(kind="gpt"), r"backbone\.kind: .*'tiny' or 'janus'"),
        (
            lambda d: d["simulate"].update(min_interactions=20, max_interactions=10),
            r"simulate: max_interactions must be >= min_interactions",
        ),
        (
            lambda d: d["simulate"].update(split=[0.5, 0.2, 0.2]),
            r"simulate: split must be three positive shares",
        ),
        (lambda d: d["backbone"].update(image_size=128), r"backbone\.image_size 128 is not in data\.sizes"),
        (lambda d: d.update(simulate=[1, 2]), r"simulate: .*valid dictionary"),
        (lambda d: d["backbone"].update(detokenizer="diffusion"), r"evaluate\.style_strength must be 0"),
    ],
    ids=[
        "unknown-top",
        "typo-nested",
        "typo-deep",
        "nan",
        "inf",
        "negative",
        "out-of-range",
        "below-range",
        "wrong-type",
        "unknown-style",
        "bad-size",
        "bad-literal",
        "min-max",
        "split-sum",
        "cross-section",
        "section-not-mapping",
        "style-transfer-needs-vq",
    ],
)
def test_bad_params_name_the_key(params_dir, change, message):
    path = _edit(params_dir / "params.yaml", change)
    with pytest.raises(ConfigError, match=message) as info:
        load_params(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(path))


def test_bad_profile_name(params_dir):
    with pytest.raises(ConfigError, match=r"profile 'nosuch': .*nosuch\.yaml not found"):
        load_params(params_dir / "params.yaml", profile="nosuch")


def test_bad_key_in_a_profile_names_the_profile(params_dir):
    _edit(params_dir / "profiles" / "smoke.yaml", lambda d: d["stage1"].update(max_step=3))
    with pytest.raises(ConfigError, match=r"\(\+profile smoke\): stage1\.max_step: unknown key"):
        load_params(params_dir / "params.yaml", profile="smoke")


def test_bad_files(params_dir):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(params_dir / "missing.yaml")
    (params_dir / "params.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(params_dir / "params.yaml")
    (params_dir / "params.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(params_dir / "params.yaml")


def test_override_parsing():
    assert parse_override("stage1.lora.r=4") == {"stage1": {"lora": {"r": 4}}}
    assert parse_override("data.styles=[noto, twemoji]") == {"data": {"styles": ["noto", "twemoji"]}}
    assert parse_override("backbone.janus_path=null") == {"backbone": {"janus_path": None}}
    assert parse_override("tracking.uri=sqlite:///a=b.db") == {"tracking": {"uri": "sqlite:///a=b.db"}}
    for bad, message in (
        ("stage1.lr", "expected KEY=VALUE"),
        ("stage1..lr=1", "empty key"),
        ("x=[1,", "bad value"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_override(bad)


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match=r"stage1\.lrr: unknown key"):
        load_params(REPO / "params.yaml", overrides=["stage1.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"dpo\.beta: .*greater than 0"):
        load_params(REPO / "params.yaml", overrides=["dpo.beta=0"])


IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**9), 10**9)
    | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(IDENT, min_size=1, max_size=4), value=JSON_VALUES)
def test_override_parses_any_dotted_key_and_yaml_value(keys, value):
    # JSON is YAML: a value written as JSON reads back unchanged, nested under the dotted key.
    nested = value
    for key in reversed(keys):
        nested = {key: nested}
    assert parse_override(".".join(keys) + "=" + json.dumps(value)) == nested


@settings(max_examples=80, deadline=None)
@given(noise=st.floats(allow_nan=True, allow_infinity=True), batch=st.integers(-100, 100))
def test_range_checks_match_the_schema(noise, batch):
    overrides = [f"simulate.noise_rate={noise!r}", f"stage1.batch_size={batch}"]
    noise_ok = math.isfinite(noise) and 0.0 <= noise < 1.0
    if noise_ok and batch >= 1:
        params = load_params(REPO / "params.yaml", overrides=overrides)
        assert params.simulate.noise_rate == noise and params.stage1.batch_size == batch
    else:
        bad_key = "simulate.noise_rate" if not noise_ok else "stage1.batch_size"
        with pytest.raises(ConfigError, match=bad_key.replace(".", r"\.")):
            load_params(REPO / "params.yaml", overrides=overrides)


def test_defaults_are_the_params_file():
    """params.yaml spells out exactly the schema's defaults (no silent drift between the two)."""
    from_file = load_params(REPO / "params.yaml")
    assert from_file.model_dump() == Params(profile="default").model_dump()
