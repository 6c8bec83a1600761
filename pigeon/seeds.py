"""Seed derivation: every independent random stream of the pipeline is named, and its seed is derived
from the run's seed and that name, so streams never overlap and each one replays after a resume."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for the stream ``seed/name/…`` (sha256 of the path: unrelated names never collide)."""
    digest = hashlib.sha256("/".join(str(part) for part in (seed, *names)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_generator(seed: int, name: str, step: int) -> torch.Generator:
    """A CPU generator seeded by (seed, name, step): independent streams, replayable after a resume."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, name, step))


def numpy_rng(seed: int, *names: object) -> np.random.Generator:
    """A numpy generator for the stream ``seed/name/…`` (subsets and orders drawn once per run)."""
    import numpy as np

    return np.random.default_rng(derive_seed(seed, *names))


def subset_rows(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``size`` distinct row numbers of ``n`` (all when fewer) drawn from ``rng``, in ascending order."""
    import numpy as np

    return np.sort(rng.choice(n, size=min(size, n), replace=False))
