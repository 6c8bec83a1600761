"""The interaction log: it grows by day with the same user model, a user's split never changes, a bad
day is rejected before it reaches the log, and its data version is the md5 DVC records."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pandas as pd
import pytest

from pigeon.data.ingest import dvc_md5, log_dir, log_version, read_log, record_dvc_version
from pigeon.data.raw import read_items
from pigeon.data.users import SPLITS, derive_simulation, simulate_day, simulate_users
from pigeon.data.validation import validate_log
from pigeon.errors import DataError
from pigeon.paths import Workspace
from pigeon.stages import ingest, simulate, validate
from tests.conftest import smoke_params


@pytest.fixture(scope="module")
def grown(synthetic_raw, tmp_path_factory):
    """A workspace whose log was ingested day by day up to day 2, with every day's log kept."""
    ws = Workspace.at(tmp_path_factory.mktemp("log"))
    shutil.copytree(synthetic_raw, ws.raw)
    versions = []
    for day in range(3):
        summary = ingest.run(smoke_params(f"ingest.day={day}"), ws)
        versions.append((summary, read_log(log_dir(ws))))
    return ws, versions


def test_day_zero_is_the_simulation(synthetic_raw):
    """Day 0 of the log is exactly the users the simulate stage made before the log existed."""
    items, cfg = read_items(synthetic_raw), smoke_params().simulate
    derived, direct = derive_simulation(items, cfg, simulate_day(items, cfg, seed=3)), simulate_users(items, cfg, 3)
    pd.testing.assert_frame_equal(derived.users, direct.users)
    for split in SPLITS:
        pd.testing.assert_frame_equal(derived.windows[split], direct.windows[split])


def test_the_log_grows_and_keeps_its_past(grown):
    ws, versions = grown
    params = smoke_params()
    assert [summary["day"] for summary, _ in versions] == [0, 1, 2]
    assert len({summary["md5"] for summary, _ in versions}) == 3  # three data versions
    assert versions[-1][0]["md5"] == log_version(ws)["md5"] == dvc_md5(log_dir(ws))
    for (_, (before, _)), (summary, (after, meta)) in pairwise(versions):
        day = summary["day"]
        old = len(before.interactions)
        pd.testing.assert_frame_equal(after.interactions.iloc[:old], before.interactions)  # never rewritten
        pd.testing.assert_frame_equal(after.users.iloc[: len(before.users)], before.users)  # splits never change
        today = after.interactions.iloc[old:]
        assert (today["day"] == day).all() and meta["days"][day]["day"] == day
        new_users = after.users[after.users["first_day"] == day]
        assert len(new_users) == params.ingest.new_users
        returning = set(today["user_id"]) - set(new_users["user_id"])
        assert len(returning) == round(params.ingest.returning_share * len(before.users))
        # A returning user's session carries on its sequence: positions continue where the last day stopped.
        last = before.interactions.groupby("user_id")["position"].max()
        first_today = today.groupby("user_id")["position"].min()
        assert (first_today.loc[sorted(returning)] == last.loc[sorted(returning)] + 1).all()
        lengths = today[today["user_id"].isin(returning)].groupby("user_id").size()
        assert lengths.between(params.ingest.min_session, params.ingest.max_session).all()


def test_windows_come_from_the_log_and_test_users_never_train(grown, tmp_path):
    ws, _ = grown
    shutil.copytree(ws.root, tmp_path, dirs_exist_ok=True)
    ws = Workspace.at(tmp_path)
    summary = simulate.run(smoke_params("ingest.day=2"), ws)
    log, _ = read_log(log_dir(ws))
    assert summary["log"]["day"] == 2 and summary["users"] == len(log.users)
    windows = {s: pd.read_parquet(ws.users / f"windows_{s}.parquet") for s in SPLITS}
    split_of = log.users.set_index("user_id")["split"]
    for split, frame in windows.items():
        assert (split_of.loc[frame["user_id"]] == split).all()
    assert not set(windows["train"]["user_id"]) & set(split_of[split_of != "train"].index)
    # Windows whose target was logged on a later day exist: the new day brought new training examples.
    day_of = log.interactions.set_index(["user_id", "position"])["day"]
    position = windows["train"]["window_id"].str.extract(r"-p(\d+)$")[0].astype(int)
    target_days = day_of.reindex(pd.MultiIndex.from_arrays([windows["train"]["user_id"], position]))
    assert set(target_days) == {0, 1, 2}
    result = validate.run(smoke_params("ingest.day=2"), ws)
    assert result["success"] and {"log_users", "log_interactions", "log_references", "log_style_mix"} <= set(
        result["suites"])


