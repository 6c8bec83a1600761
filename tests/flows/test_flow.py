"""The ``retrain`` flow on the smoke profile: a first run completes, a run in a fresh process is all
cache hits and does no work, a params change re-runs only what depends on it, a deleted output
re-runs its stage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pigeon.io import tree_hash
from pigeon.stages import STAGES
from tests.conftest import REPO, SMOKE_OVERRIDES, SMOKE_STYLES
from tests.unit.test_lock import HOLDER

# The smoke profile, shrunk further: the flow's behaviour, not the model's quality, is under test.
SHRINK = ("foundation.vq_steps=12", "foundation.lm_steps=10", "stage1.max_steps=6", "stage1.eval_every=3",
          "evaluators.steps=10", "candidates.train_windows=12", "candidates.val_windows=4",
          "dpo.epochs=1", "evaluate.test_windows=6", "evaluate.bootstrap=10")
TRACKED_TREES = ("data", "models", "artifacts", "reports")  # every stage output lives under these

FRESH_PROCESS_RUN = """
import json, sys, time
from flows.retrain import retrain, task_run_states
root, overrides = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()
state = retrain(params_path=sys.argv[3], profile="smoke", overrides=overrides, workspace=root, return_state=True)
seconds = time.perf_counter() - start
print(json.dumps({"state": state.name, "seconds": seconds, "metrics": state.result(),
                  "tasks": task_run_states(state.state_details.flow_run_id)}))
