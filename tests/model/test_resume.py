"""A stage SIGKILLed at a seeded random point resumes to exactly what an uninterrupted run writes.

Each test runs the real CLI (one thread, CPU): a subprocess killed between two checkpoints (the
k-th checkpoint to appear plus a random share of the last interval, both drawn from
``PIGEON_KILL_SEED``), re-run in a new subprocess while an uninterrupted run goes in-process beside
it; the outputs are compared bit for bit. stage1 and dpo resume are tested in tests/model/test_training.py; the
foundation's fixed kill points in tests/model/test_foundation.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pigeon.cli import main
from pigeon.io import file_md5, load_tensors, read_json
from pigeon.paths import Workspace
from tests.conftest import REPO, SMOKE_OVERRIDES, smoke_params, untrained_workspace

pytestmark = pytest.mark.slow
KILL_SEED = int(os.environ.get("PIGEON_KILL_SEED", "20261126"))
# Same thread count in every run: CPU results are bitwise reproducible only then.
OVERRIDES = (*SMOKE_OVERRIDES, "tracking.enabled=false", "threads=1", "device=cpu")
# vq 24 + lm 20 steps, a checkpoint every 4: 11 checkpoints before "done" (vq 4…20, encode, lm 0…16)
FOUNDATION = ("foundation.vq_steps=24", "foundation.lm_steps=20", "foundation.checkpoint_every=4")
CANDIDATES = ("candidates.train_windows=48",)  # 48 train + 8 val windows → 7 shards of 8


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Workspace:
    """Synthetic raw data, simulated users, and an untrained foundation + stage-1 head (candidates' inputs)."""
    torch.set_num_threads(1)
    return untrained_workspace(tmp_path_factory.mktemp("resume"), smoke_params(*OVERRIDES))


def copy(base: Workspace, dest: Path, drop: str) -> Workspace:
    shutil.copytree(base.root, dest)
    ws = Workspace.at(dest)
    shutil.rmtree(ws.root / drop, ignore_errors=True)
    return ws


def stage_args(stage: str, ws: Workspace, *extra: str) -> list[str]:
    sets = [a for o in (*OVERRIDES, *extra) for a in ("--set", o)]
    return ["stage", stage, "--workspace", str(ws.root), "--params", str(REPO / "params.yaml"), "--profile",
            "smoke", *sets]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pigeon.cli", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def kill_between_checkpoints(
    proc: subprocess.Popen, mark: Callable[[], object], k: int, share: float, log: Path
) -> tuple[object, float]:
    """SIGKILL ``proc`` ``share`` of the last interval after the k-th progress mark it writes (the last
    interval roughly predicts the next; across a phase change the kill may land a few marks later).
    Returns the k-th mark and the delay."""
    seen: list[tuple[object, float]] = []
    while proc.poll() is None:
        now = mark()
        if now is not None and (not seen or now != seen[-1][0]):
            seen.append((now, time.monotonic()))
            if len(seen) == k:
                delay = share * (seen[-1][1] - seen[-2][1])
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, f"finished before the kill (marks seen: {seen})\n{log.read_text()[-2000:]}"
    return seen[-1][0], delay


