"""Stage ``evaluate``: generate every test image with every method and score it (docs/design.md §5).

Reads the raw items, the test and training windows, ``models/{foundation,stage1,dpo,evaluators}``.
Generation is sharded: ``artifacts/evaluate/shard-XXXXX.{safetensors,json}`` hold each shard's
generated codes and images (:mod:`pigeon.evaluation.generation`). A shard already complete for the
same inputs is kept, so an interrupted run redoes only the missing shards; :func:`generate_shard`
makes one shard on its own (the Prefect flow maps over shards). From all shards it then writes
(each atomically) ``reports/samples/test/`` (one PNG per generated image + ``index.csv``),
``reports/plots/*.csv``, ``reports/grid_<protocol>.png``, ``reports/results.md`` and, last,
``reports/metrics.json``: ``metrics[protocol][method][metric]`` means, ``metrics["ci95"]`` their
bootstrap intervals, ``metrics["evaluators"]`` the evaluators' held-out accuracies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pigeon.artifacts import fingerprint, inputs_fingerprint, load_backbone
from pigeon.config import Params
from pigeon.data.raw import load_images, png_bytes, read_items
from pigeon.data.users import history_columns, read_windows
from pigeon.errors import DataError, PigeonError
from pigeon.evaluation.evaluators import load_evaluator, pretrained_encoders
from pigeon.evaluation.generation import (
    generate_rows,
    method_images,
    missing_shards,
    read_rows,
    shard_size,
    window_ids,
)
from pigeon.evaluation.methods import METHODS, PROTOCOLS, SELECT_WEIGHTS, RewardSelector
from pigeon.evaluation.metrics import WindowScorer, frechet_with_ci
from pigeon.evaluation.report import (
    HEADLINE,
    pretrained_metrics,
    safe_name,
    summarize,
    write_csv,
    write_grid,
    write_results_md,
)
from pigeon.io import atomic_dir, read_json, tree_hash, write_json
from pigeon.paths import Workspace
from pigeon.runtime import resolve_device
from pigeon.seeds import numpy_rng, subset_rows
from pigeon.shards import (
    ShardPlan,
    drop_shards_beyond,
    tensor_shard_complete,
    tensor_shard_files,
    write_tensor_shard,
)

FRECHET_RESAMPLES = 200  # one eigenproblem per resample: capped to keep the stage short
SWEEP_METHOD = "pigeon_sweep"  # every α_r candidate behind pigeon_select
GENERATION_KEYS = ("alpha_ref", "select_sweep", "batch_size", "sampling", "style_strength")  # the evaluate keys images depend on
SAMPLES_DIR = ("samples", "test")
PROTOCOL_NOTES = {
    "ground_truth": "Reference = the target emoji drawn in a style other than the user's preferred one; "
                    "truth = the same emoji in the preferred style (beyond the paper).",
    "paper": "Reference = the true next item itself (the paper's protocol); truth = that item. "
             "Copying the reference is already perfect here, which is why the ground-truth protocol exists.",
}


def test_subset(windows: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """A fixed, seeded subset of the test windows, in file order."""
    rng = numpy_rng(seed, "evaluate-test-windows")
    pick = subset_rows(rng, len(windows), size)
    return windows.iloc[pick].reset_index(drop=True)


@dataclass
class EvaluationRun:
    """What every shard of one run shares: the test windows, their shards and the inputs' fingerprint."""

    plan: ShardPlan
    fingerprint: str
    device: torch.device


def shard_folder(ws: Workspace) -> Path:
    return ws.root / "artifacts" / "evaluate"


def generation_fingerprint(params: Params, ws: Workspace) -> str:
    """What a shard's images depend on: the seed, the model and generation params, the models' weights
    and the data (the shard's window ids are checked on their own)."""
    generation = {k: v for k, v in params.evaluate.model_dump(mode="json").items() if k in GENERATION_KEYS}
    return fingerprint(
        inputs_fingerprint(params, ws, (), ws.users / "windows_test.parquet", ws.raw / "items.parquet"),
        generation, params.stage1.lora.model_dump(mode="json"),  # the zero-shot head's LoRA
        tree_hash(ws.stage1), tree_hash(ws.dpo),
        tree_hash(ws.raw / "images" / str(params.backbone.image_size)),
    )


