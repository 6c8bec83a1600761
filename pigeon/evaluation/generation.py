"""The generative rows of the evaluation, made one shard of test windows at a time (docs/design.md §5).

The test windows are cut into shards of whole generation batches (:func:`shard_size`); the batch
that starts at plan position ``i`` draws, under protocol ``p``, from ``seed + PROTOCOL_STRIDE·p + i``.
A window's codes and images therefore do not depend on the shard size, on the worker that made
its shard, or on the order the shards were made in.

A shard holds, per protocol and generative row, ``<protocol>/<method>/codes`` (int64 [W·S, T])
and ``<protocol>/<method>/images`` (uint8 [W·S, px, px, 3]), row = window·S + sample, with S the
selection sweep's length for ``pigeon_select`` and 1 otherwise. Selection, baselines and scores
are made later, from all shards together.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from pigeon.artifacts import cached_item_codes, load_pigeon
from pigeon.config import EvaluateConfig, Params
from pigeon.data.raw import read_items
from pigeon.errors import PigeonError
from pigeon.evaluation.methods import (
    BASELINES,
    GENERATIVE,
    PROTOCOLS,
    MethodImages,
    RewardSelector,
    baseline_images,
    generate_images,
    generation_unit,
    keep_all_history,
    select_best,
)
from pigeon.models.batching import WindowEncoder
from pigeon.paths import Workspace
from pigeon.runtime import seed_everything
from pigeon.shards import ShardPlan, read_tensor_shard, tensor_shard_complete

PROTOCOL_STRIDE = 1_000_003  # protocols draw from seed ranges that never meet
SELECT_METHOD = "pigeon_select"


def shard_size(cfg: EvaluateConfig) -> int:
    """``cfg.shard_size`` rounded up to whole generation batches: a batch never straddles two shards."""
    unit = generation_unit(cfg)
    return -(-cfg.shard_size // unit) * unit


def samples_per_window(cfg: EvaluateConfig, method: str) -> int:
    return len(cfg.select_sweep) if method == SELECT_METHOD else 1


def generate_rows(params: Params, ws: Workspace, windows: pd.DataFrame, first_position: int,
                  device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every generative row of ``windows`` (plan positions from ``first_position``), both protocols
    → (shard tensors, generation seconds per method)."""
    cfg, size = params.evaluate, params.backbone.image_size
    items = read_items(ws.raw)
    tensors: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    state: dict = {}

    def run_rows(model, method: str, alpha, condition_fn=None, row_cfg=None) -> None:
        start = time.perf_counter()
        encoder = WindowEncoder(model.backbone, state["codes"], items, params.model,
                                params.backbone.lm.max_caption_tokens)
        for p_index, (protocol, cols) in enumerate(PROTOCOLS.items()):
            seed = params.seed + PROTOCOL_STRIDE * p_index + first_position
            images, codes = generate_images(model, encoder, windows, cols["reference"], alpha, row_cfg or cfg, seed,
                                            device, size, condition_fn, desc=f"{protocol}/{method}")
            tensors[f"{protocol}/{method}/codes"] = codes
            tensors[f"{protocol}/{method}/images"] = torch.from_numpy(images)
        seconds[method] = round(time.perf_counter() - start, 2)

    # Zero-shot: a fresh Pigeon head, seeded as stage 1 seeds it; its mask generator is also the
    # "untrained mask generator" of the ablation below.
    seed_everything(params.seed)
    model = load_pigeon(params, ws, None, device)
    state["codes"] = cached_item_codes(params, ws, model.backbone)  # the backbone every model shares
    initial_mask = {k: v.detach().clone() for k, v in model.mask_generator.state_dict().items()}
    run_rows(model, "foundation", cfg.alpha_ref)
    del model

    model = load_pigeon(params, ws, "stage1", device)
    run_rows(model, "stage1", cfg.alpha_ref)
    del model

    model = load_pigeon(params, ws, "dpo", device)
    run_rows(model, "pigeon", cfg.alpha_ref)
    run_rows(model, SELECT_METHOD, list(cfg.select_sweep))
    run_rows(model, "no_history_mask", cfg.alpha_ref, keep_all_history)
    run_rows(model, "no_style_transfer", cfg.alpha_ref, row_cfg=cfg.model_copy(update={"style_strength": 0.0}))
    model.mask_generator.load_state_dict(initial_mask)
    run_rows(model, "untrained_mask_generator", cfg.alpha_ref)
    del model

    no_adapter = params.model_copy(update={"model": params.model.model_copy(update={"use_adapter": False})})
    model = load_pigeon(no_adapter, ws, "dpo", device)
    run_rows(model, "no_adapter", cfg.alpha_ref)
    del model
    return tensors, seconds


def missing_shards(folder, plan: ShardPlan, run_fingerprint: str) -> list[int]:
    return [i for i in range(plan.num_shards)
            if not tensor_shard_complete(folder, i, window_ids(plan.shard(i)), run_fingerprint)]


def window_ids(windows: pd.DataFrame) -> list[str]:
    return windows["window_id"].astype(str).tolist()


def read_rows(folder, plan: ShardPlan, cfg: EvaluateConfig) -> tuple[dict[tuple[str, str], np.ndarray], dict]:
    """Every shard's images in plan order → ({(protocol, method): uint8 [W·S, px, px, 3]}, the
    generation seconds per method summed over the shards)."""
    parts: dict[tuple[str, str], list[np.ndarray]] = {(p, m): [] for p in PROTOCOLS for m in GENERATIVE}
    seconds: dict[str, float] = {m: 0.0 for m in GENERATIVE}
    for index in range(plan.num_shards):
        meta, tensors = read_tensor_shard(folder, index)
        for (protocol, method), chunks in parts.items():
            images = tensors[f"{protocol}/{method}/images"].numpy()
            expected = len(plan.shard(index)) * samples_per_window(cfg, method)
            if len(images) != expected:
                raise PigeonError(f"{folder}: shard {index} has {len(images)} {protocol}/{method} images, "
                                  f"expected {expected}; delete it and run the evaluate stage")
            chunks.append(images)
        for method, spent in meta.get("seconds", {}).items():
            seconds[method] = round(seconds.get(method, 0.0) + spent, 2)
    return {key: np.concatenate(chunks) for key, chunks in parts.items()}, seconds


def method_images(generated: dict[tuple[str, str], np.ndarray], windows: pd.DataFrame, cfg: EvaluateConfig,
                  selector: RewardSelector, item_images: np.ndarray,
                  history_len: int) -> dict[tuple[str, str], MethodImages]:
    """Every row of the table: the generated images, ``pigeon_select``'s pick of its sweep, the baselines."""
    outputs: dict[tuple[str, str], MethodImages] = {}
    for protocol, cols in PROTOCOLS.items():
        for method in GENERATIVE:
            images = generated[(protocol, method)]
            if method == SELECT_METHOD:
                candidates = images.reshape(len(windows), len(cfg.select_sweep), *images.shape[1:])
                rewards = selector.rewards(candidates, windows, cols["reference"], history_len)
                outputs[(protocol, method)] = select_best(candidates, tuple(cfg.select_sweep), rewards)
            else:
                alpha_ref = np.full(len(windows), float(cfg.alpha_ref))
                outputs[(protocol, method)] = MethodImages(images, alpha_ref)
        for method in BASELINES:
            outputs[(protocol, method)] = baseline_images(method, windows, cols["reference"], item_images,
                                                          selector, history_len, cols["truth"])
    return outputs
