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

from pigeon.config import SimulateConfig
from pigeon.data.raw import read_items
from pigeon.data.raw import read_table as read_parquet_table
from pigeon.errors import DataError
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


def simulate_users(items: pd.DataFrame, cfg: SimulateConfig, seed: int) -> Simulation:
    """Seeded simulation of ``cfg.num_users`` users over the ``items`` table."""
    cat = _Catalogue(items)
    n_styles, n_groups = len(cat.styles), len(cat.groups)
    if n_styles < 2:
        raise DataError(f"items: need at least 2 styles to simulate noise, found {n_styles}")
    if not cat.multi_style.any():
        raise DataError("items: no emoji exists in two styles; windows need a cross-style reference")
    rng = np.random.default_rng(seed)
    n = cfg.num_users
    history_len = cfg.window - 1

    # Balanced preferred styles (every style gets users), random groups and sequence lengths.
    pref_style = rng.permutation(np.arange(n) % n_styles)
    lengths = rng.integers(cfg.min_interactions, cfg.max_interactions + 1, size=n)
    max_groups = min(cfg.max_groups, n_groups)
    n_pref_groups = rng.integers(min(cfg.min_groups, max_groups), max_groups + 1, size=n)
    emoji_group_idx = pd.Index(cat.groups).get_indexer(cat.emoji_group)

    user_of = np.repeat(np.arange(n), lengths)
    position = np.concatenate([np.arange(k) for k in lengths])
    is_noise = rng.random(len(user_of)) < cfg.noise_rate
    from_pref = rng.random(len(user_of)) < cfg.group_focus
    emoji = np.empty(len(user_of), dtype=np.int64)
    pref_groups_text = []
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for u in range(n):
        groups_u = np.sort(rng.choice(n_groups, size=n_pref_groups[u], replace=False))
        pref_groups_text.append("|".join(cat.groups[g] for g in groups_u))
        in_pref = np.isin(emoji_group_idx, groups_u)
        # Non-noise items need the emoji in the preferred style and in one other style.
        ok = cat.available[:, pref_style[u]] & cat.multi_style
        span = slice(starts[u], starts[u + 1])
        want_pref = from_pref[span]
        all_ok = np.flatnonzero(ok)
        pick = np.empty(lengths[u], dtype=np.int64)
        pick[want_pref] = _pick(rng, np.flatnonzero(ok & in_pref), all_ok, int(want_pref.sum()))
        pick[~want_pref] = _pick(rng, np.flatnonzero(ok & ~in_pref), all_ok, int((~want_pref).sum()))
        emoji[span] = pick

    # Noise positions: the same emoji in a random other style where it exists.
    style = pref_style[user_of].copy()
    noise_idx = np.flatnonzero(is_noise)
    scores = rng.random((len(noise_idx), n_styles))
    allowed = cat.available[emoji[noise_idx]].copy()
    allowed[np.arange(len(noise_idx)), style[noise_idx]] = False
    style[noise_idx] = np.where(allowed, scores, -1.0).argmax(axis=1)
    item = cat.item_id[emoji, style]

    order = rng.permutation(n)
    split_of = np.empty(n, dtype=object)
    bounds = np.cumsum([0, *_split_counts(n, cfg.split)])
    for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
        split_of[order[lo:hi]] = name

    interactions = pd.DataFrame(
        {
            "user_id": user_of.astype(np.int64),
            "position": position.astype(np.int64),
            "item_id": item.astype(np.int64),
            "is_noise": is_noise,
        }
    )
    noise_per_user = np.bincount(user_of, weights=is_noise, minlength=n) / lengths
    users = pd.DataFrame(
        {
            "user_id": np.arange(n, dtype=np.int64),
            "split": pd.array(split_of.tolist(), dtype="str"),
            "preferred_style": pd.array([cat.styles[s] for s in pref_style], dtype="str"),
            "preferred_groups": pd.array(pref_groups_text, dtype="str"),
            "noise_rate": noise_per_user.astype(np.float64),
        }
    )

    # Windows: every position with a full history before it and a non-noise item on it is a target.
    target = np.flatnonzero((position >= history_len) & ~is_noise)
    history = item[target[:, None] + np.arange(-history_len, 0)]
    target_user = user_of[target]
    frame = pd.DataFrame(
        {
            "window_id": pd.array(
                [f"u{u:05d}-p{p:03d}" for u, p in zip(target_user, position[target])], dtype="str"
            ),
            "user_id": target_user.astype(np.int64),
            "split": pd.array(split_of[target_user].tolist(), dtype="str"),
            "preferred_style": users["preferred_style"].to_numpy()[target_user],
        }
    )
    for i in range(history_len):
        frame[f"history_{i}"] = history[:, i].astype(np.int64)
    frame["target_item"] = item[target].astype(np.int64)

    # Ground-truth protocol: the target emoji in a random other style is the reference.
    ref_scores = rng.random((len(target), n_styles))
    ref_allowed = cat.available[emoji[target]].copy()
    ref_allowed[np.arange(len(target)), style[target]] = False
    ref_style = np.where(ref_allowed, ref_scores, -1.0).argmax(axis=1)
    frame["reference_item"] = cat.item_id[emoji[target], ref_style].astype(np.int64)
    frame["reference_style"] = pd.array([cat.styles[s] for s in ref_style], dtype="str")
    frame["gt_item"] = frame["target_item"]
    frame["target_emoji"] = pd.array([cat.emoji[e] for e in emoji[target]], dtype="str")
    frame["paper_reference_item"] = frame["target_item"]

    windows = {}
    for name in SPLITS:
        rows = frame[frame["split"] == name].reset_index(drop=True)
        windows[name] = rows[window_columns(name, history_len)]
    return Simulation(users, interactions, windows)


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