def open_run(params: Params, ws: Workspace) -> EvaluationRun:
    windows = test_subset(read_windows(ws, "test", params.model.history_len), params.evaluate.test_windows,
                          params.seed)
    if windows.empty:
        raise DataError(f"{ws.users / 'windows_test.parquet'}: no test windows to evaluate")
    return EvaluationRun(ShardPlan(windows, shard_size(params.evaluate)), generation_fingerprint(params, ws),
                         resolve_device(params.device))


def shard_count(params: Params, ws: Workspace) -> int:
    return open_run(params, ws).plan.num_shards


def shard_outputs(ws: Workspace, shard_index: int) -> list[Path]:
    """The files one shard writes (the flow records their hashes)."""
    return list(tensor_shard_files(shard_folder(ws), shard_index))


def generate_shard(params: Params, ws: Workspace, shard_index: int, run: EvaluationRun | None = None) -> dict:
    """Generate and write one shard unless it is already complete; returns its timing."""
    run = run or open_run(params, ws)
    windows, folder = run.plan.shard(shard_index), shard_folder(ws)
    if tensor_shard_complete(folder, shard_index, window_ids(windows), run.fingerprint):
        return {"shard": shard_index, "skipped": True, "images": 0, "generation_seconds": 0.0}
    tensors, seconds = generate_rows(params, ws, windows, run.plan.start(shard_index), run.device)
    write_tensor_shard(folder, shard_index, window_ids(windows), tensors,
                       {"fingerprint": run.fingerprint, "seconds": seconds,
                        "select_sweep": list(params.evaluate.select_sweep)})
    return {"shard": shard_index, "skipped": False,
            "images": sum(len(v) for k, v in tensors.items() if k.endswith("/images")),
            "generation_seconds": round(sum(seconds.values()), 2)}


def _method_images(params: Params, ws: Workspace, evaluation: EvaluationRun, item_images: np.ndarray,
                   device) -> tuple[dict, dict]:
    """Every method's images from the complete shards → ({(protocol, method): MethodImages}, seconds)."""
    hl, plan, folder = params.model.history_len, evaluation.plan, shard_folder(ws)
    missing = missing_shards(folder, plan, evaluation.fingerprint)
    if missing:
        raise PigeonError(f"{folder}: shard(s) {missing[:5]} missing or incomplete; run the evaluate stage")
    drop_shards_beyond(plan.num_shards, folder)
    generated, seconds = read_rows(folder, plan, params.evaluate)
    train = read_windows(ws, "train", hl)
    selector = RewardSelector(load_backbone(params, ws, device), item_images,
                              train[history_columns(hl) + ["target_item"]].to_numpy(np.int64).ravel(),
                              split=params.rank.features == "split")
    return method_images(generated, plan.windows, params.evaluate, selector, item_images, hl), seconds


def _window_rows(windows: pd.DataFrame, items: pd.DataFrame, protocol: str) -> pd.DataFrame:
    cols = PROTOCOLS[protocol]
    reference = windows[cols["reference"]].to_numpy(np.int64)
    return pd.DataFrame({
        "window_id": windows["window_id"].astype(str), "user_id": windows["user_id"], "protocol": protocol,
        "preferred_style": windows["preferred_style"], "reference_item": reference,
        "reference_style": items["style"].to_numpy()[reference], "target_item": windows["target_item"],
        "target_emoji": windows["target_emoji"], "gt_item": windows["gt_item"],
        "truth_item": windows[cols["truth"]],
    })


