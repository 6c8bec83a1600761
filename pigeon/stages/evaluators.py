"""Stage ``evaluators``: train the evaluation CNN on real images of every style (docs/design.md §5).

Reads ``data/raw`` and the foundation tokenizer (``models/foundation``: a share of the training
images are its reconstructions of real images, see :func:`train_evaluator`); writes ``models/evaluators/`` (``model.safetensors``, ``config.json``,
``metrics.json``, ``curves.csv``, replaced atomically) and ``reports/evaluators.json`` with the
held-out accuracies: style on held-out emoji, content on a held-out style, measured before those
labels join the last part of training (``evaluators.release_holdout_at``).
"""

from __future__ import annotations

import time

import pandas as pd

from pigeon.artifacts import load_backbone
from pigeon.config import Params
from pigeon.data.raw import load_images, read_items
from pigeon.evaluation.evaluators import check_pretrained_paths, save_evaluator
from pigeon.evaluation.methods import tokenizer_round_trip
from pigeon.io import atomic_dir, atomic_write_text, write_json
from pigeon.paths import Workspace
from pigeon.runtime import autocast, resolve_device
from pigeon.training.evaluators import train_evaluator

SUMMARY_KEYS = ("style_accuracy", "content_accuracy", "content_top5_accuracy", "style_accuracy_reconstructed",
                "content_accuracy_reconstructed", "style_accuracy_chance",
                "content_accuracy_chance",
                "holdout_style", "measured_at_step", "train_style_accuracy", "train_content_accuracy",
                "final_style_accuracy_all_images", "final_content_accuracy_all_images", "num_styles", "num_emoji")


def run(params: Params, ws: Workspace) -> dict:
    cfg = params.evaluators
    device = resolve_device(params.device)
    pretrained = check_pretrained_paths(cfg)  # fail before training on a wrong CLIP/DINO folder
    items = read_items(ws.raw)
    images = load_images(ws.raw, params.backbone.image_size, items)
    start = time.perf_counter()
    reconstructions = None
    if cfg.reconstruction_share > 0:
        backbone = load_backbone(params, ws, device).eval()
        reconstructions = tokenizer_round_trip(backbone, images)
        del backbone
    evaluator, report = train_evaluator(images, items, cfg, params.seed, device, autocast(device),
                                        reconstructions=reconstructions)
    report["train_seconds"] = round(time.perf_counter() - start, 2)
    report["pretrained_encoders"] = pretrained
    curve = pd.DataFrame(report.pop("curve"))
    summary = {k: report[k] for k in SUMMARY_KEYS}
    with atomic_dir(ws.evaluators) as tmp:
        save_evaluator(evaluator, tmp, cfg, extra={"holdout_style": report["holdout_style"],
                                                   "holdout_emoji": report["holdout_emoji"],
                                                   "seed": params.seed})
        write_json(tmp / "metrics.json", summary)
        atomic_write_text(tmp / "curves.csv", curve.to_csv(index=False))
    write_json(ws.reports / "evaluators.json", report)
    return {"stage": "evaluators", **summary, "train_seconds": report["train_seconds"]}
