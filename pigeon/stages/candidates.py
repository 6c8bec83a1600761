"""Stage ``candidates``: one candidate per α_r of the sweep for a seeded subset of windows.

Reads ``models/stage1``, ``data/raw`` and ``data/users``; writes ``artifacts/candidates/``
(``shard-XXXXX.safetensors`` + ``.json`` + ``images/``, then ``index.json``). A shard that is
already complete for the same stage-1 model and params is kept, so an interrupted run redoes only
the missing shards; :func:`generate_shard` produces one shard on its own (the Prefect flow maps
over shards).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pigeon.artifacts import inputs_fingerprint, load_pigeon, window_encoder
from pigeon.config import Params
from pigeon.data.raw import read_items
from pigeon.data.users import read_windows
from pigeon.errors import PigeonError
from pigeon.io import tree_hash, write_json
from pigeon.paths import Workspace
from pigeon.runtime import resolve_device
from pigeon.shards import ShardPlan, drop_shards_beyond
from pigeon.training.candidates import (
    decode_strips,
    generate_candidates,
    plan_candidates,
    shard_complete,
    shard_files,
    write_shard,
)


@dataclass
class CandidateRun:
    """What every shard of one run shares: the plan, its fingerprint, and the model once loaded."""

    plan: ShardPlan  # the selected windows (train subset, then val; column "split")
    fingerprint: str
    device: torch.device
    model: Any = None
    encoder: Any = None

    def load_model(self, params: Params, ws: Workspace) -> None:
        if self.model is None:
            self.model = load_pigeon(params, ws, "stage1", self.device)
            self.encoder = window_encoder(params, ws, self.model)


def open_run(params: Params, ws: Workspace) -> CandidateRun:
    """The windows and shards of this run, and the fingerprint every shard is written with."""
    train = read_windows(ws, "train", params.model.history_len)
    val = read_windows(ws, "val", params.model.history_len)
    plan = plan_candidates(train, val, params.candidates, params.seed, read_items(ws.raw))
    run_id = inputs_fingerprint(params, ws, ("candidates",), ws.users / "windows_train.parquet",
                                ws.users / "windows_val.parquet") + tree_hash(ws.stage1)
    return CandidateRun(plan, run_id, resolve_device(params.device))


def shard_count(params: Params, ws: Workspace) -> int:
    return open_run(params, ws).plan.num_shards


def shard_outputs(ws: Workspace, shard_index: int) -> list[Path]:
    """The files and folder one shard writes (the flow records their hashes)."""
    return list(shard_files(ws.candidates, shard_index))


def generate_shard(params: Params, ws: Workspace, shard_index: int, run: CandidateRun | None = None) -> dict:
    """Generate, decode and write one shard unless it is already complete; returns its timing."""
    run = run or open_run(params, ws)
    windows = run.plan.shard(shard_index)
    if shard_complete(ws.candidates, shard_index, windows, run.fingerprint):
        return {"shard": shard_index, "skipped": True, "candidates": 0, "generation_seconds": 0.0}
    run.load_model(params, ws)
    tensors, seconds = generate_candidates(run.model, run.encoder, windows, params.candidates, params.seed,
                                           shard_index, run.device)
    strips = decode_strips(run.model, tensors["codes"], len(params.candidates.alpha_sweep),
                           params.candidates.batch_size, run.device)
    meta = {"fingerprint": run.fingerprint, "alpha_sweep": list(params.candidates.alpha_sweep)}
    write_shard(ws.candidates, shard_index, windows, tensors, strips, meta)
    return {"shard": shard_index, "skipped": False, "candidates": len(tensors["codes"]),
            "generation_seconds": seconds}


def write_index(params: Params, ws: Workspace, shard_reports: list[dict], seconds: float,
                run: CandidateRun | None = None) -> dict:
    """``index.json`` once every shard is complete; drops shard files a larger earlier plan left behind."""
    run = run or open_run(params, ws)
    plan = run.plan
    missing = [i for i in range(plan.num_shards) if not shard_complete(ws.candidates, i, plan.shard(i), run.fingerprint)]
    if missing:
        raise PigeonError(f"{ws.candidates}: shard(s) {missing[:5]} missing or incomplete; run the candidates stage")
    drop_shards_beyond(plan.num_shards, ws.candidates, ws.candidates / "images")
    generated = sum(r["candidates"] for r in shard_reports)
    generation_seconds = sum(r["generation_seconds"] for r in shard_reports)
    index = {
        "fingerprint": run.fingerprint,
        "shards": [shard_files(ws.candidates, i)[0].name for i in range(plan.num_shards)],
        "windows": {split: int((plan.windows["split"] == split).sum()) for split in ("train", "val")},
        "alpha_sweep": list(params.candidates.alpha_sweep),
        "candidates": len(plan.windows) * len(params.candidates.alpha_sweep),
        "image_layout": "images/shard-XXXXX/<window_id>.png: one strip per window, candidates left to right "
                        "in alpha_sweep order, image_size wide each",
        "image_size": params.backbone.image_size,
        "generated_this_run": generated,
        "shards_skipped_this_run": sum(r["skipped"] for r in shard_reports),
        "generation_seconds": round(generation_seconds, 2),
        "candidates_per_second": round(generated / generation_seconds, 2) if generation_seconds else None,
        "seconds": round(seconds, 2),
    }
    write_json(ws.candidates / "index.json", index)
    return index


def run(params: Params, ws: Workspace) -> dict:
    start = time.perf_counter()
    run = open_run(params, ws)
    (ws.candidates / "index.json").unlink(missing_ok=True)  # absent until every shard is complete
    reports = []
    bar = tqdm(range(run.plan.num_shards), desc="candidates", unit="shard")
    for shard_index in bar:
        reports.append(generate_shard(params, ws, shard_index, run))
        done = sum(r["candidates"] for r in reports)
        spent = sum(r["generation_seconds"] for r in reports)
        bar.set_postfix(cand_per_s=f"{done / spent:.1f}" if spent else "-")
    index = write_index(params, ws, reports, time.perf_counter() - start, run)
    return {"stage": "candidates", **{k: index[k] for k in (
        "windows", "candidates", "generated_this_run", "shards_skipped_this_run", "candidates_per_second")}}
