"""Great Expectations suites over the raw items, the images and the simulated users.

One ephemeral GX context; each table is a pandas data source asset with a whole-dataframe batch,
one suite and one validation definition. Cross-table facts (an item's style, a user's split) are
looked up in pandas first and added as derived columns, so every rule is a plain GX expectation
with GX's own unexpected counts and sample values. Images are checked in Python (decode at the
declared size) and reported in the same format.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pigeon.config import Params
from pigeon.data.raw import ITEM_COLUMNS, decode_png, image_path, read_items
from pigeon.data.users import (
    INTERACTION_COLUMNS,
    LOG_INTERACTION_COLUMNS,
    LOG_REFERENCE_COLUMNS,
    LOG_USER_COLUMNS,
    SPLITS,
    USER_COLUMNS,
    LogTables,
    log_dir,
    read_interactions,
    read_log,
    read_table,
    read_users,
    window_columns,
)
from pigeon.errors import DataError
from pigeon.paths import Workspace

SAMPLE_SIZE = 5
EXPECTED_KEYS = ("min_value", "max_value", "value")  # bounds worth repeating in a failure line
FIRST_CHECKS = {
    name: rank
    for rank, name in enumerate(
        (
            "expect_table_columns_to_match_set",
            "expect_table_row_count_to_be_between",
            "expect_table_row_count_to_equal",
            "expect_column_values_to_not_be_null",
            "expect_column_values_to_be_of_type",
        )
    )
}
HISTORY_COLUMN = re.compile(r"^history_\d+$")
INT_COLUMNS = {
    "item_id",
    "user_id",
    "position",
    "target_item",
    "reference_item",
    "gt_item",
    "paper_reference_item",
}


@dataclass
class Check:
    """The outcome of one expectation, as written to ``reports/validation.json``."""

    suite: str
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int | None = None
    element_count: int | None = None
    sample: list = field(default_factory=list)
    observed: Any = None
    expected: dict = field(default_factory=dict)

    def line(self) -> str:
        where = f"{self.suite}.{self.column}" if self.column else self.suite
        parts = [] if self.unexpected_count is None else [f"{self.unexpected_count} unexpected"]
        if self.observed is not None:
            parts.append(f"observed {_short(self.observed)}")
        if self.expected and self.unexpected_count is None:
            parts.append(f"expected {_short(self.expected)}")
        if self.sample:
            parts.append(f"sample {_short(self.sample)}")
        return f"FAILED {self.expectation} on {where}: {', '.join(parts)}"


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: Any) -> Any:
    """JSON-friendly copies of GX's sample values (numpy scalars, tuples, NaN)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


class _GxRunner:
    """Ephemeral GX context → pandas source → per table: asset, suite, validation definition."""

    def __init__(self):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self.source = self.context.data_sources.add_pandas("pigeon")

    def run(self, name: str, frame: pd.DataFrame, expectations: list) -> list[Check]:
        gx = self.gx
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(f"{name}-all")
        # Built whole: adding expectations one by one re-serialises the suite each time (quadratic).
        suite = self.context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        result = definition.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY")
        checks = [self._check(name, r) for r in result.results]
        # Root causes first (schema, emptiness, nulls, types): the first failure is the one to read.
        return sorted(checks, key=lambda c: FIRST_CHECKS.get(c.expectation, len(FIRST_CHECKS)))

    @staticmethod
    def _check(suite: str, r) -> Check:
        kwargs = r.expectation_config.kwargs
        columns = kwargs.get("column") or kwargs.get("column_list")
        if columns is None and "column_A" in kwargs:
            columns = [kwargs["column_A"], kwargs["column_B"]]
        column = ",".join(columns) if isinstance(columns, list) else columns
        res = r.result or {}
        sample = _plain(res.get("partial_unexpected_list", []))[:SAMPLE_SIZE]
        observed = _plain(res.get("observed_value"))
        mismatched = (res.get("details") or {}).get("mismatched")
        if isinstance(observed, list) and mismatched:  # the table's columns: report only what is off
            observed = _plain(mismatched)
        if isinstance(observed, float):
            observed = round(observed, 6)
        if r.exception_info and r.exception_info.get("raised_exception"):
            sample = [str(r.exception_info.get("exception_message", "")).splitlines()[0][:200]]
        return Check(
            suite,
            r.expectation_config.type,
            column,
            bool(r.success),
            res.get("unexpected_count"),
            res.get("element_count"),
            sample,
            observed,
            {k: _plain(kwargs[k]) for k in EXPECTED_KEYS if kwargs.get(k) is not None},
        )


