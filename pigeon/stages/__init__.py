"""One module per pipeline stage; each exposes ``run(params, ws) -> dict`` (a small JSON summary).

The CLI (``pigeon stage NAME``), ``dvc.yaml`` and the Prefect flow all call :func:`run_stage`.
Under ``accelerate launch`` (pigeon.distributed) every process runs the stage; only the main one
holds the workspace lock, opens the MLflow run and records the timing.

:data:`PIPELINE` (defined in :mod:`pigeon.pipeline`, re-exported here) is the one list of stages in
Python, in pipeline order: what each reads and writes (as ``dvc.yaml`` declares it) and how it runs.
"""

from __future__ import annotations

import importlib
import time
from types import ModuleType
from typing import Any

from pigeon.config import Params
from pigeon.paths import Workspace
from pigeon.pipeline import (  # noqa: F401 (the registry, read from here by the flow and the tests)
    BACKBONE_STAGES,
    DATA_PARALLEL_STAGES,
    GPU_STAGES,
    PIPELINE,
    SHARDED_STAGES,
    STAGE_SPECS,
    STAGES,
    Stage,
    stage_spec,
)


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
