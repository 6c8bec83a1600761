"""Simulated users (docs/design.md §3): interaction sequences, sliding windows, split by user.

Each user prefers one style and 1–3 emoji groups. A sequence draws ``group_focus`` of its emoji
from the preferred groups; each position is noise (the emoji in another style) with probability
``noise_rate``. Windows of ``window`` items slide over the sequence; a window's target is always a
non-noise item, so it is drawn in the preferred style. Validation and test windows also carry the
ground-truth protocol: the target emoji in another style (``reference_item``) and in the preferred
style (``gt_item``). Nothing here is a real user: no public multi-style interaction log exists.

```
data/users/
  users.parquet          user_id, split, preferred_style, preferred_groups ("|"-joined), noise_rate
  interactions.parquet   user_id, position, item_id, is_noise
  windows_<split>.parquet
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pigeon.config import IngestConfig, SimulateConfig
from pigeon.data.raw import read_items
from pigeon.data.raw import read_table as read_parquet_table
from pigeon.errors import DataError
from pigeon.io import read_json
from pigeon.paths import Workspace

SPLITS = ("train", "val", "test")
USER_COLUMNS = ("user_id", "split", "preferred_style", "preferred_groups", "noise_rate")
INTERACTION_COLUMNS = ("user_id", "position", "item_id", "is_noise")
PROTOCOL_COLUMNS = ("reference_item", "reference_style", "gt_item", "target_emoji", "paper_reference_item")
ITEM_ID_COLUMNS = ("target_item", "reference_item", "gt_item", "paper_reference_item")


def history_columns(history_len: int) -> list[str]:
    return [f"history_{i}" for i in range(history_len)]


def window_columns(split: str, history_len: int) -> list[str]:
    base = ["window_id", "user_id", "split", "preferred_style", *history_columns(history_len), "target_item"]
    return base + list(PROTOCOL_COLUMNS) if split != "train" else base


@dataclass
class Simulation:
    users: pd.DataFrame
    interactions: pd.DataFrame
    windows: dict[str, pd.DataFrame]

    def summary(self) -> dict:
        per_user = self.users["split"].value_counts()
        return {
            "users": len(self.users),
            "users_per_split": {s: int(per_user.get(s, 0)) for s in SPLITS},
            "interactions": len(self.interactions),
            "windows": {s: len(w) for s, w in self.windows.items()},
            "realised_noise_rate": round(float(self.interactions["is_noise"].mean()), 4),
            "users_per_style": self.users["preferred_style"].value_counts().sort_index().to_dict(),
        }


class _Catalogue:
    """The items as an emoji × style grid of item ids (-1 where an emoji lacks that style)."""

    def __init__(self, items: pd.DataFrame):
        self.styles = sorted(items["style"].unique().tolist())
        self.emoji = sorted(items["emoji_key"].unique().tolist())
        e = pd.Index(self.emoji).get_indexer(items["emoji_key"])
        s = pd.Index(self.styles).get_indexer(items["style"])
        self.item_id = np.full((len(self.emoji), len(self.styles)), -1, dtype=np.int64)
        self.item_id[e, s] = items["item_id"].to_numpy()
        self.available = self.item_id >= 0
        groups = items.drop_duplicates("emoji_key").set_index("emoji_key")["group"]
        self.emoji_group = groups.reindex(self.emoji).to_numpy()
        self.groups = sorted(set(self.emoji_group))
        # An emoji can be a target only if it also exists in some other style (for the reference).
        self.multi_style = self.available.sum(axis=1) >= 2


def _split_counts(n: int, shares: tuple[float, float, float]) -> list[int]:
    val = max(1, round(shares[1] * n))
    test = max(1, round(shares[2] * n))
    return [n - val - test, val, test]


def _pick(rng: np.random.Generator, pool: np.ndarray, fallback: np.ndarray, k: int) -> np.ndarray:
    pool = pool if len(pool) else fallback
    return rng.choice(pool, size=k) if k else np.empty(0, dtype=np.int64)


@dataclass
class LogTables:
    """The interaction log (docs/design.md §3), or one day's new rows of it.

    ``users``: user_id, split, first_day, preferred_groups ("|"-joined); a user's split is drawn on its
    first day and never changes, so a test user never trains on a later day.
    ``interactions``: user_id, day, position (0.. over the user's whole sequence), item_id, is_noise,
    preferred_style (the user's style on that day: it changes where a user drifts).
    ``references``: user_id, position, reference_item — for every interaction that can be a window's
    target, the same emoji in another style (the ground-truth protocol), drawn when it is logged.
    """

    users: pd.DataFrame
    interactions: pd.DataFrame
    references: pd.DataFrame


LOG_USER_COLUMNS = ("user_id", "split", "first_day", "preferred_groups")
LOG_INTERACTION_COLUMNS = ("user_id", "day", "position", "item_id", "is_noise", "preferred_style")
LOG_REFERENCE_COLUMNS = ("user_id", "position", "reference_item")


def _draw_interactions(cat: _Catalogue, cfg: SimulateConfig, rng: np.random.Generator, styles: np.ndarray,
                       lengths: np.ndarray, group_counts: np.ndarray, groups: list | None = None):
    """The next ``lengths[u]`` interactions of users preferring ``styles[u]`` (style indices), user-major.
    Each user's preferred groups are given (``groups[u]``, group indices) or, where None, drawn
    (``group_counts[u]`` of them).
    Returns (user index per row, emoji, style, is_noise, groups per user)."""
    n_styles, n_groups = len(cat.styles), len(cat.groups)
    emoji_group_idx = pd.Index(cat.groups).get_indexer(cat.emoji_group)
    user_of = np.repeat(np.arange(len(styles)), lengths)
    is_noise = rng.random(len(user_of)) < cfg.noise_rate
    from_pref = rng.random(len(user_of)) < cfg.group_focus
    emoji = np.empty(len(user_of), dtype=np.int64)
    chosen = []
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for u in range(len(styles)):
        groups_u = None if groups is None else groups[u]
        if groups_u is None:
            groups_u = np.sort(rng.choice(n_groups, size=group_counts[u], replace=False))
        chosen.append(groups_u)
        in_pref = np.isin(emoji_group_idx, groups_u)
        # Non-noise items need the emoji in the preferred style and in one other style.
        ok = cat.available[:, styles[u]] & cat.multi_style
        span = slice(starts[u], starts[u + 1])
        want_pref = from_pref[span]
        all_ok = np.flatnonzero(ok)
        pick = np.empty(lengths[u], dtype=np.int64)
        pick[want_pref] = _pick(rng, np.flatnonzero(ok & in_pref), all_ok, int(want_pref.sum()))
        pick[~want_pref] = _pick(rng, np.flatnonzero(ok & ~in_pref), all_ok, int((~want_pref).sum()))
        emoji[span] = pick

    # Noise positions: the same emoji in a random other style where it exists.
    style = styles[user_of].copy()
    noise_idx = np.flatnonzero(is_noise)
    scores = rng.random((len(noise_idx), n_styles))
    allowed = cat.available[emoji[noise_idx]].copy()
    allowed[np.arange(len(noise_idx)), style[noise_idx]] = False
    style[noise_idx] = np.where(allowed, scores, -1.0).argmax(axis=1)
    return user_of, emoji, style, is_noise, chosen


def _draw_references(cat: _Catalogue, rng: np.random.Generator, emoji: np.ndarray, style: np.ndarray) -> np.ndarray:
    """For each target, the same emoji in a random other style where it exists (item ids)."""
    scores = rng.random((len(emoji), len(cat.styles)))
    allowed = cat.available[emoji].copy()
    allowed[np.arange(len(emoji)), style] = False
    return cat.item_id[emoji, np.where(allowed, scores, -1.0).argmax(axis=1)]


def _log_rows(cat: _Catalogue, users: pd.DataFrame, user_ids: np.ndarray, user_style: np.ndarray,
              first_position: np.ndarray, day: int, history_len: int, rng: np.random.Generator,
              drawn: tuple) -> LogTables:
    """The log rows of one day's draw (``drawn``: what :func:`_draw_interactions` returned)."""
    user_of, emoji, style, is_noise, _ = drawn
    lengths = np.bincount(user_of, minlength=len(user_ids))
    position = first_position[user_of] + np.concatenate([np.arange(k) for k in lengths] or [np.empty(0, int)])
    item = cat.item_id[emoji, style]
    target = np.flatnonzero((position >= history_len) & ~is_noise)
    reference = _draw_references(cat, rng, emoji[target], style[target])
    interactions = pd.DataFrame({
        "user_id": user_ids[user_of].astype(np.int64),
        "day": np.full(len(user_of), day, dtype=np.int64),
        "position": position.astype(np.int64),
        "item_id": item.astype(np.int64),
        "is_noise": is_noise,
        "preferred_style": pd.array([cat.styles[s] for s in user_style[user_of]], dtype="str"),
    })
    references = pd.DataFrame({"user_id": user_ids[user_of[target]].astype(np.int64),
                               "position": position[target].astype(np.int64),
                               "reference_item": reference.astype(np.int64)})
    return LogTables(users, interactions, references)


def simulate_day(items: pd.DataFrame, cfg: SimulateConfig, seed: int, day: int = 0,
                 log: LogTables | None = None, ingest: IngestConfig | None = None) -> LogTables:
    """The new rows of day ``day`` of the simulated interaction log.

    Day 0 (``log`` None): ``cfg.num_users`` users with balanced preferred styles, split 8:1:1. A later day
    (``log`` holds days 0..day-1): ``ingest.new_users`` new users (random styles, each split with the
    ``cfg.split`` shares) and a ``ingest.returning_share`` of the earlier users back for a session;
    ``ingest.drift_share`` of the day's users take up ``ingest.drift_style`` from this day on."""
    cat = _Catalogue(items)
    n_styles, n_groups = len(cat.styles), len(cat.groups)
    if n_styles < 2:
        raise DataError(f"items: need at least 2 styles to simulate noise, found {n_styles}")
    if not cat.multi_style.any():
        raise DataError("items: no emoji exists in two styles; windows need a cross-style reference")
    history_len = cfg.window - 1
    max_groups = min(cfg.max_groups, n_groups)
    if log is None:
        if day != 0:
            raise DataError(f"day {day}: the log starts at day 0")
        rng = np.random.default_rng(seed)
        n = cfg.num_users
        # Balanced preferred styles (every style gets users), random groups and sequence lengths.
        pref_style = rng.permutation(np.arange(n) % n_styles)
        lengths = rng.integers(cfg.min_interactions, cfg.max_interactions + 1, size=n)
        n_pref_groups = rng.integers(min(cfg.min_groups, max_groups), max_groups + 1, size=n)
        drawn = _draw_interactions(cat, cfg, rng, pref_style, lengths, n_pref_groups)
        order = rng.permutation(n)
        split_of = np.empty(n, dtype=object)
        bounds = np.cumsum([0, *_split_counts(n, cfg.split)])
        for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
            split_of[order[lo:hi]] = name
        users = _log_users(np.arange(n), split_of, day, cat, drawn[4])
        return _log_rows(cat, users, np.arange(n), pref_style, np.zeros(n, dtype=np.int64), day, history_len,
                         rng, drawn)

    ingest = ingest or IngestConfig()
    rng = np.random.default_rng([seed, day])
    style_index = {s: i for i, s in enumerate(cat.styles)}
    last = log.interactions.sort_values(["user_id", "position"]).groupby("user_id", sort=True).tail(1)
    known = log.users.sort_values("user_id")
    n_known = len(known)
    back = np.sort(rng.choice(n_known, size=round(ingest.returning_share * n_known), replace=False))
    back_ids = known["user_id"].to_numpy()[back]
    last = last.set_index("user_id").loc[back_ids]
    back_style = np.array([style_index[s] for s in last["preferred_style"]], dtype=np.int64)
    back_groups = [pd.Index(cat.groups).get_indexer(g.split("|"))
                   for g in known["preferred_groups"].to_numpy()[back]]
    k = ingest.new_users
    new_ids = np.arange(k, dtype=np.int64) + int(known["user_id"].max()) + 1
    new_style = rng.integers(n_styles, size=k)
    new_lengths = rng.integers(cfg.min_interactions, cfg.max_interactions + 1, size=k)
    new_group_counts = rng.integers(min(cfg.min_groups, max_groups), max_groups + 1, size=k)
    new_split = rng.choice(np.array(SPLITS, dtype=object), size=k, p=np.asarray(cfg.split) / sum(cfg.split))

    styles = np.concatenate([back_style, new_style])
    drifting = rng.random(len(styles)) < ingest.drift_share
    target_style = (np.full(len(styles), style_index[ingest.drift_style]) if ingest.drift_style
                    else (styles + rng.integers(1, n_styles, size=len(styles))) % n_styles)
    styles = np.where(drifting, target_style, styles)
    lengths = np.concatenate([rng.integers(ingest.min_session, ingest.max_session + 1, size=len(back)),
                              new_lengths])
    group_counts = np.concatenate([np.zeros(len(back), dtype=np.int64), new_group_counts])
    # Returning users keep their groups; new users draw theirs (the same draw as on day 0).
    drawn = _draw_interactions(cat, cfg, rng, styles, lengths, group_counts, groups=back_groups + [None] * k)
    user_ids = np.concatenate([back_ids, new_ids])
    first_position = np.concatenate([last["position"].to_numpy() + 1, np.zeros(k, dtype=np.int64)])
    users = _log_users(new_ids, new_split, day, cat, drawn[4][len(back):])
    return _log_rows(cat, users, user_ids, styles, first_position, day, history_len, rng, drawn)


def _log_users(user_ids: np.ndarray, split_of: np.ndarray, day: int, cat: _Catalogue, groups: list) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": user_ids.astype(np.int64),
        "split": pd.array(list(split_of), dtype="str"),
        "first_day": np.full(len(user_ids), day, dtype=np.int64),
        "preferred_groups": pd.array(["|".join(cat.groups[g] for g in groups_u) for groups_u in groups],
                                     dtype="str"),
    })


