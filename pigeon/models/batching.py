"""From dataset rows to model inputs: item images → visual codes and reference-view codes, window rows →
WindowBatch. (The workspace's cache of item codes is :func:`pigeon.artifacts.cached_item_codes`.)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pigeon.config import ModelConfig
from pigeon.errors import DataError
from pigeon.models.backbone import Backbone
from pigeon.models.personalization import build_prompt, reference_view
from pigeon.models.types import WindowBatch
from pigeon.pixels import to_pixels
from pigeon.seeds import step_generator


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def images_to_tensor(images_uint8: np.ndarray, size: int, device) -> torch.Tensor:
    """[N, S, S, 3] uint8 → [N, 3, size, size] float in [-1, 1] (resized when S differs)."""
    return to_pixels(images_uint8, device, size).clamp(-1.0, 1.0)


@torch.no_grad()
def item_codes(backbone: Backbone, images_uint8: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Visual codes [N, T] (long, CPU) of every item image."""
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise DataError(f"item images must be [N, S, S, 3], got shape {tuple(images_uint8.shape)}")
    device = _device(backbone)
    chunks = []
    for start in tqdm(range(0, len(images_uint8), batch_size), desc="encode items", leave=False):
        images = images_to_tensor(images_uint8[start:start + batch_size], backbone.image_size, device)
        chunks.append(backbone.encode_images(images).long().cpu())
    if not chunks:
        return torch.empty(0, backbone.tokens_per_image, dtype=torch.long)
    return torch.cat(chunks)


@torch.no_grad()
def reference_codes(backbone: Backbone, images_uint8: np.ndarray, views: int, seed: int = 0,
                    batch_size: int = 256) -> torch.Tensor:
    """Codes of the style-stripped reference views [N, 1 + views, T]: view 0 is the plain inference view,
    views 1… are seeded random training views (:func:`pigeon.models.personalization.reference_view`)."""
    out = []
    for view in range(views + 1):
        generator = None if view == 0 else step_generator(seed, "reference-view", view)
        out.append(item_codes(backbone, reference_view(images_uint8, generator), batch_size))
    return torch.stack(out, dim=1)


@dataclass
class ItemCodes:
    """Every item's visual codes [N, T] and its reference views' codes [N, 1 + V, T]."""

    codes: torch.Tensor
    reference: torch.Tensor

    def __len__(self) -> int:
        return len(self.codes)

    def to(self, device) -> ItemCodes:
        return ItemCodes(self.codes.to(device), self.reference.to(device))


class WindowEncoder:
    """Turns window rows into a WindowBatch on the device of the item codes."""

    def __init__(self, backbone: Backbone, item_codes: ItemCodes, items: pd.DataFrame, cfg: ModelConfig,
                 max_caption_tokens: int):
        if len(item_codes) != len(items) or len(item_codes.reference) != len(items):
            raise DataError(f"item codes cover {len(item_codes)} items but the items table has {len(items)}")
        self.codes = item_codes.codes
        self.reference = item_codes.reference
        self.history_cols = [f"history_{i}" for i in range(cfg.history_len)]
        # Captions of every item tokenized once: a batch is then pure indexing.
        prompts = [build_prompt(name) for name in items["name"].tolist()]
        ids, mask = backbone.tokenize_captions(prompts, max_caption_tokens)
        self.caption_ids = ids.to(self.codes.device)
        self.caption_mask = mask.to(self.codes.device)

    def _items(self, windows: pd.DataFrame, col: str | list[str]) -> torch.Tensor:
        cols = [col] if isinstance(col, str) else col
        missing = [c for c in cols if c not in windows.columns]
        if missing:
            raise DataError(f"windows: missing column(s) {', '.join(missing)}")
        ids = torch.as_tensor(windows[cols].to_numpy(dtype=np.int64, copy=True), device=self.codes.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.codes)):
            raise DataError(f"windows: item id out of range in {', '.join(cols)} (items: {len(self.codes)})")
        return ids if len(cols) > 1 else ids[:, 0]

    def batch(self, windows: pd.DataFrame, reference_col: str = "target_item",
              target_col: str | None = "target_item", views: torch.Generator | None = None) -> WindowBatch:
        """``views`` (training): each row's reference takes a random one of its views; else view 0."""
        history = self._items(windows, self.history_cols)
        reference = self._items(windows, reference_col)
        target = None if target_col is None else self.codes[self._items(windows, target_col)]
        view = torch.zeros_like(reference)
        if views is not None and self.reference.shape[1] > 1:
            view = torch.randint(0, self.reference.shape[1], reference.shape, generator=views).to(reference.device)
        return WindowBatch(history_codes=self.codes[history], reference_codes=self.reference[reference, view],
                           caption_ids=self.caption_ids[reference], caption_mask=self.caption_mask[reference],
                           target_codes=target)