def test_drift_moves_users_to_the_trending_style(grown, tmp_path):
    ws, _ = grown
    shutil.copytree(ws.root, tmp_path, dirs_exist_ok=True)
    ws = Workspace.at(tmp_path)
    params = smoke_params("ingest.day=3", "ingest.drift_share=0.3", "ingest.drift_style=noto",
                          "ingest.style_mix_tolerance=0.3")
    ingest.run(params, ws)
    log, _ = read_log(log_dir(ws))
    today = log.interactions[log.interactions["day"] == 3]
    before = log.interactions[log.interactions["day"] == 2].groupby("user_id")["preferred_style"].last()
    now = today.groupby("user_id")["preferred_style"].first()
    switched = now[now.index.isin(before.index) & (now != before.reindex(now.index))]
    assert len(switched) > 0 and (switched == "noto").all()
    # The noise flag follows the style of the day, and validation knows a drifted user's old windows.
    simulate.run(params, ws)
    assert validate.run(params, ws)["success"]


def test_a_day_that_fails_the_audit_never_reaches_the_log(grown, tmp_path, capsys):
    ws, _ = grown
    shutil.copytree(ws.root, tmp_path, dirs_exist_ok=True)
    ws = Workspace.at(tmp_path)
    before = log_version(ws)
    params = smoke_params("ingest.day=3", "ingest.drift_share=1.0", "ingest.drift_style=twemoji")
    with pytest.raises(DataError, match=r"data/log: day 3 rejected, the log is unchanged \(still up to day 2\)"
                       r".*style mix: .*twemoji") as err:
        ingest.run(params, ws)
    assert "\n" not in str(err.value)
    assert log_version(ws) == before  # the published log is untouched
    report = json.loads((ws.root / ".pigeon" / "rejected" / "day-0003" / "validation.json").read_text())
    failed = {(r["suite"], r["expectation"]) for r in report["results"] if not r["success"]}
    assert ("log_style_mix", "expect_column_pair_values_a_to_be_greater_than_b") in failed
    assert "FAILED expect_column_pair_values_a_to_be_greater_than_b on log_style_mix" in capsys.readouterr().err
    # The same day without the shock passes: the rejected day is simulated afresh the next night.
    assert ingest.run(smoke_params("ingest.day=3"), ws)["day"] == 3


@pytest.mark.parametrize("defect, expectation, column", [
    ("duplicate", "expect_compound_columns_to_be_unique", "user_id,position"),
    ("skipped_day", "expect_column_distinct_values_to_equal_set", "day"),
    ("wrong_noise_flag", "expect_column_pair_values_to_be_equal", "is_noise,item_style_is_other"),
])
def test_log_suite_catches_each_defect(grown, defect, expectation, column):
    ws, versions = grown
    (log, _) = versions[-1][1]
    items, params = read_items(ws.raw), smoke_params()
    inter = log.interactions
    if defect == "duplicate":  # an export that ran twice for one user
        inter = pd.concat([inter, inter[inter["user_id"] == 0]], ignore_index=True)
    elif defect == "skipped_day":  # day 1 never arrived
        inter = inter[inter["day"] != 1].reset_index(drop=True)
    else:
        inter = inter.assign(is_noise=~inter["is_noise"].to_numpy() & (inter.index == 0) | inter["is_noise"])
    bad = type(log)(log.users, inter, log.references)
    assert all(c.success for c in validate_log(log, items, params, new_day=2))
    failed = [c for c in validate_log(bad, items, params, new_day=2) if not c.success]
    assert any(c.expectation == expectation and c.column == column for c in failed), [c.line() for c in failed]


def test_a_new_world_starts_a_new_log(grown, tmp_path, capsys):
    ws, _ = grown
    shutil.copytree(ws.root, tmp_path, dirs_exist_ok=True)
    ws = Workspace.at(tmp_path)
    summary = ingest.run(smoke_params("seed=5"), ws)
    assert summary["day"] == 0 and "starting a new log at day 0" in capsys.readouterr().err


def test_the_data_version_is_the_md5_dvc_records(grown, tmp_path):
    """dvc_md5 equals DVC's own md5 of the folder, and record_dvc_version puts the log into dvc.lock."""
    ws, _ = grown
    dvc = str(Path(sys.executable).parent / "dvc")
    shutil.copytree(log_dir(ws), tmp_path / "data" / "log")
    (tmp_path / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: 'true'\n    outs:\n      - data/log:\n"
                                       "          persist: true\n")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    assert record_dvc_version(Workspace.at(tmp_path)) is None
    lock = (tmp_path / "dvc.lock").read_text()
    assert f"md5: {dvc_md5(tmp_path / 'data' / 'log')}" in lock
    assert record_dvc_version(Workspace.at(tmp_path / "data")) is None  # not a DVC project: nothing to do