def append_day(log: LogTables | None, day_rows: LogTables) -> LogTables:
    """The log with one day's rows added (user-major, as :func:`derive_simulation` reads it)."""
    if log is None:
        return day_rows
    return LogTables(*(pd.concat([old, new], ignore_index=True) for old, new in
                       ((log.users, day_rows.users), (log.interactions, day_rows.interactions),
                        (log.references, day_rows.references))))


def derive_simulation(items: pd.DataFrame, cfg: SimulateConfig, log: LogTables) -> Simulation:
    """Users, interactions and windows from the log: a window's target is any non-noise interaction with
    ``cfg.window - 1`` interactions before it; its ``preferred_style`` is the user's style on that day."""
    history_len = cfg.window - 1
    inter = log.interactions.sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)
    users_log = log.users.sort_values("user_id", kind="stable").reset_index(drop=True)
    user_ids = users_log["user_id"].to_numpy()
    user_of = pd.Index(user_ids).get_indexer(inter["user_id"])
    if (user_of < 0).any():
        raise DataError(f"log: interactions of user {int(inter['user_id'][user_of < 0].iloc[0])}, "
                        "who is not in the log's users table")
    lengths = np.bincount(user_of, minlength=len(user_ids))
    position = inter["position"].to_numpy()
    expected = np.concatenate([np.arange(k) for k in lengths] or [np.empty(0, int)])
    if not np.array_equal(position, expected):
        bad = int(np.flatnonzero(position != expected)[0])
        raise DataError(f"log: user {int(inter['user_id'][bad])} has positions that are not 0, 1, 2, … "
                        f"(found {int(position[bad])} where {int(expected[bad])} was due)")
    item = inter["item_id"].to_numpy()
    is_noise = inter["is_noise"].to_numpy(dtype=bool)
    style_at = inter["preferred_style"].to_numpy()
    last_row = np.cumsum(lengths) - 1

    interactions = pd.DataFrame({"user_id": inter["user_id"].to_numpy().astype(np.int64),
                                 "position": position.astype(np.int64), "item_id": item.astype(np.int64),
                                 "is_noise": is_noise})
    noise_per_user = np.bincount(user_of, weights=is_noise, minlength=len(user_ids)) / np.maximum(lengths, 1)
    users = pd.DataFrame({
        "user_id": user_ids.astype(np.int64),
        "split": pd.array(users_log["split"].tolist(), dtype="str"),
        "preferred_style": pd.array(style_at[last_row].tolist(), dtype="str"),
        "preferred_groups": pd.array(users_log["preferred_groups"].tolist(), dtype="str"),
        "noise_rate": noise_per_user.astype(np.float64),
    })

    # Windows: every position with a full history before it and a non-noise item on it is a target.
    target = np.flatnonzero((position >= history_len) & ~is_noise)
    history = item[target[:, None] + np.arange(-history_len, 0)]
    target_user = user_of[target]
    split_of = users_log["split"].to_numpy()
    frame = pd.DataFrame(
        {
            "window_id": pd.array(
                [f"u{u:05d}-p{p:03d}" for u, p in zip(user_ids[target_user], position[target])], dtype="str"
            ),
            "user_id": user_ids[target_user].astype(np.int64),
            "split": pd.array(split_of[target_user].tolist(), dtype="str"),
            "preferred_style": style_at[target],
        }
    )
    for i in range(history_len):
        frame[f"history_{i}"] = history[:, i].astype(np.int64)
    frame["target_item"] = item[target].astype(np.int64)

    # Ground-truth protocol: the reference drawn when the target was logged (the emoji in another style).
    refs = log.references.set_index(["user_id", "position"])["reference_item"]
    found = refs.reindex(pd.MultiIndex.from_arrays([frame["user_id"], position[target]]))
    if found.isna().any():
        row = frame.loc[found.isna().to_numpy()].iloc[0]
        raise DataError(f"log: no reference for the target of window {row['window_id']!r} (references table)")
    item_style = items.set_index("item_id")["style"]
    item_emoji = items.set_index("item_id")["emoji_key"]
    frame["reference_item"] = found.to_numpy().astype(np.int64)
    frame["reference_style"] = pd.array(item_style.reindex(frame["reference_item"]).tolist(), dtype="str")
    frame["gt_item"] = frame["target_item"]
    frame["target_emoji"] = pd.array(item_emoji.reindex(frame["target_item"]).tolist(), dtype="str")
    frame["paper_reference_item"] = frame["target_item"]

    windows = {}
    for name in SPLITS:
        rows = frame[frame["split"] == name].reset_index(drop=True)
        windows[name] = rows[window_columns(name, history_len)]
    return Simulation(users, interactions, windows)


