"""The rows of the evaluation table: how each method turns a test window into one image.

Generative rows run a Pigeon model (batched, bf16 autocast, seeded per batch so every model sees
the same random stream for the same windows); baselines copy a real image. Inference-time
ablations change one thing on the DPO model: the history mask (α_h = 0), the mask generator
(its seeded initial weights, the authors' released behaviour, whose generator never trains), the
adapter (the `<emb>` slot gets its placeholder embedding) or the detokenizer's style transfer (off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pigeon.config import EvaluateConfig
from pigeon.data.users import history_columns
from pigeon.evaluation.reward import RewardEncoder, candidate_rewards
from pigeon.models.batching import WindowEncoder
from pigeon.pixels import to_uint8
from pigeon.runtime import autocast

GENERATIVE = ("pigeon", "pigeon_select", "stage1", "foundation", "no_history_mask",
              "untrained_mask_generator", "no_adapter", "no_style_transfer")
BASELINES = ("reference_copy", "nearest_history", "tokenizer_ceiling", "truth")
METHODS = ("pigeon", "pigeon_select", "stage1", "foundation", "reference_copy", "nearest_history",
           "no_history_mask", "untrained_mask_generator", "no_adapter", "no_style_transfer", "tokenizer_ceiling",
           "truth")
SELECT_WEIGHTS = {"w_history": 0.5, "w_reference": 0.5}  # inference-time selection (docs/design.md §1)

# Where each protocol takes the reference and the truth from (docs/design.md §3).
PROTOCOLS = {
    "ground_truth": {"reference": "reference_item", "truth": "gt_item"},
    "paper": {"reference": "paper_reference_item", "truth": "target_item"},
}


@dataclass
class MethodImages:
    """One image per window (uint8 [W, S, S, 3]) and the α_r used (NaN for baselines)."""

    images: np.ndarray
    alpha_ref: np.ndarray
    sweep: dict = field(default_factory=dict)  # pigeon_select only: all candidates and their rewards


def keep_all_history(model, batch, alpha_ref):
    """Conditioning with α_h = 0: the model's own reference mask, every history token kept."""
    cond = model.condition(batch, alpha_ref=alpha_ref, training=False)
    return replace(cond, history_keep=torch.ones_like(cond.history_keep))