def _lookup(ids: pd.Series, table: pd.Series) -> pd.Series:
    """Map ids to a column of ``table`` (indexed by id); unknown or null ids give null."""
    numeric = pd.to_numeric(ids, errors="coerce")
    return pd.Series(table.reindex(numeric).to_numpy(), index=ids.index)


def check_manifest_hashes(raw_dir: Path, sizes: tuple[int, ...]) -> list[Check]:
    """``items.parquet`` and each image folder still match the digests ``manifest.json`` recorded: the
    stages after ``validate`` depend on the manifest, not on the image files themselves."""
    from pigeon.data.raw import content_hashes
    from pigeon.io import read_json

    recorded = read_json(Path(raw_dir) / "manifest.json").get("hashes", {})
    checks = []
    for key, actual in content_hashes(raw_dir, sizes).items():
        expected = recorded.get(key)
        checks.append(Check("manifest", "expect_content_to_match_manifest_hash", key, actual == expected,
                            observed=actual, expected={"manifest.json": expected or "missing: rebuild with "
                                                      "`pigeon data fetch` or `dvc checkout data.dvc`"}))
    return checks


def check_images(raw_dir: Path, items: pd.DataFrame, sizes: tuple[int, ...]) -> list[Check]:
    """Every item image exists and decodes as RGB at each declared size."""
    from tqdm import tqdm

    checks = []
    for size in sizes:
        errors = []
        files = items["file"].astype(str).tolist()
        for file in tqdm(files, desc=f"images {size}px", leave=False, disable=len(files) < 5000):
            try:
                decode_png(image_path(raw_dir, size, file), size)
            except DataError as exc:
                errors.append(str(exc))
        checks.append(
            Check(
                f"images_{size}",
                "expect_image_to_decode_at_declared_size",
                "file",
                not errors,
                len(errors),
                len(files),
                errors[:SAMPLE_SIZE],
            )
        )
    return checks


def item_expectations(gxe, items: pd.DataFrame, params: Params) -> list:
    n = len(items)
    exps = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(ITEM_COLUMNS), exact_match=False),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ITEM_COLUMNS]
    exps += [
        gxe.ExpectColumnValuesToBeOfType(column=c, type_="int64" if c == "item_id" else "str")
        for c in ITEM_COLUMNS
    ]
    exps += [
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValuesToBeBetween(column="item_id", min_value=0, max_value=max(n - 1, 0)),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["style", "emoji_key"]),
        gxe.ExpectColumnDistinctValuesToEqualSet(column="style", value_set=list(params.data.styles)),
        gxe.ExpectColumnValuesToNotBeInSet(column="group", value_set=list(params.data.drop_groups)),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="file", column_B="expected_file"),
    ]
    return exps


def user_expectations(gxe, params: Params, styles: list[str], n_users: int | None = None) -> list:
    """``n_users``: the users the log holds (default: the day-0 cohort, ``simulate.num_users``)."""
    sim = params.simulate
    exps = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(USER_COLUMNS), exact_match=False),
        gxe.ExpectTableRowCountToEqual(value=sim.num_users if n_users is None else n_users),
    ]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in USER_COLUMNS]
    exps += [
        gxe.ExpectColumnValuesToBeOfType(column="user_id", type_="int64"),
        gxe.ExpectColumnValuesToBeUnique(column="user_id"),
        gxe.ExpectColumnDistinctValuesToEqualSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToBeInSet(column="preferred_style", value_set=styles),
        gxe.ExpectColumnValuesToBeBetween(
            column="preferred_group_count", min_value=sim.min_groups, max_value=sim.max_groups
        ),
        gxe.ExpectColumnValuesToBeBetween(column="noise_rate", min_value=0.0, max_value=1.0),
    ]
    return exps


def interaction_expectations(gxe, params: Params, n_items: int, user_ids: list[int]) -> list:
    sim = params.simulate
    exps = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(INTERACTION_COLUMNS), exact_match=False),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in INTERACTION_COLUMNS]
    exps += [
        gxe.ExpectColumnValuesToBeOfType(column=c, type_="int64") for c in ("user_id", "position", "item_id")
    ]
    exps += [
        gxe.ExpectColumnValuesToBeOfType(column="is_noise", type_="bool"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "position"]),
        gxe.ExpectColumnValuesToBeInSet(column="user_id", value_set=user_ids),
        gxe.ExpectColumnValuesToBeBetween(column="item_id", min_value=0, max_value=n_items - 1),
        *noise_expectations(gxe, sim),
    ]
    return exps


