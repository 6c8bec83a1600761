"""One module per pipeline stage; each exposes ``run(params, ws) -> dict`` (a small JSON summary).

The CLI (``pigeon stage NAME``), ``dvc.yaml`` and the Prefect flow all call :func:`run_stage`.
Under ``accelerate launch`` (pigeon.distributed) every process runs the stage; only the main one
holds the workspace lock, opens the MLflow run and records the timing.

:data:`PIPELINE` is the one list of stages in Python, in pipeline order: what each reads and writes
(as ``dvc.yaml`` declares it; tests/unit/test_stage_registry.py fails when the two differ) and how it
runs. The flow, the MLflow tracking, ``accelerate launch`` and the test fixtures read it.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pigeon.config import Params
from pigeon.errors import PigeonError
from pigeon.paths import Workspace


@dataclass(frozen=True)
class Stage:
    """One pipeline stage. ``params``, ``deps``, ``outs`` and ``metrics`` are its ``dvc.yaml`` lists as
    written there (``${profile}`` unfilled; an out's options such as ``persist``/``cache`` stay in
    ``dvc.yaml``); its ``dvc.yaml`` cmd is :attr:`cmd`."""

    name: str
    params: tuple[str, ...]  # params keys: a section ("dpo") or a dotted key ("model.history_len")
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...] = ()  # metrics files the stage writes (DVC outputs too)
    sharded: bool = False  # the flow fans it out over shards (module: shard_count, generate_shard, shard_outputs)
    gpu: bool = False  # the flow runs it under the `gpu` concurrency limit
    data_parallel: bool = False  # it may run under `accelerate launch` (pigeon.distributed)

    @property
    def cmd(self) -> str:
        return f"pigeon stage {self.name}"


PIPELINE: tuple[Stage, ...] = (
    Stage(
        "ingest",
        params=("profile", "seed", "simulate", "ingest"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "profiles/${profile}.yaml", "pigeon/data/raw.py",
              "pigeon/data/users.py", "pigeon/data/ingest.py", "pigeon/data/validation.py",
              "pigeon/stages/ingest.py"),
        outs=("data/log",),
        metrics=("reports/ingest.json",),
    ),
    Stage(
        "simulate",
        params=("profile", "seed", "simulate", "data"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/log", "profiles/${profile}.yaml",
              "pigeon/data/raw.py", "pigeon/data/users.py", "pigeon/data/ingest.py", "pigeon/stages/simulate.py"),
        outs=("data/users",),
        metrics=("reports/simulate.json",),
    ),
    Stage(
        "validate",
        params=("profile", "data", "simulate", "ingest.style_mix_tolerance", "model.history_len"),
        deps=("data/raw", "data/log", "data/users", "profiles/${profile}.yaml", "pigeon/data/raw.py",
              "pigeon/data/users.py", "pigeon/data/ingest.py", "pigeon/data/validation.py",
              "pigeon/stages/validate.py"),
        outs=("reports/validation.json",),
    ),
    Stage(
        "foundation",
        params=("profile", "seed", "backbone", "foundation", "model.history_len", "model.reference_views"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "profiles/${profile}.yaml", "pigeon/models",
              "pigeon/training/foundation.py", "pigeon/training/checkpoint.py", "pigeon/stages/foundation.py"),
        outs=("models/foundation",),
        gpu=True,
    ),
    Stage(
        "evaluators",
        params=("profile", "seed", "backbone.image_size", "evaluators"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "profiles/${profile}.yaml",
              "pigeon/evaluation/evaluators.py", "pigeon/stages/evaluators.py"),
        outs=("models/evaluators",),
        metrics=("reports/evaluators.json",),
    ),
    Stage(
        "stage1",
        params=("profile", "seed", "model", "stage1"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/users", "models/foundation",
              "reports/validation.json", "pigeon/models", "pigeon/training/stage1.py",
              "pigeon/training/checkpoint.py", "pigeon/stages/stage1.py"),
        outs=("models/stage1",),
        gpu=True,
        data_parallel=True,
    ),
    Stage(
        "candidates",
        params=("profile", "seed", "backbone", "model", "candidates"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/users", "models/foundation", "models/stage1",
              "pigeon/models", "pigeon/training/candidates.py", "pigeon/shards.py", "pigeon/stages/stage1.py",
              "pigeon/stages/candidates.py"),
        outs=("artifacts/candidates",),
        sharded=True,
        gpu=True,
    ),
    Stage(
        "rank",
        params=("profile", "rank"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/users", "artifacts/candidates",
              "models/foundation", "pigeon/training/reward.py", "pigeon/training/candidates.py",
              "pigeon/stages/rank.py"),
        outs=("artifacts/pairs",),
    ),
    Stage(
        "dpo",
        params=("profile", "seed", "backbone", "model", "dpo"),
        deps=("data/users", "models/foundation", "models/stage1", "data/raw/items.parquet", "data/raw/manifest.json",
              "artifacts/pairs", "pigeon/models", "pigeon/training/dpo.py", "pigeon/training/candidates.py",
              "pigeon/training/checkpoint.py", "pigeon/stages/stage1.py", "pigeon/stages/dpo.py"),
        outs=("models/dpo",),
        gpu=True,
        data_parallel=True,
    ),
    Stage(
        "evaluate",
        params=("profile", "seed", "evaluate", "evaluators", "model", "backbone", "foundation.holdout_fraction"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/users", "models/foundation", "models/stage1",
              "models/dpo", "models/evaluators", "pigeon/models", "pigeon/evaluation", "pigeon/training/reward.py",
              "pigeon/shards.py", "pigeon/stages/stage1.py", "pigeon/stages/evaluate.py"),
        outs=("artifacts/evaluate", "reports/samples", "reports/plots", "reports/grid_ground_truth.png",
              "reports/grid_paper.png", "reports/results.md"),
        metrics=("reports/metrics.json",),
        sharded=True,
        gpu=True,
    ),
    Stage(
        "register",
        params=("profile", "register", "tracking"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/log", "models/foundation", "models/dpo",
              "reports/metrics.json", "pigeon/data/ingest.py", "pigeon/registry.py", "pigeon/serving.py",
              "pigeon/tracking.py", "pigeon/stages/register.py"),
        outs=("reports/registry.json",),
    ),
)
STAGE_SPECS: dict[str, Stage] = {stage.name: stage for stage in PIPELINE}
STAGES = tuple(STAGE_SPECS)  # pipeline order: each stage's inputs come from the ones before it
SHARDED_STAGES = tuple(stage.name for stage in PIPELINE if stage.sharded)
GPU_STAGES = tuple(stage.name for stage in PIPELINE if stage.gpu)
DATA_PARALLEL_STAGES = tuple(stage.name for stage in PIPELINE if stage.data_parallel)


def stage_spec(name: str) -> Stage:
    if name not in STAGE_SPECS:
        raise PigeonError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    return STAGE_SPECS[name]


def run_stage(name: str, params: Params, ws: Workspace) -> dict[str, Any]:
    stage_spec(name)  # an unknown name fails here
    from pigeon import distributed

    distributed.start(name, params.device)
    module = importlib.import_module(f"pigeon.stages.{name}")
    if distributed.is_main():
        result = _run_tracked(name, module, params, ws)
    else:  # another process of `accelerate launch`: no lock, no MLflow, no files
        distributed.barrier()  # until the main process holds the lock and has opened the MLflow run
        result = module.run(params, ws) or {}
    distributed.finish()
    return result


def _run_tracked(name: str, module: ModuleType, params: Params, ws: Workspace) -> dict[str, Any]:
    from pigeon.distributed import barrier
    from pigeon.lock import workspace_lock
    from pigeon.tracking import track_stage

    with workspace_lock(ws, name):  # one writer per workspace; re-entrant inside the flow's hold
        # The stage's MLflow run opens (and the store is checked) before the stage does any work.
        with track_stage(name, params, ws) as tracked:
            barrier()  # the other processes of a launched run start now
            start = time.perf_counter()
            result = module.run(params, ws) or {}
            result.setdefault("seconds", round(time.perf_counter() - start, 2))
            result.setdefault("peak_rss_mb", peak_rss_mb())
            tracked.log_result(result)
        record_timing(ws, name, result)
    return result


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (per stage under `dvc repro`: one process each)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def record_timing(ws: Workspace, name: str, result: dict[str, Any]) -> None:
    """Append the stage's wall time and peak memory to .pigeon/timings.jsonl (read by the benchmarks)."""
    import json

    ws.timings.parent.mkdir(parents=True, exist_ok=True)
    with open(ws.timings, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"stage": name, "time": time.time(), "seconds": result.get("seconds"),
                             "peak_rss_mb": result.get("peak_rss_mb")}) + "\n")
