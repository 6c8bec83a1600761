"""One module per pipeline stage; each exposes ``run(params, ws) -> dict`` (a small JSON summary).

The CLI (``pigeon stage NAME``), ``dvc.yaml`` and the Prefect flow all call :func:`run_stage`.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

from pigeon.config import Params
from pigeon.errors import PigeonError
from pigeon.paths import Workspace

STAGES = (
    "simulate",
    "validate",
    "foundation",
    "evaluators",
    "stage1",
    "candidates",
    "rank",
    "dpo",
    "evaluate",
    "register",
)


def run_stage(name: str, params: Params, ws: Workspace) -> dict[str, Any]:
    if name not in STAGES:
        raise PigeonError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    from pigeon.lock import workspace_lock
    from pigeon.tracking import track_stage

    with workspace_lock(ws, name):  # one writer per workspace; re-entrant inside the flow's hold
        module = importlib.import_module(f"pigeon.stages.{name}")
        # The stage's MLflow run opens (and the store is checked) before the stage does any work.
        with track_stage(name, params, ws) as tracked:
            start = time.perf_counter()
            result = module.run(params, ws) or {}
            result.setdefault("seconds", round(time.perf_counter() - start, 2))
            tracked.log_result(result)
    return result
