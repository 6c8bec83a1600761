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
    module = importlib.import_module(f"pigeon.stages.{name}")
    start = time.perf_counter()
    result = module.run(params, ws) or {}
    result.setdefault("seconds", round(time.perf_counter() - start, 2))
    return result
