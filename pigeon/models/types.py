"""The data passed between the model and its callers: a batch of windows, the conditioning actually
used (recordable and replayable), and what generation returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WindowBatch:
    """One row per window; all tensors on one device."""

    history_codes: torch.Tensor  # [B, H, T] long
    reference_codes: torch.Tensor  # [B, T] long
    caption_ids: torch.Tensor  # [B, L] long, left-padded
    caption_mask: torch.Tensor  # [B, L] long
    target_codes: torch.Tensor | None = None  # [B, T] long; None at inference

    def to(self, device) -> WindowBatch:
        return WindowBatch(*(None if v is None else v.to(device) for v in self._fields()))

    def select(self, index: torch.Tensor) -> WindowBatch:
        index = index.to(self.history_codes.device)
        return WindowBatch(*(None if v is None else v.index_select(0, index) for v in self._fields()))

    def _fields(self):
        return self.history_codes, self.reference_codes, self.caption_ids, self.caption_mask, self.target_codes

    def __len__(self) -> int:
        return self.history_codes.shape[0]


@dataclass
class Conditioning:
    """The masks and α_r actually used for each row: recordable and replayable."""

    history_keep: torch.Tensor  # [B, H, T] bool, True = kept
    reference_keep: torch.Tensor  # [B, T] bool
    alpha_ref: torch.Tensor  # [B] float

    def to(self, device) -> Conditioning:
        return Conditioning(self.history_keep.to(device), self.reference_keep.to(device), self.alpha_ref.to(device))

    def select(self, index: torch.Tensor) -> Conditioning:
        index = index.to(self.history_keep.device)
        return Conditioning(*(v.index_select(0, index) for v in (self.history_keep, self.reference_keep,
                                                                  self.alpha_ref)))

    def repeat_interleave(self, n: int) -> Conditioning:
        return Conditioning(*(v.repeat_interleave(n, dim=0) for v in (self.history_keep, self.reference_keep,
                                                                      self.alpha_ref)))

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {"history_keep": self.history_keep.cpu().numpy().astype(bool),
                "reference_keep": self.reference_keep.cpu().numpy().astype(bool),
                "alpha_ref": self.alpha_ref.float().cpu().numpy()}

    @classmethod
    def from_numpy(cls, d: dict) -> Conditioning:
        return cls(torch.as_tensor(np.asarray(d["history_keep"])).bool(),
                   torch.as_tensor(np.asarray(d["reference_keep"])).bool(),
                   torch.as_tensor(np.asarray(d["alpha_ref"])).float())

    def __len__(self) -> int:
        return self.history_keep.shape[0]


@dataclass
class GenerationOutput:
    codes: torch.Tensor  # [B*S, T] sampled visual codes; row = window i * S + sample s
    conditioning: Conditioning  # for the B*S rows, exactly what was used
    window_index: torch.Tensor  # [B*S] source window of each row