def simulate_users(items: pd.DataFrame, cfg: SimulateConfig, seed: int) -> Simulation:
    """Seeded simulation of ``cfg.num_users`` users over the ``items`` table: day 0 of the log."""
    return derive_simulation(items, cfg, simulate_day(items, cfg, seed))


def write_simulation(sim: Simulation, out_dir: Path) -> None:
    """Write the users folder (the caller wraps it in ``atomic_dir``)."""
    sim.users.to_parquet(out_dir / "users.parquet", index=False)
    sim.interactions.to_parquet(out_dir / "interactions.parquet", index=False)
    for name, frame in sim.windows.items():
        frame.to_parquet(out_dir / f"windows_{name}.parquet", index=False)


def read_table(path: Path, columns: list[str] | tuple[str, ...]) -> pd.DataFrame:
    return read_parquet_table(path, columns, "file missing (run `pigeon stage simulate`)")


def read_users(ws: Workspace) -> pd.DataFrame:
    return read_table(ws.users / "users.parquet", USER_COLUMNS)


def read_interactions(ws: Workspace) -> pd.DataFrame:
    return read_table(ws.users / "interactions.parquet", INTERACTION_COLUMNS)


def read_windows(ws: Workspace, split: str, history_len: int | None = None) -> pd.DataFrame:
    """The windows of one split; raises DataError naming the file and any missing column."""
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    path = ws.users / f"windows_{split}.parquet"
    frame = read_table(path, [])
    found = [c for c in frame.columns if re.fullmatch(r"history_\d+", str(c))]
    if history_len is None:  # infer from the file: history_0 … history_{H-1}
        history_len = len(found)
        if history_len == 0:
            raise DataError(f"{path}: missing column(s) history_0")
    missing = [c for c in window_columns(split, history_len) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    if len(found) != history_len:  # a longer history would be silently cut to history_len
        extra = sorted(set(found) - set(history_columns(history_len)))
        raise DataError(f"{path}: {len(found)} history items per window, expected {history_len} "
                        f"(model.history_len); extra column(s) {', '.join(extra)}")
    _check_item_ids(frame, path, len(read_items(ws.raw)))
    return frame


def _check_item_ids(frame: pd.DataFrame, path: Path, n_items: int) -> None:
    """Every item column holds ids of the items table: an unknown id fails here, naming it, not mid-training."""
    for column in [c for c in frame.columns if re.fullmatch(r"history_\d+", str(c)) or c in ITEM_ID_COLUMNS]:
        ids = pd.to_numeric(frame[column], errors="coerce")
        bad = ids.isna() | (ids < 0) | (ids >= n_items) | (ids != ids.round())
        if bad.any():
            row = frame.loc[bad].iloc[0]
            value = row[column].item() if hasattr(row[column], "item") else row[column]
            raise DataError(f"{path}: {column} = {value!r} in window {row.get('window_id')!r} is not an "
                            f"item id (items: 0..{n_items - 1})")


# --- the interaction log's folder (written by pigeon.data.ingest, read by simulate and validation) ----
LOG_TABLES = {"users": LOG_USER_COLUMNS, "interactions": LOG_INTERACTION_COLUMNS,
              "references": LOG_REFERENCE_COLUMNS}
LOG_META = "log.json"


def log_dir(ws: Workspace) -> Path:
    return ws.root / "data" / "log"


def read_log(folder: Path) -> tuple[LogTables, dict]:
    """The log's tables and its ``log.json``; a missing file or column is a one-line DataError."""
    hint = "file missing (run `pigeon data ingest` or `pigeon stage ingest`)"
    tables = [read_parquet_table(folder / f"{name}.parquet", columns, hint) for name, columns in LOG_TABLES.items()]
    return LogTables(*tables), read_json(folder / LOG_META)
