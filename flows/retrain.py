"""The ``retrain`` Prefect flow: every pipeline stage as a cached task (docs/design.md §4).

Each task calls the same function as ``pigeon stage NAME`` and ``dvc repro``. A task's cache key is
the stage name + the params keys, data inputs and code that ``dvc.yaml`` lists for it (content
hashes); results persist under ``<workspace>/.prefect-results``, so a second run in a fresh process
finds them. A hit also needs the stage's outputs to be on disk with the hashes recorded when they
were made: a deleted or edited output makes its stage run again.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from pigeon.config import OrchestrationConfig, Params, load_params
from pigeon.errors import PigeonError
from pigeon.hashing import StageSpec, cache_key, data_hash, load_stage_specs, output_hashes, stage_fingerprint
from pigeon.lock import workspace_lock
from pigeon.paths import Workspace
from pigeon.stages import GPU_STAGES, SHARDED_STAGES, STAGES  # the stage registry (pigeon.stages.PIPELINE)

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where dvc.yaml and the code live
RESULTS_DIR = ".prefect-results"
GPU_LIMIT = "gpu"  # GPU_STAGES run under this global concurrency limit
RETRY_DELAY_SECONDS = 10


@dataclass(frozen=True)
class StageCall:
    """What every task of one flow run shares: plain values only, so tasks hash and pickle cleanly."""

    params: Params
    workspace: str
    lock_token: str
    use_gpu_limit: bool

    @property
    def ws(self) -> Workspace:
        return Workspace.at(self.workspace)

    def spec(self, stage: str) -> StageSpec:
        return load_stage_specs(PROJECT_ROOT / "dvc.yaml", self.params.profile)[stage]


def _logger():
    try:
        return get_run_logger()
    except Exception:  # outside a run (a unit test calling a helper)
        import logging

        return logging.getLogger("pigeon.flow")


class StageCachePolicy(CachePolicy):
    """Key from the stage's fingerprint; a stored result whose outputs changed is dropped first."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str:
        call: StageCall = inputs["call"]
        stage: str = inputs["stage"]
        key = stage_key(call, stage, inputs.get("shard_index"))
        stale = stale_outputs(task_ctx.result_store, key, call, stage, inputs.get("shard_index"))
        if stale:  # a stale record would be returned as a hit: drop it so the stage runs again
            _logger().warning("%s: %s changed since the cached run; running it again", stage, ", ".join(stale))
            (call.ws.root / RESULTS_DIR / key).unlink(missing_ok=True)
        return key


def stage_key(call: StageCall, stage: str, shard_index: int | None = None) -> str:
    fingerprint = stage_fingerprint(call.spec(stage), call.params, call.ws, PROJECT_ROOT)
    return cache_key(fingerprint, extra="" if shard_index is None else f"shard{shard_index:04d}")


def stale_outputs(store, key: str, call: StageCall, stage: str, shard_index: int | None = None) -> list[str]:
    """Outputs whose hash differs from the one the cached result recorded; [] when nothing is cached."""
    if not store.exists(key):
        return []
    try:
        recorded = store.read(key).result.get("outputs", {})
    except Exception:
        return ["the cached result"]
    # A shard's outputs are the files it recorded (they live inside the stage's output folder).
    now = (output_hashes(call.spec(stage), call.ws) if shard_index is None
           else {path: data_hash(call.ws.root / path) for path in recorded})
    return sorted(p for p in set(recorded) | set(now) if recorded.get(p) != now.get(p))


def will_be_cached(call: StageCall, stage: str) -> bool:
    """Whether the stage's task will be a cache hit (the task decides; this only plans ahead)."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    store = ResultStore(result_storage=LocalFileSystem(basepath=str(call.ws.root / RESULTS_DIR)),
                        serializer=JSONSerializer(), cache_result_in_memory=False)
    key = stage_key(call, stage)
    return store.exists(key) and not stale_outputs(store, key, call, stage)


def _plain(obj: Any) -> Any:
    """A stage summary as JSON data (numpy scalars and paths included)."""
    def default(value: Any) -> Any:
        if hasattr(value, "item"):
            return value.item()
        if hasattr(value, "tolist"):
            return value.tolist()
        return str(value)

    return json.loads(json.dumps(obj, default=default))


def _is_transient(task, task_run, state) -> bool:
    """Retry crashes and library errors; a PigeonError (bad input, failed check) fails the same way again."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return True
    return not isinstance(exc, PigeonError)