def emoji_split(params: Params, windows: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """bool [W]: the window's emoji is one the foundation held out of its training (docs/design.md §5)."""
    from pigeon.training.foundation import split_holdout

    _, held_ids = split_holdout(items, params.foundation.holdout_fraction, params.seed)
    held = set(items.loc[held_ids, "emoji_key"])
    return windows["target_emoji"].isin(held).to_numpy()


def split_scores(index: pd.DataFrame, held_out: np.ndarray, windows: pd.DataFrame) -> dict:
    """{protocol: {method: {seen|held_out: {style_accuracy, content_accuracy}}}} from the index rows."""
    flag = dict(zip(windows["window_id"].astype(str), held_out))
    rows = index[index["method"].isin(METHODS)].assign(held=lambda f: f["window_id"].map(flag))
    out: dict = {}
    for (protocol, method), group in rows.groupby(["protocol", "method"]):
        parts = {}
        for part, mask in (("seen", ~group["held"].astype(bool)), ("held_out", group["held"].astype(bool))):
            sub = group[mask]
            parts[part] = {"style_accuracy": float(sub["style_correct"].mean()) if len(sub) else float("nan"),
                           "content_accuracy": float(sub["content_correct"].mean()) if len(sub) else float("nan")}
        out.setdefault(protocol, {})[method] = parts
    return out


def _score_all(params, windows, items, outputs, scorer, metric_list):
    """→ (index rows, values, intervals, sweep plot rows, chosen-α counts)."""
    cfg, seed, hl = params.evaluate, params.seed, params.model.history_len
    index, values, intervals, sweep_rows, chosen = [], {}, {}, {}, {}
    for protocol, cols in PROTOCOLS.items():
        base = _window_rows(windows, items, protocol)
        reference = scorer.frechet_reference(windows["preferred_style"])
        values[protocol], intervals[protocol] = {}, {}
        for method in METHODS:
            out = outputs[(protocol, method)]
            scores, feats = scorer.score(out.images, windows, cols["reference"], cols["truth"], history_columns(hl))
            fd = frechet_with_ci(reference, feats, min(cfg.bootstrap, FRECHET_RESAMPLES), seed)
            values[protocol][method], intervals[protocol][method] = summarize(
                scores, metric_list, cfg.bootstrap, seed, fd)
            rows = base.assign(method=method, alpha_ref=out.alpha_ref, images=list(out.images), **scores)
            if out.sweep:
                rows["reward"] = out.sweep["reward"][np.arange(len(windows)), out.sweep["chosen"]]
                sweep_rows[protocol], extra = _score_sweep(base, out.sweep, scorer, windows, cols, hl)
                chosen[protocol] = {f"{a:g}": int((out.sweep["chosen"] == i).sum())
                                    for i, a in enumerate(out.sweep["alpha"])}
                index.append(extra)
            index.append(rows)
    return pd.concat(index, ignore_index=True), values, intervals, sweep_rows, chosen


def _score_sweep(base, sweep, scorer, windows, cols, hl):
    """Score every α_r candidate: the trade-off curve of α_r (plot) and their index rows."""
    curve, rows = [], []
    for i, alpha in enumerate(sweep["alpha"]):
        images = sweep["images"][:, i]
        scores, _ = scorer.score(images, windows, cols["reference"], cols["truth"], history_columns(hl))
        curve.append({"alpha_ref": float(alpha), **{k: float(np.mean(v)) for k, v in scores.items()
                                                    if np.asarray(v).dtype.kind == "f"},
                      "mean_reward": float(sweep["reward"][:, i].mean()),
                      "chosen_windows": int((sweep["chosen"] == i).sum())})
        rows.append(base.assign(method=SWEEP_METHOD, alpha_ref=float(alpha), images=list(images),
                                reward=sweep["reward"][:, i], selected=sweep["chosen"] == i, **scores))
    return pd.DataFrame(curve), pd.concat(rows, ignore_index=True)


def _write_samples(ws: Workspace, index: pd.DataFrame) -> pd.DataFrame:
    folder = ws.reports.joinpath(*SAMPLES_DIR)
    paths = []
    with atomic_dir(folder) as tmp:
        for row in index.itertuples():
            name = safe_name(row.window_id)
            if row.method == SWEEP_METHOD:
                name += f"_a{row.alpha_ref:g}"
            rel = f"{row.protocol}/{row.method}/{name}.png"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(png_bytes(row.images))
            paths.append(rel)
        table = index.drop(columns=["images"]).assign(path=paths)
        table.to_csv(tmp / "index.csv", index=False)
    return table


def _write_grids(ws, params, windows, items, item_images, outputs) -> list[str]:
    hl, written = params.model.history_len, []
    first = windows.drop_duplicates("user_id").head(params.evaluate.grid_users).index.to_numpy()
    for protocol, cols in PROTOCOLS.items():
        rows = []
        for w in first:
            win = windows.loc[w]
            row = {"label": f"{win['user_id']}\n{win['preferred_style']}",
                   "history": [item_images[int(win[c])] for c in history_columns(hl)],
                   "reference": item_images[int(win[cols['reference']])],
                   "truth": item_images[int(win[cols['truth']])]}
            row.update({m: outputs[(protocol, m)].images[w] for m in METHODS if m != "truth"})
            rows.append(row)
        path = ws.reports / f"grid_{protocol}.png"
        write_grid(path, rows, ["history", "reference", *[m for m in METHODS if m != "truth"], "truth"],
                   f"protocol {protocol}: history | reference | methods | ground truth (simulated users)")
        written.append(path.name)
    return written


def run(params: Params, ws: Workspace) -> dict:
    cfg, hl = params.evaluate, params.model.history_len
    evaluation = open_run(params, ws)
    start = time.perf_counter()
    reports = [generate_shard(params, ws, i, evaluation)
               for i in tqdm(range(evaluation.plan.num_shards), desc="evaluate", unit="shard")]
    generation_seconds = round(time.perf_counter() - start, 2)

    device, windows = evaluation.device, evaluation.plan.windows
    items = read_items(ws.raw)
    item_images = load_images(ws.raw, params.backbone.image_size, items)
    evaluator = load_evaluator(ws.evaluators, device)
    evaluator_report = read_json(ws.evaluators / "metrics.json")
    pretrained = pretrained_encoders(params.evaluators, device)
    needed = windows[history_columns(hl) + [c for p in PROTOCOLS.values() for c in p.values()]]
    scorer = WindowScorer(evaluator, item_images, items, pretrained, needed.to_numpy(np.int64).ravel())
    outputs, seconds = _method_images(params, ws, evaluation, item_images, device)

    metric_list = HEADLINE + pretrained_metrics(sorted(pretrained))
    index, values, intervals, sweep_curves, chosen = _score_all(params, windows, items, outputs, scorer, metric_list)
    _write_samples(ws, index)
    plots = ws.reports / "plots"
    for protocol in PROTOCOLS:
        table = pd.DataFrame([{"method": m, **values[protocol][m]} for m in METHODS])
        write_csv(plots / f"methods_{protocol}.csv", table)
        write_csv(plots / f"alpha_sweep_{protocol}.csv", sweep_curves[protocol])
    grids = _write_grids(ws, params, windows, items, item_images, outputs)

    held_out = emoji_split(params, windows, items)
    by_emoji = {**split_scores(index, held_out, windows),
                "windows": {"seen": int((~held_out).sum()), "held_out": int(held_out.sum())}}
    chance = {"style_accuracy": 1.0 / len(evaluator.styles), "content_accuracy": 1.0 / len(evaluator.emoji_keys),
              "content_top5_accuracy": min(1.0, 5.0 / len(evaluator.emoji_keys))}
    metrics = {**values, "ci95": intervals, "chance": chance, "by_emoji": by_emoji,
               "evaluators": evaluator_report, "test_windows": len(windows),
               "bootstrap": cfg.bootstrap, "frechet_bootstrap": min(cfg.bootstrap, FRECHET_RESAMPLES),
               "alpha_ref": cfg.alpha_ref, "histories": "simulated",
               "pigeon_select": {"alpha_sweep": list(cfg.select_sweep), "weights": SELECT_WEIGHTS,
                                 "selected_by": "reward encoder (backbone.image_features), not the evaluators",
                                 "chosen_alpha_counts": chosen},
               "pretrained_encoders": sorted(pretrained), "generation_seconds": seconds}
    notes = [(f"`pigeon` uses α_r = {cfg.alpha_ref:g}. `pigeon_select` picks α_r per window from "
             f"{list(cfg.select_sweep)} by the reward encoder (tokenizer-encoder features, weights "
             f"{SELECT_WEIGHTS['w_history']:g} history / {SELECT_WEIGHTS['w_reference']:g} reference), never by "
             "the evaluators; the paper selected with its evaluation model, which flatters its numbers."),
             ("`foundation` = a fresh Pigeon head (untrained LoRA, adapter, mask generator) zero-shot; "
             "`untrained_mask_generator` = the DPO model with the mask generator's seeded initial weights (the "
             "authors' released code never trains it); `no_history_mask` = α_h = 0; `no_adapter` = no `<emb>` "
             f"vector; `no_style_transfer` = plain decoding (style strength {cfg.style_strength:g} in the other "
             "generative rows). Every generated image is under `samples/test/` with `index.csv`.")]
    write_results_md(ws.reports / "results.md", metrics, metric_list, list(METHODS), PROTOCOL_NOTES, notes)
    write_json(ws.reports / "metrics.json", metrics)
    headline = {p: {k: round(values[p]["pigeon"][k], 4) for k in ("style_accuracy", "content_accuracy",
                                                                  "history_similarity", "frechet_distance")}
                for p in PROTOCOLS}
    return {"stage": "evaluate", "test_windows": len(windows), "images": len(index), "grids": grids,
            "shards": evaluation.plan.num_shards, "shards_skipped_this_run": sum(r["skipped"] for r in reports),
            "generation_seconds": generation_seconds, **headline}
