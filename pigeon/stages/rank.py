"""Stage ``rank``: reward every candidate, keep the best and the worst of each window as a DPO pair.

Reads ``artifacts/candidates`` (codes, recorded conditioning, decoded PNG strips), the foundation
backbone (reward encoder, see ``pigeon.evaluation.reward``) and the windows' history and reference
images; writes ``artifacts/pairs/`` (replaced atomically):

- ``pairs.parquet``: window_id, split, user_id, chosen/rejected sample index and α_r, rewards and
  their history/reference parts, margin;
- ``pairs.safetensors``: chosen_codes, rejected_codes and the conditioning both are scored under
  in DPO (history_keep, reference_keep, alpha_ref): the chosen candidate's recorded one, so the pair
  shares one prompt as DPO's derivation requires;
- ``rewards.png`` (reward and margin histograms, winning α_r), ``grid.png`` (history, reference,
  chosen, rejected of a few pairs), ``summary.json`` (incl. the history-only ranking's agreement).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pigeon.artifacts import load_backbone
from pigeon.config import Params
from pigeon.data.raw import load_images, png_bytes, read_items
from pigeon.data.users import history_columns
from pigeon.errors import DataError
from pigeon.evaluation.reward import RewardEncoder, candidate_rewards, choose_pairs, ranking_agreement
from pigeon.io import atomic_dir, atomic_write_bytes, read_json, save_tensors, write_json
from pigeon.paths import Workspace
from pigeon.runtime import resolve_device
from pigeon.training.candidates import REFERENCE_COL, lookup_windows, read_shard, shard_files, strip_images

GRID_PAIRS = 8


def _load_candidates(params: Params, ws: Workspace, items: pd.DataFrame
                     ) -> tuple[dict, pd.DataFrame, dict[str, torch.Tensor], np.ndarray]:
    """All shards → (index, one row per window, tensors per candidate row, images [W, S, px, px, 3])."""
    index_path = ws.candidates / "index.json"
    if not index_path.is_file():
        raise DataError(f"{index_path}: missing (run `pigeon stage candidates` to completion)")
    index = read_json(index_path)
    per_window, size = len(index["alpha_sweep"]), index["image_size"]
    frames, tensors, images = [], [], []
    for shard in range(len(index["shards"])):
        meta, shard_tensors = read_shard(ws.candidates, shard)
        frames.append(pd.DataFrame({"window_id": meta["window_ids"], "split": meta["splits"], "shard": shard}))
        tensors.append(shard_tensors)
        for window_id in meta["window_ids"]:
            path = shard_files(ws.candidates, shard)[2] / f"{window_id}.png"
            with Image.open(path) as strip:
                strip = np.asarray(strip.convert("RGB"))
            if strip.shape != (size, size * per_window, 3):
                raise DataError(f"{path}: strip is {strip.shape}, expected {(size, size * per_window, 3)}")
            images.append(strip_images(strip, per_window))
    table = pd.concat(frames, ignore_index=True)
    windows = lookup_windows(ws, table["window_id"].tolist(), params.model.history_len, ws.candidates, items,
                             params.candidates, params.seed)
    table = pd.concat([table, windows.drop(columns=["window_id", "split"])], axis=1)
    merged = {k: torch.cat([t[k] for t in tensors]) for k in tensors[0]}
    return index, table, merged, np.stack(images)


def _grid(history: np.ndarray, reference: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Rows of [history…, reference, chosen, rejected] with a white gap before the reference."""
    rows = []
    for h, r, c, j in zip(history, reference, chosen, rejected):
        gap = np.full_like(r[:, :4], 255)
        rows.append(np.concatenate([*h, gap, r, gap, c, j], axis=1))
    return np.concatenate(rows, axis=0)


