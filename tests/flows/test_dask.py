"""The flow's shard fan-out on Dask (``orchestration.task_runner: dask``): a local cluster of two
worker processes makes the ``candidates`` and ``evaluate`` shards, and they are the files the
thread runner makes.

The upstream stages are not under test: the workspace is the untrained smoke workspace (tiny
foundation, untrained Pigeon head as stage 1 and DPO, evaluators trained for a few steps), and each
sharded stage runs as the flow runs it (``fan_out`` over shards, then the stage's own task merges).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pigeon.io import file_md5, load_tensors
from tests.conftest import smoke_params, untrained_workspace

SHARDED = ("candidates", "evaluate")
SHRINK = ("threads=1", "tracking.enabled=false", "evaluators.steps=10", "candidates.train_windows=12",
          "candidates.val_windows=4", "evaluate.test_windows=8", "evaluate.bootstrap=10")


def _params(runner: str):
    return smoke_params(*SHRINK, f"orchestration.task_runner={runner}", "orchestration.dask_workers=2")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A workspace with every input of ``candidates`` and ``evaluate``, made without training the models."""
    from pigeon.artifacts import load_pigeon
    from pigeon.stages import run_stage

    params = _params("thread")
    ws = untrained_workspace(tmp_path_factory.mktemp("dask-base"), params)
    load_pigeon(params, ws, None, "cpu").save_trainable(ws.dpo)
    run_stage("evaluators", params, ws)
    return ws.root


def _run_sharded_stages(root, runner: str, merge: bool) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Each sharded stage as the flow runs it (the merge only when asked) → (shard results, the
    stages' own results) by stage."""
    from flows.retrain import StageCall, _task_options, fan_out, stage_task
    from pigeon.lock import workspace_lock
    from pigeon.paths import Workspace

    params, ws = _params(runner), Workspace.at(root)
    shards, merged = {}, {}
    with workspace_lock(ws, "flow retrain") as holder:
        call = StageCall(params, str(ws.root), holder["token"], use_gpu_limit=False)
        for stage in SHARDED:
            shards[stage] = fan_out(stage, call)
            if merge:
                merge_task = stage_task.with_options(**_task_options(ws, params.orchestration))
                merged[stage] = merge_task(stage, call)
    return shards, merged


def _shard_tensors(root) -> dict[str, str]:
    """md5 of every shard's tensors, by path (the JSON of an evaluate shard also records timings)."""
    return {str(p.relative_to(root)): file_md5(p)
            for p in sorted(root.glob("artifacts/*/shard-*.safetensors"))}


@pytest.mark.slow
def test_dask_workers_make_the_shards_the_thread_runner_makes(prefect_api, prepared, tmp_path):
    on_dask, on_threads = tmp_path / "dask", tmp_path / "threads"
    shutil.copytree(prepared, on_dask)
    shutil.copytree(prepared, on_threads)

    dask_shards, dask_merged = _run_sharded_stages(on_dask, "dask", merge=True)
    thread_shards, _ = _run_sharded_stages(on_threads, "thread", merge=False)

    for stage in SHARDED:
        assert len(dask_shards[stage]) >= 2 and not any(r["skipped"] for r in dask_shards[stage]), stage
        # The stage's merge found every shard complete: the workers made them all.
        assert dask_merged[stage]["shards_skipped_this_run"] == len(dask_shards[stage]), stage
        # A cluster per stage, as in the flow: its two worker processes shared the shards.
        workers = [r["worker"] for r in dask_shards[stage]]
        assert all(w["dask_worker"] is not None for w in workers), workers
        pids = {w["pid"] for w in workers}
        assert len(pids) == 2 and os.getpid() not in pids, workers
    threads = [r["worker"] for stage in SHARDED for r in thread_shards[stage]]
    assert all(w["dask_worker"] is None and w["pid"] == os.getpid() for w in threads), threads

    # Same shards, byte for byte: the candidates' codes and every evaluation image.
    assert _shard_tensors(on_dask) == _shard_tensors(on_threads)
    assert len(_shard_tensors(on_dask)) == sum(len(dask_shards[s]) for s in SHARDED)
    for path in on_dask.glob("artifacts/candidates/shard-*.safetensors"):
        dask_codes = load_tensors(path)["codes"]
        assert torch.equal(dask_codes, load_tensors(on_threads / path.relative_to(on_dask))["codes"]), path
    assert (on_dask / "artifacts" / "candidates" / "index.json").is_file()
    assert (on_dask / "reports" / "metrics.json").is_file()


def test_dask_address_runs_tasks_on_that_running_cluster(prefect_api):
    """``orchestration.dask_address``: the flow's tasks go to an existing scheduler (here an in-process
    cluster standing in for workers on other nodes) instead of a cluster the flow starts itself."""
    from distributed import LocalCluster, get_worker
    from prefect import flow, task

    from flows.retrain import make_task_runner

    @task
    def where(index: int) -> str:
        return get_worker().address

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        orch = _params("dask").orchestration.model_copy(update={"dask_address": cluster.scheduler_address})
        runner = make_task_runner(orch)

        @flow(task_runner=runner)
        def probe() -> list[str]:
            return [f.result() for f in where.map(range(2))]

        workers = set(cluster.scheduler_info["workers"])
        assert set(probe()) <= workers and workers
