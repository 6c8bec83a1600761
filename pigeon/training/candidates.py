"""Candidate generation: one candidate per α_r of the sweep for a seeded subset of windows.

Windows are planned once (a pure function of the params and the windows files) and cut into
shards of ``shard_size`` windows; every shard can be generated on its own, in any order or in
parallel, and always gives the same codes (its random seeds derive from (seed, shard, chunk)).

A shard is three things, written in this order, each atomically, so that the JSON's presence
with a matching checksum means the shard is complete::

    images/shard-XXXXX/<window_id>.png   the window's candidates side by side, in sweep order
    shard-XXXXX.safetensors              codes [N, T], window_row [N] (row in the shard's windows),
                                         alpha_ref [N], history_keep [N, H, T], reference_keep [N, T],
                                         seeds [N]; N = windows × len(alpha_sweep), row = w·S + s
    shard-XXXXX.json                     window_ids, splits, alpha_sweep, the run fingerprint and
                                         the safetensors' md5
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pigeon.config import CandidatesConfig
from pigeon.data.raw import png_bytes
from pigeon.errors import DataError
from pigeon.io import atomic_dir
from pigeon.pixels import to_uint8
from pigeon.runtime import autocast
from pigeon.seeds import numpy_rng, subset_rows
from pigeon.shards import (
    ShardPlan,
    read_tensor_shard,
    shard_name,
    tensor_shard_complete,
    tensor_shard_files,
    write_tensor_shard,
)

SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def seeded_subset(windows: pd.DataFrame, size: int, seed: int, split: str) -> pd.DataFrame:
    """``size`` windows (all when fewer), drawn with a seed of their own, in file order."""
    rng = numpy_rng(seed, "candidates-windows", split)
    rows = subset_rows(rng, len(windows), size)
    return windows.iloc[rows].assign(split=split)


REFERENCE_COL = "stage2_reference"  # the reference candidates are generated from (and DPO scores under)


def with_stage2_reference(windows: pd.DataFrame, items: pd.DataFrame, mode: str, seed: int) -> pd.DataFrame:
    """``windows`` with the column ``stage2_reference``: the target itself (``mode="target"``), or
    (``"cross_style"``) an item drawn for the window from its own seeded stream among the items of another
    style than the target's and another emoji — the situation of inference, where the reference is drawn
    in some other vendor's style. The target is never used with it: no pair of one emoji in two styles."""
    if mode == "target":
        return windows.assign(**{REFERENCE_COL: windows["target_item"].to_numpy()})
    style = items["style"].to_numpy()
    emoji = items["emoji_key"].to_numpy()
    picks = []
    for window_id, target in zip(windows["window_id"], windows["target_item"].to_numpy()):
        rng = numpy_rng(seed, "stage2-reference", window_id)
        while True:  # all but a few items qualify: a handful of draws at most
            pick = int(rng.integers(len(items)))
            if style[pick] != style[target] and emoji[pick] != emoji[target]:
                break
        picks.append(pick)
    return windows.assign(**{REFERENCE_COL: np.asarray(picks, dtype=np.int64)})


def plan_candidates(train: pd.DataFrame, val: pd.DataFrame, cfg: CandidatesConfig, seed: int,
                    items: pd.DataFrame) -> ShardPlan:
    if len(train) == 0:
        raise DataError("windows_train.parquet: no training windows to generate candidates for")
    windows = pd.concat([seeded_subset(train, cfg.train_windows, seed, "train"),
                         seeded_subset(val, cfg.val_windows, seed, "val")], ignore_index=True)
    windows = with_stage2_reference(windows, items, cfg.reference, seed)
    bad = [w for w in windows["window_id"] if not SAFE_NAME.match(str(w))]
    if bad:
        raise DataError(f"windows: window_id {bad[0]!r} is not a safe file name")
    if windows["window_id"].duplicated().any():
        raise DataError(f"windows: window_id {windows['window_id'][windows['window_id'].duplicated()].iloc[0]!r} repeats")
    return ShardPlan(windows, cfg.shard_size)


def lookup_windows(ws, window_ids: list[str], history_len: int, source: Path, items: pd.DataFrame,
                   cfg: CandidatesConfig, seed: int) -> pd.DataFrame:
    """The train/val window rows of ``window_ids``, in that order, with their ``stage2_reference`` (as
    :func:`plan_candidates` drew it from ``items``); an unknown id is a DataError naming ``source``."""
    from pigeon.data.users import read_windows

    known = pd.concat([read_windows(ws, s, history_len) for s in ("train", "val")]).set_index("window_id")
    unknown = set(window_ids) - set(known.index)
    if unknown:
        raise DataError(f"{source}: window {min(unknown)!r} is in no windows file (stale? re-run the stage)")
    return with_stage2_reference(known.loc[list(window_ids)].reset_index(), items, cfg.reference, seed)


