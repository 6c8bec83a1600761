"""Data-parallel stage 1 and DPO under ``accelerate launch`` with two CPU processes (gloo).

Each test launches the real CLI (``accelerate launch -m pigeon stage …``) on a copy of the session's
smoke workspace, one torch thread per process. accelerate's multi-process launcher is ``--multi_gpu``
(torchrun); its ``--cpu`` flag starts one process unless an MPI hostfile is given, and
``device=cpu`` puts the two processes on gloo.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pigeon.config import Params, dump_params
from pigeon.io import load_tensors, read_json
from pigeon.lock import read_holder
from pigeon.paths import Workspace

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
FP32_CLI = "tests.model.test_distributed"  # this file run as the CLI, without bf16 autocast (see the end)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter.safetensors", "mask_generator.safetensors")


def params_for(smoke, ws: Workspace, **sections) -> Params:
    """The session's smoke params on one CPU thread, tracking into ``ws``'s own MLflow store."""
    tracking = smoke.params.tracking.model_copy(update={"uri": f"sqlite:///{ws.root}/mlflow.db",
                                                        "artifact_location": f"{ws.root}/mlartifacts"})
    updates = {name: getattr(smoke.params, name).model_copy(update=values) for name, values in sections.items()}
    return smoke.params.model_copy(update={"profile": "default", "threads": 1, "device": "cpu",
                                           "tracking": tracking, **updates})


def launch(stage: str, ws: Workspace, params: Params, module: str = "pigeon") -> subprocess.CompletedProcess:
    params_file = ws.root / "params-launch.yaml"
    params_file.write_text(dump_params(params))  # merged already: profile "default" merges nothing again
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [*LAUNCH, "-m", module, "stage", stage, "--workspace", str(ws.root), "--params", str(params_file)]
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def stage_runs(params: Params, stage: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=params.tracking.uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`pigeon.stage` = '{stage}'")


def trainable_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model's trainable parts (LoRA, adapter, mask generator), by file and name."""
    return {f"{name}:{key}": value for name in WEIGHT_FILES for key, value in load_tensors(folder / name).items()}


def fresh_copy(smoke, dest: Path, drop: Path) -> Workspace:
    ws = smoke.copy(dest)
    shutil.rmtree(ws.root / drop.relative_to(smoke.ws.root))
    return ws