"""


def _overrides(root: Path, *extra: str) -> list[str]:
    return [*SMOKE_OVERRIDES, *SHRINK, f"tracking.uri=sqlite:///{root}/mlflow.db",
            f"tracking.artifact_location={root}/mlartifacts", *extra]


def test_stage_keys_follow_dvc_yaml(tmp_path):
    """Keys come from dvc.yaml: a stage's own params, inputs and code move its key; others' do not."""
    from pigeon.config import load_params
    from pigeon.hashing import cache_key, load_stage_specs, source_hash, stage_fingerprint
    from pigeon.paths import Workspace

    specs = load_stage_specs(REPO / "dvc.yaml", "smoke")
    assert set(specs) == set(STAGES)
    assert {"models/foundation", "reports/validation.json"} <= set(specs["stage1"].inputs)
    assert "pigeon/stages/stage1.py" in specs["stage1"].code and "profiles/smoke.yaml" in specs["foundation"].code
    assert "reports/metrics.json" in specs["evaluate"].outs and "reports/simulate.json" in specs["simulate"].outs

    ws = Workspace.at(tmp_path)
    (tmp_path / "artifacts" / "pairs").mkdir(parents=True)
    (tmp_path / "artifacts" / "pairs" / "pairs.json").write_text("[1]")

    def key(stage: str, *extra: str) -> str:
        params = load_params(REPO / "params.yaml", "smoke", list(extra))
        return cache_key(stage_fingerprint(specs[stage], params, ws, REPO))

    dpo, rank = key("dpo"), key("rank")
    assert key("dpo", "dpo.beta=0.3") != dpo and key("rank", "dpo.beta=0.3") == rank
    assert key("dpo", "orchestration.retries=3") == dpo  # not a dpo param: no re-run
    (tmp_path / "artifacts" / "pairs" / "pairs.json").write_text("[2]")
    assert key("dpo") != dpo and key("rank") == rank

    code = tmp_path / "code"
    (code / "__pycache__").mkdir(parents=True)
    (code / "a.py").write_text("x = 1\n")
    before = source_hash(code)
    (code / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled")
    assert source_hash(code) == before  # compiling is not a code change
    (code / "a.py").write_text("x = 2\n")
    assert source_hash(code) != before


def _run_in_process(root: Path, *extra: str) -> tuple[dict, dict, float]:
    """(returned metrics, task states by name, seconds)."""
    from flows.retrain import retrain, task_run_states

    start = time.perf_counter()
    state = retrain(params_path=str(REPO / "params.yaml"), profile="smoke", overrides=_overrides(root, *extra),
                    workspace=str(root), return_state=True)
    seconds = time.perf_counter() - start
    assert state.is_completed(), state.message
    return state.result(), task_run_states(state.state_details.flow_run_id), seconds


def _stage_states(tasks: dict[str, str]) -> dict[str, str]:
    return {name: tasks[name] for name in STAGES}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file the stages write."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for tree in TRACKED_TREES for p in (root / tree).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    from pigeon.config import load_params
    from pigeon.data.synthetic import build_synthetic_raw

    root = tmp_path_factory.mktemp("flow-ws")
    sizes = load_params(REPO / "params.yaml", "smoke").data.sizes
    build_synthetic_raw(root / "data" / "raw", styles=SMOKE_STYLES, sizes=sizes, seed=0)
    metrics, tasks, seconds = _run_in_process(root)
    stage_seconds = [json.loads(line) for line in (root / ".pigeon" / "timings.jsonl").read_text().splitlines()]
    print(f"\nfirst flow run (every stage works): {seconds:.1f} s; server start {prefect_api.start_seconds} s;",
          ", ".join(f"{t.get('stage')} {t.get('seconds')}" for t in stage_seconds))
    return root, metrics, tasks


@pytest.mark.slow
def test_first_run_runs_every_stage_and_returns_the_metrics(first_run):
    root, metrics, tasks = first_run
    assert set(_stage_states(tasks).values()) == {"Completed"}
    for stage in ("candidates", "evaluate"):  # the fan-out of each sharded stage ran
        shards = [name for name in tasks if name.startswith(f"{stage}-shard-")]
        assert len(shards) >= 2 and all(tasks[name] == "Completed" for name in shards), (stage, tasks)
    assert metrics and metrics == json.loads((root / "reports" / "metrics.json").read_text())
    records = {p.name.rsplit("-", 1)[0] for p in (root / ".prefect-results").iterdir()}
    assert set(STAGES) <= records  # every stage's result persisted for the next process

    # MLflow: one pipeline run for the flow, every stage nested under it.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pigeon").experiment_id])
    [pipeline] = [r for r in runs if r.data.tags.get("pigeon.entrypoint") == "flow"]
    nested = {r.data.tags.get("pigeon.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id}
    assert nested == set(STAGES)


@pytest.mark.slow
def test_second_run_in_a_fresh_process_is_all_cached_and_does_no_work(first_run, prefect_api):
    root, metrics, _ = first_run
    before = _snapshot(root)
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_RUN, str(root), json.dumps(_overrides(root)), str(REPO / "params.yaml")],
        capture_output=True, text=True, env=prefect_api.env(), cwd=REPO, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\ncached flow run in a fresh process: {report['seconds']:.1f} s (flow call only)")
    assert report["state"] == "Completed"
    assert set(report["tasks"].values()) == {"Cached"} and set(STAGES) <= set(report["tasks"]), report["tasks"]
    assert report["metrics"] == metrics
    assert _snapshot(root) == before  # not one output rewritten


@pytest.mark.slow
def test_changing_dpo_beta_reruns_only_dpo_evaluate_register(first_run):
    root, _, _ = first_run
    pairs_before = tree_hash(root / "artifacts" / "pairs")
    metrics, tasks, seconds = _run_in_process(root, "dpo.beta=0.3")
    print(f"\nflow run after dpo.beta changed: {seconds:.1f} s")
    states = _stage_states(tasks)
    rerun = {"dpo", "evaluate", "register"}
    assert {s for s, state in states.items() if state == "Completed"} == rerun, states
    assert {s for s, state in states.items() if state == "Cached"} == set(STAGES) - rerun, states
    assert tree_hash(root / "artifacts" / "pairs") == pairs_before
    assert metrics == json.loads((root / "reports" / "metrics.json").read_text())


@pytest.mark.slow
def test_deleting_an_output_reruns_its_stage(first_run):
    root, _, _ = first_run
    beta = "dpo.beta=0.3"  # the params of the previous run: only the deletion differs
    validation = root / "reports" / "validation.json"
    before = tree_hash(validation)
    shutil.rmtree(root / "models" / "evaluators")
    validation.unlink()
    _, tasks, _ = _run_in_process(root, beta)
    states = _stage_states(tasks)
    assert states["validate"] == "Completed" and states["evaluators"] == "Completed", states
    assert validation.is_file() and (root / "models" / "evaluators").is_dir()
    assert all(states[s] == "Cached" for s in ("ingest", "simulate", "foundation")), states
    # stage1 reads validation.json: it re-runs exactly when the re-made file differs.
    assert states["stage1"] == ("Cached" if tree_hash(validation) == before else "Completed"), states


@pytest.mark.slow
def test_failed_stage_fails_the_flow_in_one_line_without_retrying(prefect_api, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.retrain import retrain

    (tmp_path / "data" / "raw").mkdir(parents=True)  # an empty dataset: ingest, the first stage, rejects it
    state = retrain(params_path=str(REPO / "params.yaml"), profile="smoke",
                    overrides=_overrides(tmp_path, "tracking.enabled=false"), workspace=str(tmp_path),
                    until="validate", return_state=True)
    assert state.is_failed()
    assert "stage 'ingest' failed:" in state.message and "\n" not in state.message, state.message
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
    assert [(run.name, run.run_count) for run in runs] == [("ingest", 1)]  # a PigeonError is not retried


@pytest.mark.slow
def test_flow_refuses_a_workspace_held_by_another_writer(prefect_api, tmp_path):
    from flows.retrain import retrain

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "stage1"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=prefect_api.env())
    try:
        assert json.loads(holder.stdout.readline())["pid"] == holder.pid
        state = retrain(params_path=str(REPO / "params.yaml"), profile="smoke", overrides=_overrides(tmp_path),
                        workspace=str(tmp_path), return_state=True)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert state.is_failed()
    assert f"locked by pid {holder.pid}" in state.message and "stage 'stage1'" in state.message