def windows_per_batch(batch_size: int, samples: int) -> int:
    """Windows generated at once when each gets ``samples`` samples (about ``batch_size`` sequences)."""
    return max(1, batch_size // samples)


def generation_unit(cfg: EvaluateConfig) -> int:
    """Windows in a whole number of batches of every generative row (one sample, or the sweep)."""
    sweep = len(cfg.select_sweep)
    return math.lcm(windows_per_batch(cfg.batch_size, 1), windows_per_batch(cfg.batch_size, sweep))


@torch.no_grad()
def generate_images(model, encoder: WindowEncoder, windows: pd.DataFrame, reference_col: str, alpha_ref,
                    cfg: EvaluateConfig, seed: int, device: torch.device, image_size: int,
                    condition_fn=None, desc: str = "generate") -> tuple[np.ndarray, torch.Tensor]:
    """→ (uint8 [W * S, size, size, 3], codes [W * S, T]), row = window i * S + sample s (S = len(alpha_ref)
    for a sweep). The batch starting at window i draws from ``seed + i``."""
    samples = len(alpha_ref) if isinstance(alpha_ref, (list, tuple)) else 1
    per_batch = windows_per_batch(cfg.batch_size, samples)
    images, codes = [], []
    for start in tqdm(range(0, len(windows), per_batch), desc=desc, leave=False):
        rows = windows.iloc[start : start + per_batch]
        batch = encoder.batch(rows, reference_col=reference_col, target_col=None).to(device)
        with autocast(device):
            cond = condition_fn(model, batch, alpha_ref) if condition_fn is not None else None
            result = model.generate(batch, alpha_ref=list(alpha_ref) if samples > 1 else alpha_ref,
                                    num_samples=samples, sampling=cfg.sampling, seed=seed + start, cond=cond)
            pixels = model.decode_generated(result, batch, cfg.style_strength)
        images.append(to_uint8(pixels, image_size))
        codes.append(result.codes.cpu())
    if not images:
        return np.zeros((0, image_size, image_size, 3), np.uint8), torch.zeros((0, 0), dtype=torch.long)
    return np.concatenate(images), torch.cat(codes)


class RewardSelector:
    """Reward-encoder features of real items (centred on the training windows' images, as `rank`)."""

    def __init__(self, backbone, item_images: np.ndarray, center_items: np.ndarray, split: bool = False):
        self.encoder = RewardEncoder(backbone, split=split)
        self.item_features = self.encoder.fit_items(item_images, center_items)  # [N, D] unit vectors

    def nearest_history(self, windows: pd.DataFrame, reference_col: str, history_len: int) -> np.ndarray:
        """Item id of the history image closest to the reference, per window."""
        history = windows[history_columns(history_len)].to_numpy(np.int64)
        reference = windows[reference_col].to_numpy(np.int64)
        sims = torch.einsum("whd,wd->wh", self.item_features[torch.tensor(history)],
                            self.item_features[torch.tensor(reference)])
        return history[np.arange(len(history)), sims.argmax(dim=1).numpy()]

    def rewards(self, candidates: np.ndarray, windows: pd.DataFrame, reference_col: str,
                history_len: int) -> dict[str, torch.Tensor]:
        """candidates uint8 [W, S, px, px, 3] → reward [W, S] (and its parts) with the selection weights."""
        w, s = candidates.shape[:2]
        feats = self.encoder.features(candidates.reshape(w * s, *candidates.shape[2:])).reshape(w, s, -1)
        history = torch.tensor(windows[history_columns(history_len)].to_numpy(np.int64))
        reference = torch.tensor(windows[reference_col].to_numpy(np.int64))
        return candidate_rewards(feats, self.item_features[history], self.item_features[reference],
                                 **SELECT_WEIGHTS, style_dims=self.encoder.style_dims)


def select_best(candidates: np.ndarray, sweep: tuple[float, ...], rewards: dict[str, torch.Tensor]) -> MethodImages:
    """Keep each window's highest-reward candidate of the α_r sweep."""
    best = rewards["reward"].argmax(dim=1).numpy()
    rows = np.arange(len(candidates))
    return MethodImages(candidates[rows, best], np.asarray(sweep, np.float64)[best],
                        sweep={"images": candidates, "alpha": np.asarray(sweep, np.float64),
                               "reward": rewards["reward"].numpy(), "chosen": best})


@torch.no_grad()
def tokenizer_round_trip(backbone, images_uint8: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Real images through the visual tokenizer and detokenizer (encode → decode): what any generator that
    writes these codes can at best reproduce."""
    from pigeon.models.batching import images_to_tensor

    out = []
    for start in range(0, len(images_uint8), batch_size):
        pixels = images_to_tensor(images_uint8[start:start + batch_size], backbone.image_size, backbone.device)
        with autocast(backbone.device):
            decoded = backbone.decode_codes(backbone.encode_images(pixels))
        out.append(to_uint8(decoded, images_uint8.shape[1]))
    return np.concatenate(out) if out else images_uint8[:0]


def baseline_images(method: str, windows: pd.DataFrame, reference_col: str, item_images: np.ndarray,
                    selector: RewardSelector, history_len: int, truth_col: str | None = None) -> MethodImages:
    """Rows made of real images: the reference, the nearest history image, and the ceilings — the true
    target image (``truth``) and the same through the tokenizer (``tokenizer_ceiling``)."""
    if method == "reference_copy":
        ids = windows[reference_col].to_numpy(np.int64)
    elif method == "nearest_history":
        ids = selector.nearest_history(windows, reference_col, history_len)
    elif method in ("truth", "tokenizer_ceiling") and truth_col is not None:
        ids = windows[truth_col].to_numpy(np.int64)
        if method == "tokenizer_ceiling":
            return MethodImages(tokenizer_round_trip(selector.encoder.backbone, item_images[ids]),
                                np.full(len(ids), np.nan))
    else:
        raise ValueError(f"not a baseline: {method}")
    return MethodImages(item_images[ids], np.full(len(ids), np.nan))