def _gpu_slot(call: StageCall, stage: str):
    if call.use_gpu_limit and stage in GPU_STAGES:
        from prefect.concurrency.sync import concurrency

        return concurrency(GPU_LIMIT, occupy=1)
    return contextlib.nullcontext()


@task(task_run_name="{stage}", cache_policy=StageCachePolicy(), persist_result=True, result_serializer="json")
def stage_task(stage: str, call: StageCall) -> dict[str, Any]:
    """Run one stage; its summary records the output hashes a later cache hit is checked against."""
    from pigeon.runtime import seed_everything, setup_torch
    from pigeon.stages import run_stage

    ws = call.ws
    with workspace_lock(ws, stage, token=call.lock_token), _gpu_slot(call, stage):
        setup_torch(call.params.threads)
        seed_everything(call.params.seed)
        result = run_stage(stage, call.params, ws)
    return _plain({**result, "outputs": output_hashes(call.spec(stage), ws)})


@task(task_run_name="{stage}-shard-{shard_index}", cache_policy=StageCachePolicy(), persist_result=True,
      result_serializer="json")
def shard_task(stage: str, call: StageCall, shard_index: int) -> dict[str, Any]:
    """Make one shard of a sharded stage; the stage's own task then keeps it and merges the shards.
    The result names the process that made it (``worker``)."""
    from pigeon.runtime import seed_everything, setup_torch

    ws, module = call.ws, sharded_stage(stage)
    with workspace_lock(ws, f"{stage} shard {shard_index}", token=call.lock_token), _gpu_slot(call, stage):
        setup_torch(call.params.threads)
        seed_everything(call.params.seed)  # generation seeds itself per shard and batch
        result = module.generate_shard(call.params, ws, shard_index) or {}
    files = [str(p.relative_to(ws.root)) for p in module.shard_outputs(ws, shard_index)]
    return _plain({**result, "worker": worker_identity(),
                   "outputs": {path: data_hash(ws.root / path) for path in files}})


def sharded_stage(stage: str):
    """The stage module of a sharded stage: ``shard_count``, ``generate_shard`` and ``shard_outputs``."""
    if stage not in SHARDED_STAGES:
        raise PigeonError(f"stage {stage!r} is not sharded (sharded stages: {', '.join(SHARDED_STAGES)})")
    return importlib.import_module(f"pigeon.stages.{stage}")


def worker_identity() -> dict[str, Any]:
    """Where a task ran: host, process id and, on a Dask worker, the worker's name."""
    try:
        from distributed import get_worker

        dask_worker = str(get_worker().name)
    except (ImportError, ValueError):  # not inside a Dask worker
        dask_worker = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "dask_worker": dask_worker}


def _task_options(ws: Workspace, orch: OrchestrationConfig) -> dict[str, Any]:
    return {
        "result_storage": ws.root / RESULTS_DIR,
        "retries": orch.retries,
        "retry_delay_seconds": RETRY_DELAY_SECONDS,
        "retry_condition_fn": _is_transient,
    }