def noise_expectations(gxe, sim) -> list:
    """Noise flags true to the item's style, and the noise share within the simulator's tolerance."""
    return [
        gxe.ExpectColumnPairValuesToBeEqual(column_A="is_noise", column_B="item_style_is_other"),
        gxe.ExpectColumnMeanToBeBetween(
            column="is_noise",
            min_value=round(max(0.0, sim.noise_rate - sim.noise_tolerance), 6),
            max_value=round(sim.noise_rate + sim.noise_tolerance, 6),
        ),
    ]


def window_expectations(
    gxe,
    params: Params,
    split: str,
    n_items: int,
    split_users: list[int],
    styles: list[str],
    derived: list[str],
) -> list:
    history_len = params.model.history_len
    columns = window_columns(split, history_len)
    item_columns = [c for c in columns if c in INT_COLUMNS - {"user_id"} or HISTORY_COLUMN.match(c)]
    # Exact schema of the stored file; the derived look-up columns are ours, not the file's.
    exps = [
        gxe.ExpectTableColumnsToMatchSet(column_set=columns + derived, exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in columns]
    exps += [
        gxe.ExpectColumnValuesToBeOfType(
            column=c, type_="int64" if c in INT_COLUMNS or HISTORY_COLUMN.match(c) else "str"
        )
        for c in columns
    ]
    exps += [
        gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=n_items - 1) for c in item_columns
    ]
    exps += [
        gxe.ExpectColumnValuesToBeUnique(column="window_id"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=[split]),
        gxe.ExpectColumnValuesToBeInSet(column="user_id", value_set=split_users),
        gxe.ExpectColumnValuesToBeBetween(
            column="history_count", min_value=history_len, max_value=history_len
        ),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="preferred_style", column_B="user_preferred_style"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="target_style", column_B="preferred_style"),
    ]
    if split != "train":
        other_style_pairs = [(a, b) for a in styles for b in styles if a != b]
        exps += [
            gxe.ExpectColumnPairValuesToBeEqual(column_A="gt_style", column_B="preferred_style"),
            gxe.ExpectColumnPairValuesToBeInSet(
                column_A="reference_style", column_B="preferred_style", value_pairs_set=other_style_pairs
            ),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="reference_item_style", column_B="reference_style"),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="reference_emoji", column_B="target_emoji"),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="gt_emoji", column_B="target_emoji"),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="paper_reference_item", column_B="target_item"),
        ]
    return exps


def log_user_expectations(gxe, new_day: int) -> list:
    exps = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(LOG_USER_COLUMNS), exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in LOG_USER_COLUMNS]
    exps += [
        gxe.ExpectColumnValuesToBeOfType(column="user_id", type_="int64"),
        gxe.ExpectColumnValuesToBeOfType(column="first_day", type_="int64"),
        gxe.ExpectColumnValuesToBeUnique(column="user_id"),  # one split per user, for good
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToBeBetween(column="first_day", min_value=0, max_value=new_day),
    ]
    return exps


def log_interaction_expectations(gxe, params: Params, new_day: int, n_items: int, user_ids: list[int],
                                 styles: list[str], derived: list[str]) -> list:
    sim = params.simulate
    exps = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(LOG_INTERACTION_COLUMNS) + derived, exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in LOG_INTERACTION_COLUMNS]
    exps += [gxe.ExpectColumnValuesToBeOfType(column=c, type_="int64")
             for c in ("user_id", "day", "position", "item_id")]
    exps += [
        gxe.ExpectColumnValuesToBeOfType(column="is_noise", type_="bool"),
        gxe.ExpectColumnValuesToBeOfType(column="preferred_style", type_="str"),
        # No duplicated interactions: a user's sequence has one item per position.
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "position"]),
        # Days are contiguous: every day from 0 to the newest holds interactions, no other day does.
        gxe.ExpectColumnDistinctValuesToEqualSet(column="day", value_set=list(range(new_day + 1))),
        gxe.ExpectColumnValuesToBeBetween(column="position_gap", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="day_step", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="days_since_first", min_value=0),
        gxe.ExpectColumnValuesToBeInSet(column="user_id", value_set=user_ids),
        gxe.ExpectColumnValuesToBeBetween(column="item_id", min_value=0, max_value=n_items - 1),
        gxe.ExpectColumnValuesToBeInSet(column="preferred_style", value_set=styles),
        *noise_expectations(gxe, sim),
    ]
    return exps


