"""Data-parallel training over the processes that ``accelerate launch`` (or ``torchrun``) starts.

A plain run (``pigeon stage``, ``dvc repro``, the Prefect flow) is one process: rank 0 of 1, and
nothing here imports accelerate or changes a number. Under a launcher (``WORLD_SIZE`` > 1) every
process runs the stage: each draws the same seeded global batch and keeps its rows
``rows[rank::world_size]``, ``accelerate.Accelerator`` wraps the model in DistributedDataParallel
(gloo on CPU, NCCL on GPUs) so that ``backward`` averages the gradients, and only the main process
(rank 0) holds the workspace lock, opens the MLflow run and writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pigeon.errors import PigeonError
from pigeon.pipeline import DATA_PARALLEL_STAGES  # the stages whose spec says data_parallel

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return world_size() == 1 or rank() == 0


def start(stage: str, device: str) -> None:
    """Join the launched run's process group (a no-op in one process); refuse a stage that does not split.

    ``device`` is the params' ``device`` (auto, cpu, cuda): on CPU the processes talk through gloo; on
    CUDA through NCCL, each on its own GPU.
    """
    if world_size() == 1:
        return
    if stage not in DATA_PARALLEL_STAGES:
        raise PigeonError(f"stage {stage} runs in one process (data-parallel stages: "
                          f"{', '.join(DATA_PARALLEL_STAGES)}); run it without `accelerate launch`")
    from accelerate import PartialState

    from pigeon.runtime import resolve_device

    PartialState(cpu=resolve_device(device).type == "cpu")


def barrier() -> None:
    """Wait until every process gets here (a no-op in one process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first, then the others (it writes the cache they then read)."""
    if world_size() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def finish() -> None:
    """Leave the process group once the stage is done (a no-op in one process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under a launcher, this process's own GPU (``cuda:<local rank>``); otherwise ``device``."""
    if device.type == "cuda" and world_size() > 1:
        from accelerate import PartialState

        return PartialState().device
    return device


def _method_module(model: nn.Module, method: str) -> nn.Module:
    """A module whose forward is ``model.<method>``: DDP syncs the gradients of what its forward computed."""
    from torch import nn

    class MethodForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self.model, method)(*args, **kwargs)

    return MethodForward()


class DataParallel:
    """One training loop's view of the processes: its rows of each global batch, the forward whose
    gradients are averaged over the processes, and the batch-wide figures to log.

    In one process ``forward`` is ``model.<method>`` itself and every helper returns its input.
    """

    def __init__(self, model: nn.Module, method: str, device: torch.device):
        self.world_size, self.rank = world_size(), rank()
        self.accelerator = None
        self.forward = getattr(model, method)
        if self.world_size > 1:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs

            # mixed_precision="no": the loops' pigeon.runtime.autocast stays the only autocast.
            # Unused parameters are allowed: a frozen-rule mask generator still lists its weights.
            self.accelerator = Accelerator(
                cpu=device.type == "cpu", mixed_precision="no", device_placement=False,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
            # Only the model is prepared: in full precision without gradient accumulation accelerate's
            # optimizer wrapper adds nothing, and the checkpoint and the scheduler hold the optimizer itself.
            self.forward = self.accelerator.prepare(_method_module(model, method))

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """This process's rows of a global batch, and the weight of its mean loss.

        Rank r takes ``rows[r::world_size]`` and weights its mean loss by its share of the batch times
        the world size, so DDP's mean of the ranks' gradients is the gradient of the mean loss over the
        whole batch: the step one process takes on the same global batch (up to float summation order
        and the random draws made inside the step).
        """
        if self.world_size == 1:
            return rows, 1.0
        local = rows[self.rank :: self.world_size]
        if len(local) == 0:  # fewer rows than processes: a zero-weight row keeps this rank in the all-reduce
            return rows[:1], 0.0
        return local, len(local) * self.world_size / len(rows)

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss * weight)

    def seed_step(self, seed: int, step: int) -> None:
        """Ranks above 0 draw a step's random numbers (α_r, dropout) from a stream of (seed, rank, step),
        replayable after a resume; rank 0 keeps the global stream a one-process run uses."""
        if self.rank > 0:
            import torch

            from pigeon.seeds import derive_seed

            torch.manual_seed(derive_seed(seed, f"rank{self.rank}", step))

    def batch_mean(self, figures: dict[str, float], weight: float) -> dict[str, float]:
        """Means over this process's rows → means over the global batch (``weight`` from :meth:`split`)."""
        if self.accelerator is None:
            return figures
        totals = self._reduce([weight * value for value in figures.values()]) / self.world_size
        return dict(zip(figures, totals.tolist()))

    def batch_max(self, value: float) -> float:
        if self.accelerator is None:
            return value
        import torch

        return float(self.accelerator.gather(torch.tensor([value], device=self.accelerator.device)).max())

    def owns(self, index: int) -> bool:
        """Whether this process evaluates the ``index``-th evaluation batch (round robin)."""
        return index % self.world_size == self.rank

    def sum(self, value: float) -> float:
        """The sum of ``value`` over the processes."""
        if self.accelerator is None:
            return value
        return float(self._reduce([value])[0])

    def _reduce(self, values: list[float]) -> torch.Tensor:
        import torch

        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, "sum").cpu()