def make_task_runner(orch: OrchestrationConfig):
    """Threads by default (as many as GPU slots: more would only queue on the limit); with
    ``task_runner: dask``, the running cluster at ``dask_address`` (workers on other nodes, started
    with PREFECT_API_URL pointing at this flow's server) or else a local cluster of ``dask_workers``."""
    if orch.task_runner == "dask":
        from prefect import get_client
        from prefect_dask import DaskTaskRunner

        if orch.dask_address:
            return DaskTaskRunner(address=orch.dask_address)

        from pigeon.runtime import OFFLINE_ENV, available_cores

        # Workers must report to this flow's API: without it each would start a temporary server.
        with get_client(sync_client=True) as client:
            env = {**OFFLINE_ENV, "PREFECT_API_URL": str(client.api_url)}
        # The workers share this machine's cores (pigeon.runtime.setup_torch reads it).
        env["OMP_NUM_THREADS"] = str(max(1, available_cores() // orch.dask_workers))
        return DaskTaskRunner(cluster_kwargs={"n_workers": orch.dask_workers, "threads_per_worker": 1,
                                              "dashboard_address": None, "env": env})
    return ThreadPoolTaskRunner(max_workers=orch.gpu_concurrency)


def fan_out(stage: str, call: StageCall) -> list[dict[str, Any]]:
    """Every shard of a sharded stage on the configured task runner → the shards' results."""
    runner = make_task_runner(call.params.orchestration)
    count = sharded_stage(stage).shard_count(call.params, call.ws)
    return stage_shards.with_options(task_runner=runner)(stage, call, count)


@flow(name="stage-shards", flow_run_name="{stage}-shards")
def stage_shards(stage: str, call: StageCall, count: int) -> list[dict[str, Any]]:
    """Fan a sharded stage out over its shards on this flow's task runner."""
    shard = shard_task.with_options(**_task_options(call.ws, call.params.orchestration))
    futures = shard.map(stage=unmapped(stage), call=unmapped(call), shard_index=list(range(count)))
    return [future.result() for future in futures]


def ensure_gpu_limit(slots: int) -> bool:
    """Create (or resize) the ``gpu`` global concurrency limit; False when the API cannot."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)
    except Exception as exc:
        warnings.warn(f"Prefect global concurrency limit {GPU_LIMIT!r} unavailable ({type(exc).__name__}: "
                      f"{exc}); GPU stages run without it", stacklevel=2)
        return False
    return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _run_stage(stage: str, call: StageCall, cached: bool) -> str:
    """Run one stage task (for a sharded stage: the fan-out over shards, then the merge); returns the
    task's state name."""
    options = _task_options(call.ws, call.params.orchestration)
    try:
        if stage in SHARDED_STAGES and not cached:
            fan_out(stage, call)
        state = stage_task.with_options(**options)(stage, call, return_state=True)
        state.result()  # raises the stage's exception when it failed
    except PigeonError as exc:
        raise PigeonError(f"stage {stage!r} failed: {exc}") from exc
    except Exception as exc:
        raise PigeonError(f"stage {stage!r} failed: {type(exc).__name__}: {_one_line(exc)}") from exc
    return state.name


@flow(name="retrain", log_prints=True)
def retrain(
    params_path: str = "params.yaml",
    profile: str | None = None,
    overrides: list[str] | None = None,
    workspace: str = ".",
    until: str | None = None,
    next_day: bool = False,
) -> dict[str, Any]:
    """Run the pipeline (or its stages up to ``until``); returns the headline metrics of
    ``reports/metrics.json`` (empty when the run stops before ``evaluate``). ``next_day``: first add the
    day after the interaction log's last one (``ingest.day`` = last + 1), as the nightly deployment does."""
    from pigeon.data.ingest import last_day, log_version, record_dvc_version
    from pigeon.runtime import set_offline_env
    from pigeon.tracking import pipeline_run

    set_offline_env()
    if until is not None and until not in STAGES:
        raise PigeonError(f"until: unknown stage {until!r} (stages: {', '.join(STAGES)})")
    stages = STAGES[: STAGES.index(until) + 1] if until else STAGES
    ws = Workspace.at(workspace)
    overrides = [*(overrides or ()), *([f"ingest.day={last_day(ws) + 1}"] if next_day else [])]
    params = load_params(params_path, profile, overrides)
    use_gpu_limit = ensure_gpu_limit(params.orchestration.gpu_concurrency)

    with workspace_lock(ws, "flow retrain") as holder, contextlib.ExitStack() as tracking:
        call = StageCall(params, str(ws.root), holder["token"], use_gpu_limit)
        tracked = False
        for stage in stages:
            cached = will_be_cached(call, stage)
            if not cached and not tracked:  # the MLflow pipeline run opens with the first stage that works
                tracking.enter_context(pipeline_run(params, ws, entrypoint="flow"))
                tracked = True
            state_name = _run_stage(stage, call, cached)
            print(f"{stage}: {state_name}")
            if stage == STAGES[0]:  # ingest: the data version every later stage and the model record
                version = log_version(ws) or {}
                print(f"data: interaction log day {version.get('day')}, DVC md5 {version.get('md5')}")
                warning = record_dvc_version(ws) if state_name == "Completed" else None
                if warning:
                    _logger().warning(warning)
    metrics_path = ws.reports / "metrics.json"
    if "evaluate" not in stages or not metrics_path.is_file():
        return {}
    from pigeon.io import read_json

    return read_json(metrics_path)


def task_run_states(flow_run_id) -> dict[str, str]:
    """State name of every task run of a flow run and its subflows, by task-run name."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        run_ids = [flow_run_id]
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        run_ids += [child.id for child in children]
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
    # A subflow shows in its parent as a task run too: keep the real tasks only.
    subflow_task_runs = {child.parent_task_run_id for child in children}
    return {tr.name: tr.state.name for tr in task_runs if tr.id not in subflow_task_runs and tr.state}