def log_reference_expectations(gxe, n_items: int, derived: list[str]) -> list:
    exps = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(LOG_REFERENCE_COLUMNS) + derived, exact_match=True),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "position"]),
        gxe.ExpectColumnValuesToBeBetween(column="reference_item", min_value=0, max_value=n_items - 1),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="reference_emoji", column_B="logged_emoji"),
    ]
    return exps


def style_mix_expectations(gxe, styles: list[str]) -> list:
    """The new day's share of each style within the range of the earlier days' shares (± tolerance)."""
    return [
        gxe.ExpectTableRowCountToEqual(value=len(styles)),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="share", column_B="low", or_equal=True),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="high", column_B="share", or_equal=True),
    ]


def style_mix(interactions: pd.DataFrame, items: pd.DataFrame, new_day: int, tolerance: float) -> pd.DataFrame:
    """One row per style: its share of the items on ``new_day`` and the range of its share on the earlier
    days, widened by ``tolerance`` (low, high)."""
    styles = sorted(items["style"].unique().tolist())
    item_style = _lookup(interactions["item_id"], items.set_index("item_id")["style"])
    counts = pd.crosstab(interactions["day"], item_style).reindex(columns=styles, fill_value=0)
    shares = counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0).fillna(0.0)
    today = shares.reindex([new_day]).fillna(0.0).iloc[0]
    before = shares.loc[shares.index < new_day]
    return pd.DataFrame({"style": styles, "share": today.to_numpy(),
                         "low": (before.min() - tolerance).to_numpy(), "high": (before.max() + tolerance).to_numpy()})


def style_mix_outliers(mix: pd.DataFrame) -> str:
    """The styles of a :func:`style_mix` table outside their range, for a failure line."""
    off = mix[(mix["share"] < mix["low"]) | (mix["share"] > mix["high"])]
    return ", ".join(f"{r.style} {r.share:.3f} not in [{max(r.low, 0.0):.3f}, {min(r.high, 1.0):.3f}]"
                     for r in off.itertuples())


def _derive_log_interactions(frame: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame) -> pd.DataFrame:
    """Add the looked-up columns the log expectations compare against."""
    out = frame.copy()
    order = out.sort_values(["user_id", "position"], kind="stable")
    previous = order.groupby("user_id", sort=False)
    out["position_gap"] = (order["position"] - previous["position"].shift(1, fill_value=-1) - 1).reindex(out.index)
    out["day_step"] = (order["day"] - previous["day"].shift(1).fillna(order["day"])).reindex(out.index)
    first_day = _lookup(out["user_id"], users.drop_duplicates("user_id").set_index("user_id")["first_day"])
    out["days_since_first"] = out["day"] - first_day
    item_style = _lookup(out["item_id"], items.set_index("item_id")["style"])
    out["item_style_is_other"] = (item_style != out["preferred_style"]).to_numpy()
    return out


def validate_log(log: LogTables, items: pd.DataFrame, params: Params, new_day: int,
                 runner: _GxRunner | None = None) -> list[Check]:
    """The log suites: users, interactions (no duplicates, contiguous days, noise as declared), references
    and, from day 1 on, the style mix of ``new_day`` against the earlier days'."""
    import great_expectations.expectations as gxe

    runner = runner or _GxRunner()
    styles = sorted(items["style"].unique().tolist())
    n_items = len(items)
    checks = runner.run("log_users", log.users, log_user_expectations(gxe, new_day))
    frame = _derive_log_interactions(log.interactions, items, log.users)
    derived = [c for c in frame.columns if c not in log.interactions.columns]
    checks += runner.run("log_interactions", frame, log_interaction_expectations(
        gxe, params, new_day, n_items, log.users["user_id"].tolist(), styles, derived))
    emoji = items.set_index("item_id")["emoji_key"]
    logged_item = log.interactions.set_index(["user_id", "position"])["item_id"]
    logged_item = logged_item[~logged_item.index.duplicated()]  # duplicates are the interactions suite's finding
    refs = log.references.assign(
        reference_emoji=_lookup(log.references["reference_item"], emoji),
        logged_emoji=_lookup(pd.Series(logged_item.reindex(pd.MultiIndex.from_frame(
            log.references[["user_id", "position"]])).to_numpy(), index=log.references.index), emoji))
    checks += runner.run("log_references", refs, log_reference_expectations(
        gxe, n_items, ["reference_emoji", "logged_emoji"]))
    if new_day >= 1:
        mix = style_mix(log.interactions, items, new_day, params.ingest.style_mix_tolerance)
        checks += runner.run("log_style_mix", mix, style_mix_expectations(gxe, styles))
    return checks


