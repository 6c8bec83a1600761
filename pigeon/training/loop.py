"""The one optimisation loop of every trainer: foundation phases, stage 1, DPO and the evaluators.

A trainer supplies what is its own — the step (a batch → a loss and the figures to log) and, if it
has one, what happens after a step (evaluation, early stopping, dead-code re-seeding) and how its
state is saved. The loop owns the rest, once: gradients (through ``DataParallel`` when several
processes train), clipping, the optimizer and scheduler steps, the learning rate actually used, curve
rows, the progress bar, periodic checkpoints (a run resumed from one replays the uninterrupted run
bit for bit: batch order, augmentations and masks are functions of (seed, stream name, step)), and
one batch-order rule.

Schedules are transformers' (``get_cosine_schedule_with_warmup`` and friends) applied to the
optimizer, so their state is saved and restored with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pigeon.distributed import is_main
from pigeon.seeds import step_generator

if TYPE_CHECKING:
    from pigeon.distributed import DataParallel


def batch_indices(n: int, batch_size: int, step: int, seed: int, name: str, *, whole_epochs: bool = False
                  ) -> np.ndarray:
    """Indices of batch ``step`` in the stream ``name``: seeded per-epoch permutations of range(n).

    ``whole_epochs=False``: batches run across epoch ends and are always full (the foundation and the
    evaluators count steps). ``True``: each epoch ends with a possibly short batch (stage 1 and DPO
    count epochs). Either way the batch is a pure function of (seed, name, step): a resumed run draws
    the uninterrupted run's batches.
    """
    def permutation(epoch: int) -> np.ndarray:
        return torch.randperm(n, generator=step_generator(seed, f"{name}/epoch", epoch)).numpy()

    if whole_epochs:
        epoch, position = divmod(step, math.ceil(n / batch_size))
        return permutation(epoch)[position * batch_size : (position + 1) * batch_size]
    first, last = step * batch_size, (step + 1) * batch_size
    parts = []
    for epoch in range(first // n, (last - 1) // n + 1):
        lo, hi = max(first - epoch * n, 0), min(last - epoch * n, n)
        parts.append(permutation(epoch)[lo:hi])
    return np.concatenate(parts)


@dataclass
class StepOutput:
    """What a trainer's step returns: the loss to differentiate and the figures to log."""

    loss: torch.Tensor
    figures: dict[str, float]  # means over this process's rows (averaged over the processes by the loop)
    weight: float = 1.0  # this process's share of the global batch (``DataParallel.split``)
    extra: dict[str, Any] = field(default_factory=dict)  # logged as given (already global, or labels)


@dataclass
class LoopProgress:
    """A loop's position and curve; ``state`` holds the trainer's own JSON-able figures (best validation
    loss, figures before training, …). Saved in every checkpoint."""

    step: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopProgress:
        return cls(int(data["step"]), list(data["rows"]), dict(data.get("state", {})))


class TrainingLoop:
    """Runs ``step_fn`` from ``progress.step`` to ``total_steps``.

    Per step: ``step_fn(step)`` → backward (``dp.backward`` with the step's weight) → clip to
    ``max_grad_norm`` (when set; the norm is logged) → optimizer and scheduler steps → a curve row
    ``{"step": step + 1, **figures, **extra, "lr": the rate this step used}`` (kept every ``log_every``
    steps and at the last) → ``after_step(step, row)``, which may add to the row and returns True to
    stop early → a checkpoint through ``save`` every ``checkpoint_every`` steps (main process only; not
    after the last step, whose outputs the trainer writes).
    """

    def __init__(self, name: str, parameters: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 total_steps: int, *, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 dp: DataParallel | None = None, max_grad_norm: float | None = None, checkpoint_every: int = 0,
                 save: Callable[[], None] | None = None, log_every: int = 1, progress_bar: bool = True,
                 postfix: tuple[str, ...] = ("loss",)):
        self.name, self.parameters, self.optimizer = name, list(parameters), optimizer
        self.total_steps, self.scheduler, self.dp = total_steps, scheduler, dp
        self.max_grad_norm, self.checkpoint_every, self.save = max_grad_norm, checkpoint_every, save
        self.log_every, self.progress_bar, self.postfix = max(1, log_every), progress_bar, postfix

    def run(self, progress: LoopProgress, step_fn: Callable[[int], StepOutput],
            after_step: Callable[[int, dict[str, Any]], bool | None] | None = None) -> LoopProgress:
        bar = tqdm(total=self.total_steps, initial=progress.step, desc=self.name, unit="step",
                   disable=not (self.progress_bar and is_main()), dynamic_ncols=True, leave=False)
        while progress.step < self.total_steps:
            step = progress.step
            out = step_fn(step)
            self.optimizer.zero_grad(set_to_none=True)
            if self.dp is None:
                out.loss.backward()
            else:
                self.dp.backward(out.loss, out.weight)
            row: dict[str, Any] = {"step": step + 1}
            if self.max_grad_norm is not None:
                row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm))
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            figures = out.figures if self.dp is None else self.dp.batch_mean(out.figures, out.weight)
            row.update({**figures, **out.extra, "lr": lr})
            stop = bool(after_step(step, row)) if after_step is not None else False
            progress.step = step + 1
            if step % self.log_every == 0 or progress.step == self.total_steps:
                progress.rows.append(row)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.4f}" for k in self.postfix if isinstance(row.get(k), float)},
                            refresh=False)
            if stop:
                break
            if (self.save is not None and self.checkpoint_every and progress.step % self.checkpoint_every == 0
                    and progress.step < self.total_steps and is_main()):
                self.save()
        bar.close()
        return progress
