"""Stage ``evaluate``: generate every test image with every method and score it (DESIGN.md §5).

Reads the raw items, the test and training windows, ``models/{foundation,stage1,dpo,evaluators}``;
writes (each atomically) ``reports/samples/test/`` (one PNG per generated image + ``index.csv``),
``reports/plots/*.csv``, ``reports/grid_<protocol>.png``, ``reports/results.md`` and, last,
``reports/metrics.json``: ``metrics[protocol][method][metric]`` means, ``metrics["ci95"]`` their
bootstrap intervals, ``metrics["evaluators"]`` the evaluators' held-out accuracies.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from pigeon.config import Params
from pigeon.data.raw import load_images, png_bytes, read_items
from pigeon.data.users import history_columns, read_windows
from pigeon.errors import DataError
from pigeon.evaluation.evaluators import load_evaluator, pretrained_encoders
from pigeon.evaluation.methods import (
    METHODS,
    PROTOCOLS,
    SELECT_WEIGHTS,
    MethodImages,
    RewardSelector,
    baseline_images,
    generate_images,
    keep_all_history,
    select_best,
)
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
from pigeon.io import atomic_dir, read_json, write_json
from pigeon.models.batching import WindowEncoder, cached_item_codes
from pigeon.models.loading import load_pigeon
from pigeon.paths import Workspace
from pigeon.runtime import resolve_device, seed_everything

SUBSET_STREAM = 11  # the test subset comes from (seed, 11), independent of any other draw
FRECHET_RESAMPLES = 200  # one eigenproblem per resample: capped to keep the stage short
SWEEP_METHOD = "pigeon_sweep"  # every α_r candidate behind pigeon_select
SAMPLES_DIR = ("samples", "test")
PROTOCOL_NOTES = {
    "ground_truth": "Reference = the target emoji drawn in a style other than the user's preferred one; "
                    "truth = the same emoji in the preferred style (beyond the paper).",
    "paper": "Reference = the true next item itself (the paper's protocol); truth = that item. "
             "Copying the reference is already perfect here, which is why the ground-truth protocol exists.",
}


def test_subset(windows: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """A fixed, seeded subset of the test windows, in file order."""
    rng = np.random.default_rng([seed, SUBSET_STREAM])
    pick = np.sort(rng.choice(len(windows), size=min(size, len(windows)), replace=False))
    return windows.iloc[pick].reset_index(drop=True)


def _generate(params: Params, ws: Workspace, windows: pd.DataFrame, items: pd.DataFrame,
              item_images: np.ndarray, device) -> tuple[dict, RewardSelector, dict]:
    """Every generative row for both protocols → ({(protocol, method): MethodImages}, selector, seconds)."""
    cfg, hl, size = params.evaluate, params.model.history_len, params.backbone.image_size
    outputs: dict[tuple[str, str], MethodImages] = {}
    seconds: dict[str, float] = {}
    state: dict = {}

    def run_rows(model, method: str, alpha, condition_fn=None) -> None:
        start = time.perf_counter()
        encoder = WindowEncoder(model.backbone, state["codes"], items, params.model,
                                params.backbone.lm.max_caption_tokens)
        for p_index, (protocol, cols) in enumerate(PROTOCOLS.items()):
            images = generate_images(model, encoder, windows, cols["reference"], alpha, cfg,
                                     params.seed + 1_000_003 * p_index, device, size, condition_fn,
                                     desc=f"{protocol}/{method}")
            if isinstance(alpha, (list, tuple)):
                candidates = images.reshape(len(windows), len(alpha), *images.shape[1:])
                rewards = state["selector"].rewards(candidates, windows, cols["reference"], hl)
                outputs[(protocol, method)] = select_best(candidates, tuple(alpha), rewards)
            else:
                outputs[(protocol, method)] = MethodImages(images, np.full(len(windows), float(alpha)))
        seconds[method] = round(time.perf_counter() - start, 2)

    # Zero-shot: a fresh Pigeon head, seeded as stage 1 seeds it; its mask generator is also the
    # "untrained mask generator" of the ablation below.
    seed_everything(params.seed)
    model = load_pigeon(params, ws, None, device)
    state["codes"] = cached_item_codes(params, ws, model.backbone)
    train = read_windows(ws, "train", hl)
    state["selector"] = RewardSelector(model.backbone, item_images,
                                       train[history_columns(hl) + ["target_item"]].to_numpy(np.int64).ravel())
    initial_mask = {k: v.detach().clone() for k, v in model.mask_generator.state_dict().items()}
    run_rows(model, "foundation", cfg.alpha_ref)
    del model

    model = load_pigeon(params, ws, "stage1", device)
    run_rows(model, "stage1", cfg.alpha_ref)
    del model

    model = load_pigeon(params, ws, "dpo", device)
    run_rows(model, "pigeon", cfg.alpha_ref)
    run_rows(model, "pigeon_select", list(cfg.select_sweep))
    run_rows(model, "no_history_mask", cfg.alpha_ref, keep_all_history)
    model.mask_generator.load_state_dict(initial_mask)
    run_rows(model, "untrained_mask_generator", cfg.alpha_ref)
    del model

    no_adapter = params.model_copy(update={"model": params.model.model_copy(update={"use_adapter": False})})
    model = load_pigeon(no_adapter, ws, "dpo", device)
    run_rows(model, "no_adapter", cfg.alpha_ref)
    del model
    return outputs, state["selector"], seconds


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
            row.update({m: outputs[(protocol, m)].images[w] for m in METHODS})
            rows.append(row)
        path = ws.reports / f"grid_{protocol}.png"
        write_grid(path, rows, ["history", "reference", *METHODS, "truth"],
                   f"protocol {protocol}: history | reference | methods | ground truth (simulated users)")
        written.append(path.name)
    return written


def run(params: Params, ws: Workspace) -> dict:
    cfg, hl = params.evaluate, params.model.history_len
    device = resolve_device(params.device)
    items = read_items(ws.raw)
    item_images = load_images(ws.raw, params.backbone.image_size, items)
    windows = test_subset(read_windows(ws, "test", hl), cfg.test_windows, params.seed)
    if windows.empty:
        raise DataError(f"{ws.users / 'windows_test.parquet'}: no test windows to evaluate")
    evaluator = load_evaluator(ws.evaluators, device)
    evaluator_report = read_json(ws.evaluators / "metrics.json")
    pretrained = pretrained_encoders(params.evaluators, device)
    needed = windows[history_columns(hl) + [c for p in PROTOCOLS.values() for c in p.values()]]
    scorer = WindowScorer(evaluator, item_images, items, pretrained, needed.to_numpy(np.int64).ravel())

    start = time.perf_counter()
    outputs, selector, seconds = _generate(params, ws, windows, items, item_images, device)
    for protocol, cols in PROTOCOLS.items():
        for method in ("reference_copy", "nearest_history"):
            outputs[(protocol, method)] = baseline_images(method, windows, cols["reference"], item_images, selector, hl)
    generation_seconds = round(time.perf_counter() - start, 2)

    metric_list = HEADLINE + pretrained_metrics(sorted(pretrained))
    index, values, intervals, sweep_curves, chosen = _score_all(params, windows, items, outputs, scorer, metric_list)
    _write_samples(ws, index)
    plots = ws.reports / "plots"
    for protocol in PROTOCOLS:
        table = pd.DataFrame([{"method": m, **values[protocol][m]} for m in METHODS])
        write_csv(plots / f"methods_{protocol}.csv", table)
        write_csv(plots / f"alpha_sweep_{protocol}.csv", sweep_curves[protocol])
    grids = _write_grids(ws, params, windows, items, item_images, outputs)

    metrics = {**values, "ci95": intervals, "evaluators": evaluator_report, "test_windows": len(windows),
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
             "vector. Every generated image is under `samples/test/` with `index.csv`.")]
    write_results_md(ws.reports / "results.md", metrics, metric_list, list(METHODS), PROTOCOL_NOTES, notes)
    write_json(ws.reports / "metrics.json", metrics)
    headline = {p: {k: round(values[p]["pigeon"][k], 4) for k in ("style_accuracy", "content_accuracy",
                                                                  "history_similarity", "frechet_distance")}
                for p in PROTOCOLS}
    return {"stage": "evaluate", "test_windows": len(windows), "images": len(index), "grids": grids,
            "generation_seconds": generation_seconds, **headline}