def _plot(path, rewards: torch.Tensor, pairs: dict, sweep: list[float], min_margin: float) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.2), dpi=100)
    ax = fig.subplots(1, 3)
    rows = torch.arange(len(rewards))
    ax[0].hist(rewards.flatten().numpy(), bins=30, alpha=0.5, label="all candidates")
    ax[0].hist(rewards[rows, pairs["chosen"]].numpy(), bins=30, alpha=0.6, label="chosen")
    ax[0].hist(rewards[rows, pairs["rejected"]].numpy(), bins=30, alpha=0.6, label="rejected")
    ax[0].set_title("reward")
    ax[0].legend(fontsize=7)
    ax[1].hist(pairs["margin"].numpy(), bins=30)
    ax[1].axvline(min_margin, color="grey", linestyle="--", label="min_margin")
    ax[1].set_title("chosen − rejected margin")
    ax[1].legend(fontsize=7)
    positions = np.arange(len(sweep))
    ax[2].bar(positions - 0.2, np.bincount(pairs["chosen"].numpy(), minlength=len(sweep)), 0.4, label="chosen")
    ax[2].bar(positions + 0.2, np.bincount(pairs["rejected"].numpy(), minlength=len(sweep)), 0.4, label="rejected")
    ax[2].set_xticks(positions, [f"{a:g}" for a in sweep])
    ax[2].set_xlabel("α_r")
    ax[2].set_title("windows won / lost per α_r")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _stats(x: torch.Tensor) -> dict[str, float]:
    if x.numel() == 0:
        return {}
    q = torch.quantile(x.float(), torch.tensor([0.1, 0.5, 0.9]))
    return {"mean": float(x.mean()), "std": float(x.std()) if x.numel() > 1 else 0.0,
            "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}


def run(params: Params, ws: Workspace) -> dict:
    cfg = params.rank
    device = resolve_device(params.device)
    items = read_items(ws.raw)
    index, table, cand, cand_images = _load_candidates(params, ws, items)
    sweep = index["alpha_sweep"]
    n_windows, per_window = cand_images.shape[:2]
    item_images = load_images(ws.raw, params.backbone.image_size, items)
    history_ids = table[history_columns(params.model.history_len)].to_numpy(np.int64, copy=True)
    reference_ids = table[REFERENCE_COL].to_numpy(np.int64, copy=True)  # what the candidates were generated from

    encoder = RewardEncoder(load_backbone(params, ws, device), split=cfg.features == "split")
    train_rows = (table["split"] == "train").to_numpy()
    item_feats = encoder.fit_items(item_images, np.concatenate([history_ids[train_rows].ravel(),
                                                                reference_ids[train_rows]]))
    cand_feats = encoder.features(cand_images.reshape(-1, *cand_images.shape[2:])).reshape(n_windows, per_window, -1)
    history_feats = item_feats[torch.from_numpy(history_ids)]
    reference_feats = item_feats[torch.from_numpy(reference_ids)]
    scored = candidate_rewards(cand_feats, history_feats, reference_feats, cfg.w_history, cfg.w_reference,
                               encoder.style_dims)
    history_only = candidate_rewards(cand_feats, history_feats, reference_feats, 1.0, 0.0, encoder.style_dims)["reward"]
    pairs = choose_pairs(scored["reward"], cfg.min_margin)

    rows = torch.arange(n_windows)
    chosen_rows = rows * per_window + pairs["chosen"]
    rejected_rows = rows * per_window + pairs["rejected"]
    keep = pairs["keep"]
    out = pd.DataFrame({
        "window_id": table["window_id"], "split": table["split"], "user_id": table["user_id"],
        "shard": table["shard"],
        "chosen_sample": pairs["chosen"].numpy(), "rejected_sample": pairs["rejected"].numpy(),
        "chosen_alpha": cand["alpha_ref"][chosen_rows].numpy(), "rejected_alpha": cand["alpha_ref"][rejected_rows].numpy(),
        "chosen_reward": scored["reward"][rows, pairs["chosen"]].numpy(),
        "rejected_reward": scored["reward"][rows, pairs["rejected"]].numpy(),
        "margin": pairs["margin"].numpy(),
        **{f"{which}_{part}": scored[part][rows, pairs[which]].numpy()
           for which in ("chosen", "rejected") for part in ("history_sim", "reference_sim")},
    })[keep.numpy()].reset_index(drop=True)
    kept = keep.nonzero().flatten()
    pair_tensors = {
        "chosen_codes": cand["codes"][chosen_rows[kept]], "rejected_codes": cand["codes"][rejected_rows[kept]],
        "history_keep": cand["history_keep"][chosen_rows[kept]],
        "reference_keep": cand["reference_keep"][chosen_rows[kept]],
        "alpha_ref": cand["alpha_ref"][chosen_rows[kept]],
    }
    split_of = table["split"].to_numpy()
    summary = {
        "stage": "rank",
        "reward_encoder": "backbone.image_features (foundation tokenizer encoder, pooled; centred on the "
                          "training windows' images); not the evaluation encoder",
        "weights": {"w_history": cfg.w_history, "w_reference": cfg.w_reference, "min_margin": cfg.min_margin},
        "features": cfg.features, "reference": params.candidates.reference,
        "windows": {s: int((split_of == s).sum()) for s in ("train", "val")},
        "pairs": {s: int((out["split"] == s).sum()) for s in ("train", "val")},
        "dropped": int((~keep).sum()),
        "reward": _stats(scored["reward"].flatten()),
        "chosen_reward": _stats(scored["reward"][rows, pairs["chosen"]]),
        "rejected_reward": _stats(scored["reward"][rows, pairs["rejected"]]),
        "margin": _stats(pairs["margin"][keep]),
        "mean_reward_per_alpha": dict(zip([f"{a:g}" for a in sweep], scored["reward"].mean(0).tolist())),
        "chosen_alpha_counts": dict(zip([f"{a:g}" for a in sweep],
                                        np.bincount(pairs["chosen"][keep].numpy(), minlength=per_window).tolist())),
        "history_only_agreement": ranking_agreement(scored["reward"], history_only),
        "history_only_chosen_alpha_counts": dict(zip([f"{a:g}" for a in sweep], np.bincount(
            history_only.argmax(1).numpy(), minlength=per_window).tolist())),
    }
    with atomic_dir(ws.pairs) as tmp:
        out.to_parquet(tmp / "pairs.parquet", index=False)
        save_tensors(tmp / "pairs.safetensors", pair_tensors)
        _plot(tmp / "rewards.png", scored["reward"], pairs, sweep, cfg.min_margin)
        show = kept[:GRID_PAIRS]
        if len(show):
            grid = _grid(item_images[history_ids[show]], item_images[reference_ids[show]],
                         cand_images[show, pairs["chosen"][show]], cand_images[show, pairs["rejected"][show]])
            atomic_write_bytes(tmp / "grid.png", png_bytes(grid))
        write_json(tmp / "summary.json", summary)
    return {k: summary[k] for k in ("stage", "windows", "pairs", "dropped", "margin", "history_only_agreement")}