def chunk_seed(seed: int, shard: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, shard, chunk]).generate_state(1)[0])


@torch.no_grad()
def generate_candidates(model, encoder, windows: pd.DataFrame, cfg: CandidatesConfig, seed: int, shard: int,
                        device: torch.device) -> tuple[dict[str, torch.Tensor], float]:
    """Codes and the exact conditioning of every (window, α_r) of ``windows``, generated in chunks of
    about ``cfg.batch_size`` sequences with the KV cache → (tensors on the CPU, generation seconds)."""
    sweep = list(cfg.alpha_sweep)
    per_call = max(1, cfg.batch_size // len(sweep))
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in
                                            ("codes", "window_row", "alpha_ref", "history_keep", "reference_keep", "seeds")}
    seconds = 0.0
    for chunk, start in enumerate(range(0, len(windows), per_call)):
        batch = encoder.batch(windows.iloc[start : start + per_call], reference_col=REFERENCE_COL,
                              target_col=None).to(device)
        call_seed = chunk_seed(seed, shard, chunk)
        began = time.perf_counter()
        with autocast(device):
            out = model.generate(batch, alpha_ref=sweep, num_samples=len(sweep), sampling=cfg.sampling, seed=call_seed)
        seconds += time.perf_counter() - began
        parts["codes"].append(out.codes.cpu())
        parts["window_row"].append(out.window_index.cpu() + start)
        parts["alpha_ref"].append(out.conditioning.alpha_ref.float().cpu())
        parts["history_keep"].append(out.conditioning.history_keep.bool().cpu())
        parts["reference_keep"].append(out.conditioning.reference_keep.bool().cpu())
        parts["seeds"].append(torch.full((len(out.codes),), call_seed, dtype=torch.long))
    return {k: torch.cat(v) for k, v in parts.items()}, seconds


@torch.no_grad()
def decode_strips(model, codes: torch.Tensor, per_window: int, batch_size: int, device: torch.device) -> np.ndarray:
    """Decoded candidates as one uint8 strip per window: [W, S, S·per_window, 3]."""
    images = []
    for start in range(0, len(codes), batch_size):
        images.append(to_uint8(model.decode(codes[start : start + batch_size].to(device))))
    images = np.concatenate(images)
    n, s = images.shape[0] // per_window, images.shape[1]
    return images.reshape(n, per_window, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(n, s, per_window * s, 3)


def strip_images(strip: np.ndarray, per_window: int) -> np.ndarray:
    """Inverse of one row of :func:`decode_strips`: [S, S·n, 3] → [n, S, S, 3]."""
    s = strip.shape[0]
    return strip.reshape(s, per_window, s, 3).transpose(1, 0, 2, 3)


def shard_files(folder: Path, index: int) -> tuple[Path, Path, Path]:
    """The shard's tensors and JSON (:mod:`pigeon.shards`) and its folder of candidate strips."""
    return (*tensor_shard_files(folder, index), folder / "images" / shard_name(index))


def write_shard(folder: Path, index: int, windows: pd.DataFrame, tensors: dict[str, torch.Tensor],
                strips: np.ndarray, meta: dict) -> None:
    """The strips first, then the shard store's tensors and the JSON that marks the shard complete."""
    _, json_path, images_dir = shard_files(folder, index)
    json_path.unlink(missing_ok=True)  # the shard is incomplete until its JSON is back
    with atomic_dir(images_dir) as tmp:
        for window_id, strip in zip(windows["window_id"], strips):
            (tmp / f"{window_id}.png").write_bytes(png_bytes(strip))
    write_tensor_shard(folder, index, windows["window_id"].tolist(), tensors,
                       {**meta, "splits": windows["split"].tolist(), "rows": len(tensors["codes"])})


def shard_complete(folder: Path, index: int, windows: pd.DataFrame, run_fingerprint: str) -> bool:
    """The shard store's check, and every window's strip on disk."""
    ids = windows["window_id"].tolist()
    images_dir = shard_files(folder, index)[2]
    return (tensor_shard_complete(folder, index, ids, run_fingerprint)
            and all((images_dir / f"{w}.png").is_file() for w in ids))


read_shard = read_tensor_shard