def _derive_windows(frame: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame,
                    style_at: pd.Series | None = None) -> pd.DataFrame:
    """Add the looked-up columns the window expectations compare against. ``style_at``: the user's
    preferred style at each (user_id, position) of the log (a user may drift); else the users table's."""
    out = frame.copy()
    style, emoji = items.set_index("item_id")["style"], items.set_index("item_id")["emoji_key"]
    history = [c for c in out.columns if HISTORY_COLUMN.match(c)]
    out["history_count"] = out[history].notna().sum(axis=1) if history else 0
    if "user_id" in out and style_at is not None and "window_id" in out:
        position = pd.to_numeric(out["window_id"].astype(str).str.extract(r"-p(\d+)$")[0], errors="coerce")
        keys = pd.MultiIndex.from_arrays([pd.to_numeric(out["user_id"], errors="coerce"), position])
        out["user_preferred_style"] = style_at.reindex(keys).to_numpy()
    elif "user_id" in out:
        out["user_preferred_style"] = _lookup(out["user_id"], users.set_index("user_id")["preferred_style"])
    for column, prefix in (
        ("target_item", "target"),
        ("gt_item", "gt"),
        ("reference_item", "reference_item"),
    ):
        if column in out:
            out[f"{prefix}_style"] = _lookup(out[column], style)
    for column, prefix in (("gt_item", "gt"), ("reference_item", "reference")):
        if column in out:
            out[f"{prefix}_emoji"] = _lookup(out[column], emoji)
    return out


def validate_data(params: Params, ws: Workspace) -> list[Check]:
    """Run every suite and the image check; return all outcomes (the caller decides what fails)."""
    import great_expectations.expectations as gxe

    items = read_items(ws.raw)
    users, interactions = read_users(ws), read_interactions(ws)
    log = read_log(log_dir(ws))[0] if (log_dir(ws) / "log.json").is_file() else None
    # Windows as stored: column problems are left to the schema expectations.
    windows = {split: read_table(ws.users / f"windows_{split}.parquet", []) for split in SPLITS}
    styles = sorted(items["style"].unique().tolist())
    n_items = len(items)
    runner = _GxRunner()

    items_frame = items.assign(
        expected_file=items["style"].astype(str) + "/" + items["emoji_key"].astype(str) + ".png"
    )
    checks = runner.run("items", items_frame, item_expectations(gxe, items, params))
    checks += check_images(ws.raw, items, tuple(params.data.sizes))
    checks += check_manifest_hashes(ws.raw, tuple(params.data.sizes))

    users_frame = users.assign(
        preferred_group_count=users["preferred_groups"]
        .fillna("")
        .str.split("|")
        .map(lambda groups: sum(1 for g in groups if g))
    )
    checks += runner.run("users", users_frame, user_expectations(
        gxe, params, styles, None if log is None else len(log.users)))

    style_at = None  # a user's preferred style at each position: the log's, as it drifts
    if log is not None:
        checks += validate_log(log, items, params, int(log.interactions["day"].max()), runner)
        style_at = log.interactions.drop_duplicates(["user_id", "position"]).set_index(
            ["user_id", "position"])["preferred_style"]
    item_style = _lookup(interactions["item_id"], items.set_index("item_id")["style"])
    if style_at is None:
        user_style = _lookup(
            interactions["user_id"], users.drop_duplicates("user_id").set_index("user_id")["preferred_style"]
        )
    else:
        user_style = pd.Series(style_at.reindex(pd.MultiIndex.from_frame(
            interactions[["user_id", "position"]])).to_numpy(), index=interactions.index)
    interactions_frame = interactions.assign(item_style_is_other=(item_style != user_style).to_numpy())
    checks += runner.run(
        "interactions",
        interactions_frame,
        interaction_expectations(gxe, params, n_items, users["user_id"].tolist()),
    )

    unique_users = users.drop_duplicates("user_id")
    for split in SPLITS:
        split_users = unique_users.loc[unique_users["split"] == split, "user_id"].tolist()
        frame = _derive_windows(windows[split], items, unique_users, style_at)
        derived = [c for c in frame.columns if c not in windows[split].columns]
        checks += runner.run(
            f"windows_{split}",
            frame,
            window_expectations(gxe, params, split, n_items, split_users, styles, derived),
        )
    return checks


def validation_report(checks: list[Check]) -> dict:
    failed = [c for c in checks if not c.success]
    return {
        "success": not failed,
        "expectations": len(checks),
        "failed": len(failed),
        "suites": sorted({c.suite for c in checks}),
        "results": [asdict(c) for c in checks],
    }
