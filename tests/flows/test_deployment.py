"""The ``nightly`` deployment of prefect.yaml against a real server: pool, deploy, run, worker.

The deployment runs the real ``retrain`` flow, stopped after ``simulate`` (the whole smoke pipeline
is covered by test_flow.py; here the scheduling and worker path is under test).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOKE_OVERRIDES, SMOKE_STYLES
from tests.flows.conftest import stop_process_group

pytestmark = pytest.mark.slow

WORKER_TIMEOUT = 300  # seconds for one polling round plus the flow run it starts


def _prefect(server, *args: str, timeout: float = 120) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args], cwd=REPO,
                          capture_output=True, text=True, env=server.env(COLUMNS="200"), timeout=timeout, check=False)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def test_nightly_deployment_runs_on_a_process_worker(prefect_api, tmp_path):
    from prefect import get_client

    from pigeon.data.synthetic import build_synthetic_raw

    server = prefect_api
    _prefect(server, "work-pool", "create", "gpu", "--type", "process")
    _prefect(server, "deploy", "--name", "nightly")

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/nightly")
    assert deployment.entrypoint == "flows/retrain.py:retrain" and deployment.work_pool_name == "gpu"
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC" and schedule.active
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert deployment.job_variables["env"]["PIGEON_PROFILE"] == "gpu"

    build_synthetic_raw(tmp_path / "data" / "raw", styles=SMOKE_STYLES, sizes=(32, 64), seed=0)
    parameters = {"params_path": str(REPO / "params.yaml"), "profile": "smoke", "workspace": str(tmp_path),
                  "until": "simulate", "overrides": [*SMOKE_OVERRIDES, "tracking.enabled=false"]}
    out = _prefect(server, "deployment", "run", "retrain/nightly", "--params", json.dumps(parameters))
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    worker = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "gpu",
                               "--run-once"], cwd=tmp_path, env=server.env(), start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = worker.communicate(timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_process_group(worker)
        pytest.fail("the worker did not finish its run within the timeout")
    finally:
        stop_process_group(worker)

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state.type.value == "COMPLETED", f"{flow_run.state}\n{log[-3000:]}"
    assert flow_run.deployment_id == deployment.id
    assert (tmp_path / "data" / "users").is_dir() and (tmp_path / "reports" / "simulate.json").is_file()
