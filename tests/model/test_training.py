"""Two-stage preference alignment on the smoke profile: stage 1, candidates, rank, DPO.

Each test reads what the real stages wrote in the session's smoke workspace; tests that change a
workspace work on a copy. The kill test runs the real CLI in subprocesses.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pigeon.config import dump_params
from pigeon.io import load_tensors, read_json
from pigeon.models.pigeon import Conditioning
from pigeon.runtime import autocast

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_stage1_validation_loss_ends_below_the_untrained_head(smoke):
    ws = smoke.run_until("stage1")
    metrics = read_json(ws.stage1 / "metrics.json")
    assert metrics["best_val_loss"] < metrics["foundation_val_loss"]
    assert metrics["final_val_loss"] < metrics["foundation_val_loss"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "mask_generator.safetensors",
                 "adapter.safetensors", "pigeon_config.json", "curves.csv", "loss.png"):
        assert (ws.stage1 / name).is_file(), name
    curves = pd.read_csv(ws.stage1 / "curves.csv")
    assert curves["step"].tolist() == list(range(1, metrics["steps"] + 1))
    assert curves["val_loss"].notna().sum() >= 2


def _first_shard(ws):
    from pigeon.training.candidates import read_shard

    return read_shard(ws.candidates, 0)


def test_candidates_record_the_exact_conditioning_and_seeds(smoke):
    """Replaying a shard's recorded masks, α_r and seed regenerates the same codes."""
    from pigeon.artifacts import load_pigeon, window_encoder
    from pigeon.data.raw import read_items
    from pigeon.data.users import read_windows
    from pigeon.training.candidates import REFERENCE_COL, with_stage2_reference

    ws = smoke.run_until("candidates")
    params = smoke.params
    sweep = list(params.candidates.alpha_sweep)
    index = read_json(ws.candidates / "index.json")
    assert index["windows"] == {"train": params.candidates.train_windows, "val": params.candidates.val_windows}
    meta, shard = _first_shard(ws)
    n = len(meta["window_ids"])
    assert shard["codes"].shape == (n * len(sweep), 64)
    assert shard["alpha_ref"].tolist() == pytest.approx(sweep * n)
    assert shard["window_row"].tolist() == np.repeat(np.arange(n), len(sweep)).tolist()

    model = load_pigeon(params, ws, "stage1", "cpu")
    windows = read_windows(ws, "train").set_index("window_id").loc[meta["window_ids"]].reset_index()
    windows = with_stage2_reference(windows, read_items(ws.raw), params.candidates.reference, params.seed)
    rows = (shard["seeds"] == shard["seeds"][0]).nonzero().flatten()  # the first generate call
    batch = window_encoder(params, ws, model).batch(windows.iloc[: len(rows) // len(sweep)],
                                                    reference_col=REFERENCE_COL, target_col=None)
    cond = Conditioning(shard["history_keep"][rows], shard["reference_keep"][rows], shard["alpha_ref"][rows])
    with autocast(torch.device("cpu")):  # as the candidates stage runs it
        fresh = model.condition(batch.select(shard["window_row"][rows]), alpha_ref=shard["alpha_ref"][rows])
        out = model.generate(batch, alpha_ref=sweep, sampling=params.candidates.sampling,
                             seed=int(shard["seeds"][0]), cond=cond)
    assert torch.equal(fresh.reference_keep, cond.reference_keep)  # the recorded masks are the model's own
    assert torch.equal(out.codes, shard["codes"][rows])


def test_candidates_rerun_redoes_only_missing_shards(smoke, tmp_path):
    from pigeon.stages import candidates

    smoke.run_until("candidates")
    ws = smoke.copy(tmp_path / "ws")
    before = load_tensors(ws.candidates / "shard-00001.safetensors")
    (ws.candidates / "shard-00001.json").unlink()  # as if killed before the shard's JSON was written
    (ws.candidates / "shard-00002.safetensors").write_bytes(b"torn")  # or mid-write of its tensors
    result = candidates.run(smoke.params, ws)
    index = read_json(ws.candidates / "index.json")
    assert result["shards_skipped_this_run"] == len(index["shards"]) - 2
    assert result["generated_this_run"] == 2 * smoke.params.candidates.shard_size * 3
    assert torch.equal(load_tensors(ws.candidates / "shard-00001.safetensors")["codes"], before["codes"])


def test_rank_pairs_are_the_best_and_worst_candidate(smoke):
    ws = smoke.run_until("rank")
    pairs = pd.read_parquet(ws.pairs / "pairs.parquet")
    tensors = load_tensors(ws.pairs / "pairs.safetensors")
    summary = read_json(ws.pairs / "summary.json")
    assert len(pairs) == len(tensors["chosen_codes"]) == sum(summary["pairs"].values()) > 0
    assert (pairs["chosen_reward"] - pairs["rejected_reward"]).to_numpy() == pytest.approx(pairs["margin"].to_numpy())
    assert (pairs["margin"] > 0).all() and (pairs["chosen_sample"] != pairs["rejected_sample"]).all()
    assert {"chosen", "rejected", "pair", "spearman"} <= set(summary["history_only_agreement"])
    # The recorded codes and conditioning are those of the chosen/rejected candidates of the shard.
    meta, shard = _first_shard(ws)
    row = pairs.index[pairs["window_id"] == meta["window_ids"][0]][0]
    s = len(smoke.params.candidates.alpha_sweep)
    first = pairs.iloc[row]
    assert torch.equal(tensors["chosen_codes"][row], shard["codes"][first["chosen_sample"]])
    assert torch.equal(tensors["rejected_codes"][row], shard["codes"][first["rejected_sample"]])
    assert torch.equal(tensors["reference_keep"][row], shard["reference_keep"][first["chosen_sample"]])
    assert float(tensors["alpha_ref"][row]) == pytest.approx(smoke.params.candidates.alpha_sweep[first["chosen_sample"]])
    assert first["chosen_sample"] < s and (ws.pairs / "rewards.png").is_file()


def test_policy_and_reference_logps_are_equal_before_the_first_step(smoke):
    from pigeon.artifacts import load_pigeon, window_encoder
    from pigeon.stages.dpo import load_pairs
    from pigeon.training.dpo import disable_dropout, pair_logps, score_pairs

    ws = smoke.run_until("rank")
    model = load_pigeon(smoke.params, ws, "stage1", "cpu")
    encoder = window_encoder(smoke.params, ws, model)
    pairs = load_pairs(smoke.params, ws)["train"]
    model.train()
    disable_dropout(model)
    reference = score_pairs(model, encoder, pairs, 16, torch.device("cpu"))  # once, no gradient
    rows = np.array([3, 0, 5])
    policy = pair_logps(model, encoder, pairs, rows, torch.device("cpu"))  # a training step's forward
    assert policy[0].requires_grad
    # Equal up to float summation order (the batches differ); any real difference is orders larger.
    torch.testing.assert_close(policy[0].detach(), reference[0][rows], rtol=0, atol=1e-4)
    torch.testing.assert_close(policy[1].detach(), reference[1][rows], rtol=0, atol=1e-4)


def test_dpo_logs_trl_metrics_and_starts_from_the_reference(smoke):
    ws = smoke.run_until("dpo")
    metrics = read_json(ws.dpo / "metrics.json")
    assert metrics["initial_logp_gap"] < 1e-4
    assert metrics["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    curves = pd.read_csv(ws.dpo / "curves.csv")
    for column in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert curves[column].notna().all(), column
    assert len(curves) == metrics["steps"]
    assert (ws.dpo / "adapter_model.safetensors").is_file() and (ws.dpo / "curves.png").is_file()


def test_dpo_fits_its_training_pairs(smoke):
    """On smoke the candidates are noise (a 30-step foundation cannot draw yet, see its samples.png),
    so held-out generalisation is checked on the default profile below; here the loop must still
    raise the implicit reward of chosen over rejected on the pairs it trains on."""
    ws = smoke.run_until("dpo")
    metrics = read_json(ws.dpo / "metrics.json")
    after = metrics["train_after"]
    # The margin holds on bf16 and fp32 CPUs alike: measured 0.626-0.629 (bf16 and fp32, AMD EPYC, 2 threads).
    assert after["loss"] < math.log(2) - 0.02, after
    assert after["rewards/margins"] > 0 and after["rewards/accuracies"] > 0.5, after
    # The held-out pairs were scored after training, by a policy that moved away from the reference.
    assert metrics["val_pairs"] > 0 and abs(metrics["val_after"]["loss"] - math.log(2)) > 1e-4, metrics["val_after"]


def _default_workspace(tmp_path: Path):
    from pigeon.paths import Workspace

    ws = Workspace.at(tmp_path / "ws")
    ws.raw.parent.mkdir(parents=True)
    ws.raw.symlink_to(REPO / "data" / "raw")
    return ws


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (default profile, ~4 min on one GPU)")
@pytest.mark.skipif(not (REPO / "data" / "raw" / "items.parquet").is_file(), reason="needs data/raw (make data)")
def test_dpo_raises_held_out_pair_accuracy_on_the_default_profile(tmp_path):
    """The default profile end to end on the real dataset: DPO's policy prefers the chosen candidate of
    held-out (validation) pairs more often than chance and than the stage-1 model."""
    from pigeon.config import load_params
    from pigeon.runtime import seed_everything
    from pigeon.stages import run_stage

    params = load_params(REPO / "params.yaml", "default", ["device=cuda", "tracking.enabled=false"])
    ws = _default_workspace(tmp_path)
    for name in ("simulate", "foundation", "stage1", "candidates", "rank", "dpo"):
        seed_everything(params.seed)
        run_stage(name, params, ws)
    metrics = read_json(ws.dpo / "metrics.json")
    assert metrics["val_pairs"] >= 40
    assert metrics["val_pair_accuracy_dpo"] > 0.5
    assert metrics["val_pair_accuracy_dpo"] >= metrics["val_pair_accuracy_stage1"]
    assert metrics["val_after"]["rewards/accuracies"] > 0.5


def _stage1_cli(ws_root: Path, params_file: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pigeon.cli", "stage", "stage1", "--workspace", str(ws_root),
                             "--params", str(params_file)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_stage1_killed_mid_run_resumes_to_the_same_weights(smoke, tmp_path):
    """SIGKILL after the first checkpoint, re-run, compare with an uninterrupted run (CPU, one thread)."""
    smoke.run_until("foundation")
    params = smoke.params.model_copy(update={
        "profile": "default", "threads": 1, "device": "cpu",
        "stage1": smoke.params.stage1.model_copy(update={"max_steps": 20, "eval_every": 5, "checkpoint_every": 5}),
        "tracking": smoke.params.tracking.model_copy(update={"enabled": False})})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(dump_params(params))
    roots = {}
    for name in ("whole", "killed"):
        roots[name] = smoke.copy(tmp_path / name).root
        shutil.rmtree(roots[name] / "models" / "stage1", ignore_errors=True)
        shutil.rmtree(roots[name] / ".pigeon" / "checkpoints", ignore_errors=True)

    whole = _stage1_cli(roots["whole"], params_file)  # runs alongside the killed one (one thread each)
    killed = _stage1_cli(roots["killed"], params_file)
    checkpoint = roots["killed"] / ".pigeon" / "checkpoints" / "stage1" / "latest" / "state.json"
    deadline = time.monotonic() + 120
    while not checkpoint.is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, killed.stderr.read()
    assert not (roots["killed"] / "models" / "stage1").exists()  # it died mid-run

    resumed = _stage1_cli(roots["killed"], params_file)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    resumed_metrics = read_json(roots["killed"] / "models" / "stage1" / "metrics.json")
    assert resumed_metrics["resumed_from_step"] >= params.stage1.checkpoint_every
    assert read_json(roots["whole"] / "models" / "stage1" / "metrics.json")["resumed_from_step"] is None
    for name in ("adapter_model.safetensors", "mask_generator.safetensors", "adapter.safetensors"):
        a = load_tensors(roots["whole"] / "models" / "stage1" / name)
        b = load_tensors(roots["killed"] / "models" / "stage1" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_stage2_references_are_another_style_and_another_emoji(smoke):
    from pigeon.data.raw import read_items
    from pigeon.data.users import read_windows
    from pigeon.training.candidates import REFERENCE_COL, with_stage2_reference

    ws = smoke.run_until("simulate")
    items = read_items(ws.raw)
    windows = read_windows(ws, "train", smoke.params.model.history_len).head(200)
    picked = with_stage2_reference(windows, items, "cross_style", seed=0)
    ref, target = items.loc[picked[REFERENCE_COL]], items.loc[picked["target_item"]]
    assert (ref["style"].to_numpy() != target["style"].to_numpy()).all()
    assert (ref["emoji_key"].to_numpy() != target["emoji_key"].to_numpy()).all()
    # a pure function of (seed, window): the candidates, rank and dpo stages draw the same references
    again = with_stage2_reference(windows.iloc[::-1], items, "cross_style", seed=0).iloc[::-1]
    assert (again[REFERENCE_COL].to_numpy() == picked[REFERENCE_COL].to_numpy()).all()
    assert (with_stage2_reference(windows, items, "cross_style", seed=1)[REFERENCE_COL].to_numpy()
            != picked[REFERENCE_COL].to_numpy()).any()
    same = with_stage2_reference(windows, items, "target", seed=0)
    assert (same[REFERENCE_COL] == same["target_item"]).all()
