"""Process-level set-up done by entry points only (never at import): threads, device, seeds."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DVC_NO_ANALYTICS": "1",
}


def set_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def available_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_world_size() -> int:
    """Processes a launcher (``accelerate launch``, ``torchrun``) started on this machine: they share its
    cores. 1 in a plain run."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def setup_torch(threads: int = 0) -> None:
    """``threads`` torch threads; 0 = ``OMP_NUM_THREADS`` when set (a local Dask worker gets its share
    that way), else the available cores, shared by the processes ``accelerate launch`` started side by
    side. Not the idle cores: the load average still counts the pipeline's own previous stage, which
    made every stage after the first run on one thread. Oversubscribed threads (more threads than
    cores across processes) were measured 3–100× slower than one: set ``threads`` on a shared machine."""
    import torch

    env = os.environ.get("OMP_NUM_THREADS", "")
    auto = int(env) if env.isdigit() and int(env) > 0 else max(1, available_cores() // local_world_size())
    torch.set_num_threads(threads or auto)


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from pigeon.errors import ConfigError

            raise ConfigError("device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA and on CPUs with native bf16; otherwise a no-op. ``PIGEON_AUTOCAST=off``
    runs everything in fp32 (to compare numerics across CPUs, or to rule bf16 out when debugging)."""
    import torch

    if os.environ.get("PIGEON_AUTOCAST", "on").lower() in ("off", "0", "false", "fp32"):
        return nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
