"""Simulated users: seeded, noisy at the configured rate, split by user, windows of 5 + 1."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from pigeon.config import SimulateConfig
from pigeon.data.raw import decode_png, image_path, read_items
from pigeon.data.synthetic import build_synthetic_raw
from pigeon.data.users import (
    SPLITS,
    read_interactions,
    read_users,
    read_windows,
    simulate_users,
    window_columns,
)
from pigeon.errors import DataError
from pigeon.paths import Workspace
from tests.conftest import SMOKE_STYLES, smoke_params


@pytest.fixture(scope="module")
def items(synthetic_raw):
    return read_items(synthetic_raw)


@pytest.fixture(scope="module")
def sim(items):
    return simulate_users(items, SimulateConfig(num_users=300, noise_rate=0.25), seed=7)


def _styles(items):
    return items.set_index("item_id")["style"]


def test_synthetic_raw_is_the_raw_format(synthetic_raw, items):
    assert len(items) == 36 * len(SMOKE_STYLES)
    assert items["group"].nunique() >= 3
    assert (synthetic_raw / "ATTRIBUTION.md").is_file() and (synthetic_raw / "manifest.json").is_file()
    first = items.iloc[0]
    for size in (32, 64):
        assert decode_png(image_path(synthetic_raw, size, first["file"]), size).shape == (size, size, 3)
    # The same emoji differs across styles; different emoji differ within a style.
    a = decode_png(image_path(synthetic_raw, 32, f"twemoji/{first['emoji_key']}.png"), 32).astype(int)
    b = decode_png(image_path(synthetic_raw, 32, f"openmoji/{first['emoji_key']}.png"), 32).astype(int)
    assert np.abs(a - b).mean() > 10


def test_synthetic_build_is_deterministic(tmp_path):
    """Its speed is measured by ``python -m benchmarks.data``."""
    build_synthetic_raw(tmp_path / "a", styles=SMOKE_STYLES, seed=3)
    build_synthetic_raw(tmp_path / "b", styles=SMOKE_STYLES, seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 36 * 4 * 2
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_simulation_is_seeded(items):
    cfg = SimulateConfig(num_users=50)
    first, again, other = (simulate_users(items, cfg, seed=s) for s in (1, 1, 2))
    pd.testing.assert_frame_equal(first.interactions, again.interactions)
    pd.testing.assert_frame_equal(first.windows["test"], again.windows["test"])
    assert not first.interactions["item_id"].equals(other.interactions["item_id"])


def test_noise_rate_and_noise_flags(sim, items):
    assert abs(sim.interactions["is_noise"].mean() - 0.25) < 0.03
    inter = sim.interactions.merge(sim.users[["user_id", "preferred_style"]], on="user_id")
    other_style = _styles(items).loc[inter["item_id"]].to_numpy() != inter["preferred_style"].to_numpy()
    np.testing.assert_array_equal(other_style, inter["is_noise"].to_numpy())
    clean = simulate_users(items, SimulateConfig(num_users=20, noise_rate=0.0), seed=0)
    assert not clean.interactions["is_noise"].any()


def test_users_split_8_1_1_and_disjoint(sim):
    counts = sim.users["split"].value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (240, 30, 30)
    seen = [set(sim.windows[s]["user_id"]) for s in SPLITS]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    for split in SPLITS:
        users_of_split = set(sim.users.loc[sim.users["split"] == split, "user_id"])
        assert seen[SPLITS.index(split)] <= users_of_split
        assert (sim.windows[split]["split"] == split).all()


def test_preferences(sim, items):
    users = sim.users
    groups = users["preferred_groups"].str.split("|")
    assert groups.map(len).between(1, 3).all()
    assert set(users["preferred_style"]) == set(SMOKE_STYLES)  # every style has users
    # About group_focus of the items come from the user's preferred groups.
    emoji_group = items.set_index("item_id")["group"]
    inter = sim.interactions.merge(users[["user_id", "preferred_groups"]], on="user_id")
    in_pref = [
        g in p.split("|") for g, p in zip(emoji_group.loc[inter["item_id"]], inter["preferred_groups"])
    ]
    assert items["group"].nunique() > 3  # so every user has groups outside their preferred ones
    assert abs(np.mean(in_pref) - 0.8) < 0.03


def test_windows_slide_over_sequences(sim, items):
    styles = _styles(items)
    inter = sim.interactions.set_index(["user_id", "position"])["item_id"]
    for split in SPLITS:
        w = sim.windows[split]
        assert list(w.columns) == window_columns(split, 5)
        assert w["window_id"].is_unique and len(w) > 0
        positions = w["window_id"].str.extract(r"-p(\d+)$")[0].astype(int)
        for i in range(5):  # history_i is the item i-5 steps before the target
            expect = inter.loc[list(zip(w["user_id"], positions - 5 + i))].to_numpy()
            np.testing.assert_array_equal(w[f"history_{i}"].to_numpy(), expect)
        np.testing.assert_array_equal(
            w["target_item"].to_numpy(), inter.loc[list(zip(w["user_id"], positions))]
        )
        # Targets are never noise: always drawn in the preferred style.
        assert (styles.loc[w["target_item"]].to_numpy() == w["preferred_style"].to_numpy()).all()
    # History slots carry noise at about the configured rate.
    hist = sim.windows["train"][[f"history_{i}" for i in range(5)]].to_numpy()
    pref = sim.windows["train"]["preferred_style"].to_numpy()[:, None]
    assert abs((styles.to_numpy()[hist] != pref).mean() - 0.25) < 0.04


def test_ground_truth_protocol(sim, items):
    table = items.set_index("item_id")
    for split in ("val", "test"):
        w = sim.windows[split]
        assert (w["gt_item"] == w["target_item"]).all() and (
            w["paper_reference_item"] == w["target_item"]
        ).all()
        assert (table.loc[w["gt_item"], "style"].to_numpy() == w["preferred_style"].to_numpy()).all()
        ref_style = table.loc[w["reference_item"], "style"].to_numpy()
        assert (ref_style != w["preferred_style"].to_numpy()).all()
        assert (ref_style == w["reference_style"].to_numpy()).all()
        assert (table.loc[w["reference_item"], "emoji_key"].to_numpy() == w["target_emoji"].to_numpy()).all()
        assert (table.loc[w["gt_item"], "emoji_key"].to_numpy() == w["target_emoji"].to_numpy()).all()
        assert w["reference_style"].nunique() > 1  # references spread over the other styles


def test_simulate_stage_writes_users_and_summary(synthetic_raw, tmp_path):
    from pigeon.stages import simulate

    ws = Workspace.at(tmp_path)
    shutil.copytree(synthetic_raw, ws.raw)
    params = smoke_params()
    summary = simulate.run(params, ws)
    assert summary["users"] == params.simulate.num_users
    assert (ws.reports / "simulate.json").is_file()
    assert abs(summary["realised_noise_rate"] - params.simulate.noise_rate) <= params.simulate.noise_tolerance
    assert len(read_users(ws)) == params.simulate.num_users
    assert read_interactions(ws)["is_noise"].dtype == bool
    for split in SPLITS:
        assert len(read_windows(ws, split)) == summary["windows"][split] > 0
    assert not list(ws.users.parent.glob(".users.*"))  # no temp folder left behind

    # Readers name the file and the missing column.
    frame = pd.read_parquet(ws.users / "windows_test.parquet").drop(columns=["reference_item"])
    frame.to_parquet(ws.users / "windows_test.parquet")
    with pytest.raises(DataError, match=r"windows_test\.parquet: missing column\(s\) reference_item"):
        read_windows(ws, "test")
    with pytest.raises(DataError, match="split 'dev'"):
        read_windows(ws, "dev")
    (ws.users / "users.parquet").unlink()
    with pytest.raises(DataError, match=r"users\.parquet: file missing"):
        read_users(ws)


def test_simulation_at_full_scale():
    """1000 users over 865 emoji x 10 styles (the real dataset's shape); its speed is measured by
    ``python -m benchmarks.data``."""
    from benchmarks.data import full_scale_items

    items = full_scale_items()
    sim = simulate_users(items, SimulateConfig(), seed=0)
    assert sum(len(w) for w in sim.windows.values()) > 10_000
    assert sim.interactions["user_id"].nunique() == SimulateConfig().num_users
    assert sim.interactions["item_id"].between(0, len(items) - 1).all()
