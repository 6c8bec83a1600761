"""The validation suites pass on good data and catch each planted defect, naming it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from pigeon.data.raw import decode_png, image_path, png_bytes, read_items
from pigeon.errors import DataError
from pigeon.paths import Workspace
from pigeon.stages import simulate, validate
from tests.conftest import SMOKE_STYLES, smoke_params


@pytest.fixture(scope="module")
def good_ws(synthetic_raw, tmp_path_factory):
    """A workspace with the synthetic raw data and simulated users (smoke profile)."""
    ws = Workspace.at(tmp_path_factory.mktemp("validation"))
    shutil.copytree(synthetic_raw, ws.raw)
    simulate.run(smoke_params(), ws)
    return ws


@pytest.fixture
def ws(good_ws, tmp_path):
    """A private copy of the good workspace to plant one defect in."""
    shutil.copytree(good_ws.root, tmp_path, dirs_exist_ok=True)
    return Workspace.at(tmp_path)


def _edit(ws, name, change):
    path = ws.users / f"{name}.parquet"
    frame = change(pd.read_parquet(path))
    frame.to_parquet(path, index=False)


def _fails(ws, capsys, expectation, column, params=None):
    """Run validate; assert it fails on ``expectation`` at ``column``; return it, all failures, the error."""
    with pytest.raises(DataError, match="validation failed") as info:
        validate.run(params or smoke_params(), ws)
    report = json.loads((ws.reports / "validation.json").read_text())
    assert report["success"] is False
    failed = [r for r in report["results"] if not r["success"]]
    hits = [r for r in failed if r["expectation"] == expectation and r["column"] == column]
    assert hits, f"expected {expectation} on {column} to fail; failures: {failed}"
    err = capsys.readouterr().err
    where = hits[0]["suite"] + (f".{column}" if column else "")
    assert f"FAILED {expectation} on {where}:" in err
    assert len(err.strip().splitlines()) == len(failed)  # one line per failure
    print(f"defect message: {info.value}")
    return hits[0], failed, str(info.value)


def test_good_data_passes(good_ws, tmp_path):
    ws = Workspace.at(tmp_path)
    shutil.copytree(good_ws.root, tmp_path, dirs_exist_ok=True)
    result = validate.run(smoke_params(), ws)
    assert result["success"] and result["expectations"] > 100
    report = json.loads((ws.reports / "validation.json").read_text())
    assert report["success"] and report["failed"] == 0
    assert {
        "items",
        "users",
        "interactions",
        "windows_train",
        "windows_val",
        "windows_test",
        "images_32",
        "images_64",
        "manifest",
    } == set(report["suites"])
    counted = [r for r in report["results"] if r["unexpected_count"] is not None]
    assert counted and all(r["unexpected_count"] == 0 for r in counted)


def test_unknown_item_id(ws, capsys):
    _edit(ws, "windows_test", lambda f: f.assign(history_2=f["history_2"].where(f.index != 0, 99_999)))
    hit, _, _ = _fails(ws, capsys, "expect_column_values_to_be_between", "history_2")
    assert hit["unexpected_count"] == 1 and hit["sample"] == [99_999]


def test_wrong_history_count(ws, capsys):
    _edit(ws, "windows_val", lambda f: f.assign(history_5=f["history_4"]))  # a 6-item history
    hit, failed, _ = _fails(ws, capsys, "expect_column_values_to_be_between", "history_count")
    assert hit["suite"] == "windows_val" and hit["sample"][0] == 6
    assert hit["unexpected_count"] == len(pd.read_parquet(ws.users / "windows_val.parquet"))
    schema = [r for r in failed if r["expectation"] == "expect_table_columns_to_match_set"]
    assert schema and schema[0]["observed"] == {"unexpected": ["history_5"]}


def test_user_in_two_splits(ws, capsys):
    # A train user's window leaks into the test split, with correct protocol fields otherwise.
    items = read_items(ws.raw).set_index(["emoji_key", "style"])["item_id"]
    row = pd.read_parquet(ws.users / "windows_train.parquet").iloc[0]
    emoji = read_items(ws.raw).loc[row["target_item"], "emoji_key"]
    other = next(s for s in SMOKE_STYLES if s != row["preferred_style"])
    leaked = row.to_dict() | {
        "window_id": "leak-0",
        "split": "test",
        "reference_item": items[(emoji, other)],
        "reference_style": other,
        "gt_item": row["target_item"],
        "target_emoji": emoji,
        "paper_reference_item": row["target_item"],
    }
    _edit(ws, "windows_test", lambda f: pd.concat([f, pd.DataFrame([leaked])[f.columns]], ignore_index=True))
    hit, failed, _ = _fails(ws, capsys, "expect_column_values_to_be_in_set", "user_id")
    assert hit["suite"] == "windows_test" and hit["sample"] == [int(row["user_id"])]
    assert len(failed) == 1


def _image(ws, n=0):
    items = read_items(ws.raw)
    return image_path(ws.raw, 32, items["file"].iloc[n])


def test_wrong_size_image(ws, capsys):
    path = _image(ws, 3)
    path.write_bytes(png_bytes(np.zeros((16, 16, 3), dtype=np.uint8)))
    hit, _, _ = _fails(ws, capsys, "expect_image_to_decode_at_declared_size", "file")
    assert hit["suite"] == "images_32" and hit["unexpected_count"] == 1
    assert str(path) in hit["sample"][0] and "16x16, expected 32x32" in hit["sample"][0]


def test_corrupt_image(ws, capsys):
    path = _image(ws, 5)
    path.write_bytes(path.read_bytes()[:40])  # truncated PNG
    hit, _, _ = _fails(ws, capsys, "expect_image_to_decode_at_declared_size", "file")
    assert hit["unexpected_count"] == 1 and "cannot decode image" in hit["sample"][0]


def test_image_edited_after_the_manifest(ws, capsys):
    """A valid image that is not the one the manifest recorded: the stages after validate depend on the
    manifest, so validate is what notices."""
    path = _image(ws, 2)
    path.write_bytes(png_bytes(255 - np.asarray(decode_png(path, 32))))
    hit, failed, _ = _fails(ws, capsys, "expect_content_to_match_manifest_hash", "images/32")
    assert len(failed) == 1 and hit["observed"] != hit["expected"]["manifest.json"]


def test_missing_image(ws, capsys):
    path = _image(ws, 7)
    path.unlink()
    hit, _, _ = _fails(ws, capsys, "expect_image_to_decode_at_declared_size", "file")
    assert str(path) in hit["sample"][0] and "image file missing" in hit["sample"][0]


def test_reference_style_is_preferred(ws, capsys):
    def same_style(f):  # a simulator bug: the reference drawn in the preferred style
        f.loc[0, "reference_item"] = f.loc[0, "gt_item"]
        f.loc[0, "reference_style"] = f.loc[0, "preferred_style"]
        return f

    _edit(ws, "windows_test", same_style)
    style = pd.read_parquet(ws.users / "windows_test.parquet").loc[0, "preferred_style"]
    hit, _, _ = _fails(
        ws, capsys, "expect_column_pair_values_to_be_in_set", "reference_style,preferred_style"
    )
    assert hit["unexpected_count"] == 1 and hit["sample"] == [[style, style]]


def test_noise_rate_off(ws, capsys):
    # Users simulated with a much higher noise rate than params.yaml says.
    simulate.run(smoke_params("simulate.noise_rate=0.45"), ws)
    capsys.readouterr()
    hit, failed, _ = _fails(ws, capsys, "expect_column_mean_to_be_between", "is_noise")
    assert abs(hit["observed"] - 0.45) < 0.05
    assert [r["expectation"] for r in failed] == ["expect_column_mean_to_be_between"]  # nothing else is off


def test_empty_split(ws, capsys):
    _edit(ws, "windows_val", lambda f: f.iloc[:0])
    hit, _, _ = _fails(ws, capsys, "expect_table_row_count_to_be_between", None)
    assert hit["suite"] == "windows_val" and hit["observed"] == 0


def test_null_field(ws, capsys):
    _edit(ws, "windows_test", lambda f: f.assign(target_emoji=f["target_emoji"].where(f.index != 2, None)))
    hit, _, message = _fails(ws, capsys, "expect_column_values_to_not_be_null", "target_emoji")
    assert hit["suite"] == "windows_test" and hit["unexpected_count"] == 1
    assert "first: FAILED expect_column_values_to_not_be_null on windows_test.target_emoji" in message


def test_noise_flag_disagrees_with_style(ws, capsys):
    _edit(ws, "interactions", lambda f: f.assign(is_noise=f["is_noise"].where(f.index != 4, ~f["is_noise"])))
    hit, _, _ = _fails(ws, capsys, "expect_column_pair_values_to_be_equal", "is_noise,item_style_is_other")
    assert hit["unexpected_count"] == 1