def checkpoint_state(ws: Workspace, stage: str) -> dict | None:
    folder = ws.checkpoint_dir(stage)
    for name in ("latest", ".latest.old"):  # a kill inside the swap leaves the old one (load_checkpoint's rule)
        try:
            return json.loads((folder / name / "state.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_foundation_killed_at_a_seeded_random_point_resumes_to_identical_weights(base, tmp_path):
    rng = random.Random(KILL_SEED)
    k, share = rng.randint(2, 10), rng.random()
    whole, killed = copy(base, tmp_path / "whole", "models"), copy(base, tmp_path / "killed", "models")
    log = tmp_path / "killed.log"
    victim = start(stage_args("foundation", killed, *FOUNDATION), log)

    def mark():
        state = checkpoint_state(killed, "foundation")
        return None if state is None else (state["phase"], state["step"])

    after, delay = kill_between_checkpoints(victim, mark, k, share, log)
    on_disk = mark()
    print(f"PIGEON_KILL_SEED={KILL_SEED}: killed {delay:.2f} s after checkpoint {k} {after}; resuming from {on_disk}")
    assert on_disk is not None and on_disk[0] != "done" and not killed.foundation.exists()

    resumed_run = start(stage_args("foundation", killed, *FOUNDATION), log)
    assert main(stage_args("foundation", whole, *FOUNDATION)) == 0  # the uninterrupted run
    finish(resumed_run, log)
    resumed_metrics = read_json(killed.foundation / "metrics.json")
    whole_metrics = read_json(whole.foundation / "metrics.json")
    assert resumed_metrics["resumed_from"] == list(on_disk) and whole_metrics["resumed_from"] is None
    resumed = load_tensors(killed.foundation / "weights.safetensors")
    reference = load_tensors(whole.foundation / "weights.safetensors")
    assert resumed.keys() == reference.keys()
    differing = [name for name in reference if not torch.equal(resumed[name], reference[name])]
    assert not differing, f"{len(differing)} of {len(reference)} tensors differ, e.g. {differing[:3]}"
    # The per-step losses replayed after the resume are the uninterrupted run's, to the last digit.
    assert (killed.foundation / "curves.csv").read_bytes() == (whole.foundation / "curves.csv").read_bytes()
    for key in ("tokenizer", "lm", "final_loss"):
        assert resumed_metrics[key] == whole_metrics[key], key
    assert not killed.checkpoint_dir("foundation").exists() and not leftovers(killed.root)


def shard_hashes(ws: Workspace) -> dict[str, str]:
    """Every candidates file but index.json (which records this run's timing and skip counts) and
    hidden temp files (a kill inside a shard's write leaves one; see the Operations section)."""
    root = ws.candidates
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "index.json"]
    return {
        str(p.relative_to(root)): file_md5(p)
        for p in files
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def test_candidates_killed_at_a_seeded_random_point_redo_only_the_missing_shards(base, tmp_path, capsys):
    rng = random.Random(KILL_SEED + 1)
    k, share = rng.randint(2, 5), rng.random()  # at least 2 shards still to go
    whole, killed = copy(base, tmp_path / "whole", "artifacts"), copy(base, tmp_path / "killed", "artifacts")
    log = tmp_path / "killed.log"
    victim = start(stage_args("candidates", killed, *CANDIDATES), log)

    def shard_jsons():  # a shard is complete once its JSON is written (the last of its three files)
        return len(list(killed.candidates.glob("shard-*.json"))) or None

    _, delay = kill_between_checkpoints(victim, shard_jsons, k, share, log)
    complete = len(list(killed.candidates.glob("shard-*.json")))
    kill_point = f"PIGEON_KILL_SEED={KILL_SEED}: killed {delay:.2f} s after shard {k}; {complete} complete"
    assert not (killed.candidates / "index.json").exists()  # absent until every shard is complete

    resumed_run = start(stage_args("candidates", killed, *CANDIDATES), log)
    assert main(stage_args("candidates", whole, *CANDIDATES)) == 0  # the uninterrupted run
    finish(resumed_run, log)
    index = read_json(killed.candidates / "index.json")
    assert index["shards_skipped_this_run"] == complete and len(index["shards"]) == 7
    assert index["generated_this_run"] == (7 - complete) * 8 * 3
    assert shard_hashes(killed) == shard_hashes(whole)
    assert index["fingerprint"] == read_json(whole.candidates / "index.json")["fingerprint"]

    # A finished stage re-run with unchanged inputs generates nothing and rewrites no shard.
    before = shard_hashes(killed)
    capsys.readouterr()
    assert main(stage_args("candidates", killed, *CANDIDATES)) == 0
    rerun = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rerun["generated_this_run"] == 0 and rerun["shards_skipped_this_run"] == 7
    assert shard_hashes(killed) == before
    print(kill_point)