def test_a_stage_that_does_not_split_refuses_a_launch(monkeypatch):
    from pigeon import distributed
    from pigeon.errors import PigeonError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PigeonError, match="stage evaluate runs in one process"):
        distributed.start("evaluate", "cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.start("evaluate", "cpu")  # one process: nothing to join


def test_stage1_on_two_processes_records_one_run_and_a_loadable_model(smoke, tmp_path):
    from pigeon.artifacts import load_pigeon

    smoke.run_until("stage1")
    single = read_json(smoke.ws.stage1 / "metrics.json")
    assert single["world_size"] == 1
    ws = fresh_copy(smoke, tmp_path / "ws", smoke.ws.stage1)
    params = params_for(smoke, ws, stage1={"max_steps": 4, "eval_every": 2, "checkpoint_every": 2})
    runs_before = len(stage_runs(params, "stage1"))
    timings_before = ws.timings.read_text().count('"stage1"')

    done = launch("stage1", ws, params)

    metrics = read_json(ws.stage1 / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    # The validation batches are shared out and summed: the untrained head's loss is the one-process figure.
    assert metrics["foundation_val_loss"] == pytest.approx(single["foundation_val_loss"], rel=1e-6)
    curves = pd.read_csv(ws.stage1 / "curves.csv")
    assert curves["step"].tolist() == [1, 2, 3, 4] and np.isfinite(curves["train_loss"]).all()
    assert np.isfinite(curves["val_loss"].dropna()).all() and curves["val_loss"].notna().sum() == 2
    model = load_pigeon(params, ws, "stage1", "cpu")
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())
    # Only the main process printed, tracked, timed and held the lock; its checkpoint is cleared.
    assert done.stdout.count('"stage": "stage1"') == 1
    runs = stage_runs(params, "stage1")
    assert len(runs) == runs_before + 1
    newest = max(runs, key=lambda r: r.info.start_time)
    assert newest.info.status == "FINISHED" and newest.data.metrics["world_size"] == 2
    assert ws.timings.read_text().count('"stage1"') == timings_before + 1
    assert read_holder(ws.lock) is None and not ws.checkpoint_dir("stage1").exists()


def test_dpo_on_two_processes_takes_the_single_process_steps(smoke, tmp_path, monkeypatch):
    """DPO draws nothing at random inside a step, so two processes sharing each global batch must take
    the steps one process takes. A batch of 23 of the 24 training pairs splits 12 + 11, and the one
    pair left over goes to rank 0 alone (rank 1 joins the all-reduce with a zero weight). Both runs are
    fp32 (FP32_CLI): bf16 rounding depends on the batch's shape and would hide a wrong step."""
    import pigeon.runtime
    from pigeon.runtime import seed_everything
    from pigeon.stages import run_stage

    smoke.run_until("dpo")
    assert read_json(smoke.ws.dpo / "metrics.json")["world_size"] == 1
    monkeypatch.setattr(pigeon.runtime, "cpu_has_bf16", lambda: False)  # after the shared pipeline ran
    one = fresh_copy(smoke, tmp_path / "one", smoke.ws.dpo)
    two = fresh_copy(smoke, tmp_path / "two", smoke.ws.dpo)
    params_one = params_for(smoke, one, dpo={"batch_size": 23, "epochs": 2, "lr": 0.0005})
    assert read_json(one.pairs / "summary.json")["pairs"]["train"] == 24  # the split described above
    seed_everything(params_one.seed)
    run_stage("dpo", params_one, one)

    launch("dpo", two, params_for(smoke, two, dpo={"batch_size": 23, "epochs": 2, "lr": 0.0005}), module=FP32_CLI)

    metrics = {name: read_json(ws.dpo / "metrics.json") for name, ws in (("one", one), ("two", two))}
    assert metrics["one"]["world_size"] == 1 and metrics["two"]["world_size"] == 2
    assert metrics["two"]["steps"] == metrics["one"]["steps"] == 4
    assert metrics["two"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["two"]["initial_logp_gap"] < 1e-4
    curves = {name: pd.read_csv(ws.dpo / "curves.csv") for name, ws in (("one", one), ("two", two))}
    for column in ("loss", "grad_norm", "rewards/accuracies"):
        np.testing.assert_allclose(curves["two"][column], curves["one"][column], rtol=1e-4, err_msg=column)
    # A reward is β × a difference of two sums of 65 log-probs (≈ -270): a few float32 ulps of those sums.
    for column in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        np.testing.assert_allclose(curves["two"][column], curves["one"][column], rtol=0, atol=2e-5, err_msg=column)
    # Adam's first steps turn float noise in near-zero gradients into visible weight differences: the
    # check is on the whole update, which the two runs agree on to 1%.
    start, weights_one, weights_two = (trainable_weights(folder) for folder in (one.stage1, one.dpo, two.dpo))
    update = torch.cat([(weights_one[k] - start[k]).flatten() for k in start])
    gap = torch.cat([(weights_two[k] - weights_one[k]).flatten() for k in start])
    assert update.norm() > 0 and gap.norm() < 1e-2 * update.norm(), (float(gap.norm()), float(update.norm()))


if __name__ == "__main__":  # FP32_CLI: the pigeon CLI with the CPU's bf16 autocast off
    import pigeon.runtime
    from pigeon.cli import main

    pigeon.runtime.cpu_has_bf16 = lambda: False
    sys.exit(main(sys.argv[1:]))
