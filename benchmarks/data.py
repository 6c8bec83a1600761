"""Data: building the synthetic raw data set (the tests' fixture) and simulating users at full scale.

Reported as rates (images/s, windows/s) from one run each, best of ``repeats``; the tests check what
these produce, never how long they take.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import best_of, save, table

FULL_SCALE_EMOJI = 865  # the real dataset's shape: 865 emoji x 10 styles
FULL_SCALE_GROUPS = ("smileys-emotion", "people-body", "animals-nature", "food-drink", "travel-places",
                     "activities", "objects")


def full_scale_items() -> pd.DataFrame:
    """An items table of the real dataset's shape (no images): what ``simulate_users`` reads."""
    from pigeon.config import STYLES

    keys = [f"{0x1F300 + i:x}" for i in range(FULL_SCALE_EMOJI)]
    rows = [(k, FULL_SCALE_GROUPS[i % len(FULL_SCALE_GROUPS)], s) for s in sorted(STYLES) for i, k in enumerate(keys)]
    items = pd.DataFrame(rows, columns=["emoji_key", "group", "style"])
    items.insert(0, "item_id", np.arange(len(items)))
    return items


def run(repeats: int = 3, device: str = "cpu") -> list[dict]:
    from pigeon.config import SimulateConfig
    from pigeon.data.synthetic import build_synthetic_raw
    from pigeon.data.users import simulate_users
    from tests.conftest import SMOKE_STYLES

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(repeats + 1))
        seconds = best_of(lambda: build_synthetic_raw(Path(tmp) / str(next(runs)), styles=SMOKE_STYLES, seed=3),
                          repeats=repeats, warmup=1)
        images = len(list((Path(tmp) / "0").rglob("*.png")))
    rows.append({"task": "synthetic raw data", "units": images, "unit": "images", "seconds": seconds,
                 "per_second": images / seconds})
    items = full_scale_items()
    windows = sum(len(w) for w in simulate_users(items, SimulateConfig(), seed=0).windows.values())
    seconds = best_of(lambda: simulate_users(items, SimulateConfig(), seed=0), repeats=repeats, warmup=0)
    rows.append({"task": "simulate 1,000 users, full-scale items", "units": windows, "unit": "windows",
                 "seconds": seconds, "per_second": windows / seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = run(args.repeats)
    print(table(rows, list(rows[0])))
    save("data", rows)


if __name__ == "__main__":
    main()
