"""What the evaluation writes: headline numbers with intervals, the results table, plots' data,
the sample index and the image grids. Every file is written atomically."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pigeon.evaluation.metrics import bootstrap_ci
from pigeon.io import atomic_write_bytes, atomic_write_text


@dataclass(frozen=True)
class Metric:
    key: str  # name in metrics.json
    column: str  # per-window score column it averages ("" = set-level)
    label: str  # column header of results.md
    higher_is_better: bool
    group: str


HEADLINE = (
    Metric("style_accuracy", "style_correct", "style acc", True, "personalization"),
    Metric("history_similarity", "history_similarity", "hist sim", True, "personalization"),
    Metric("history_ssim", "history_ssim", "hist SSIM", True, "personalization"),
    Metric("content_accuracy", "content_correct", "content acc", True, "semantics"),
    Metric("content_top5_accuracy", "content_top5_correct", "content top-5", True, "semantics"),
    Metric("reference_similarity", "reference_similarity", "ref sim", True, "semantics"),
    Metric("gt_similarity", "gt_similarity", "truth sim", True, "semantics"),
    Metric("frechet_distance", "", "FD", False, "fidelity"),
    Metric("gt_ssim", "gt_ssim", "truth SSIM", True, "fidelity"),
    Metric("gt_psnr", "gt_psnr", "truth PSNR", True, "fidelity"),
)


def pretrained_metrics(names) -> tuple[Metric, ...]:
    """The similarity metrics recomputed with each configured local CLIP/DINO encoder."""
    out = []
    for name in names:
        for part, group in (("history", "personalization"), ("reference", "semantics"), ("gt", "semantics")):
            key = f"{name}_{part}_similarity"
            out.append(Metric(key, key, f"{name.upper()} {'truth' if part == 'gt' else part[:4]} sim", True, group))
    return tuple(out)


def summarize(scores: dict[str, np.ndarray], metrics: tuple[Metric, ...], resamples: int, seed: int,
              frechet: tuple[float, float, float] | None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Per-window scores of one method → ({metric: mean}, {metric: [low, high]}) with seeded bootstraps."""
    values, intervals = {}, {}
    for metric in metrics:
        if metric.column:
            point, low, high = bootstrap_ci(scores[metric.column], resamples, seed)
        elif frechet is not None:
            point, low, high = frechet
        else:
            continue
        values[metric.key] = point
        intervals[metric.key] = [low, high]
    return values, intervals


def _fmt(value: float, key: str) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if key.endswith("psnr") or key == "frechet_distance":
        return f"{value:.2f}"
    if key == "chance":
        return f"{value:.4f}" if value < 0.01 else f"{value:.3f}"
    return f"{value:.3f}"


def results_table(values: dict[str, dict[str, float]], intervals: dict[str, dict[str, list[float]]],
                  metrics: tuple[Metric, ...], methods: list[str], chance: dict[str, float] | None = None) -> str:
    """Markdown table, one row per method, the best value of each column in bold, and last a *chance*
    row with the chance level of the accuracies (``chance``)."""
    shown = [m for m in metrics if any(m.key in values.get(method, {}) for method in methods)]
    best = {}
    for m in shown:
        column = [values[method].get(m.key, float("nan")) for method in methods]
        finite = [v for v in column if math.isfinite(v)]
        if finite:
            best[m.key] = max(finite) if m.higher_is_better else min(finite)
    header = "| method | " + " | ".join(f"{m.label} {'↑' if m.higher_is_better else '↓'}" for m in shown) + " |"
    lines = [header, "|---" * (len(shown) + 1) + "|"]
    for method in methods:
        cells = []
        for m in shown:
            value = values[method].get(m.key, float("nan"))
            low, high = intervals[method].get(m.key, [float("nan")] * 2)
            text = _fmt(value, m.key)
            if m.key in best and math.isfinite(value) and math.isclose(value, best[m.key], rel_tol=1e-9, abs_tol=1e-12):
                text = f"**{text}**"
            if math.isfinite(low):
                text += f" [{_fmt(low, m.key)}, {_fmt(high, m.key)}]"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if chance:
        cells = [_fmt(chance[m.key], "chance") if m.key in chance else "" for m in shown]
        lines.append("| *chance* | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_table(split: dict[str, dict[str, dict[str, float]]], methods: list[str]) -> str:
    """Style and content accuracy of each method on windows whose emoji the foundation saw in training
    and on the held-out emoji (``split[method][part]`` with part ``seen`` / ``held_out``)."""
    lines = ["| method | style acc, seen emoji | content acc, seen emoji | style acc, held-out emoji | "
             "content acc, held-out emoji |", "|---|---|---|---|---|"]
    for method in methods:
        cells = [_fmt(split[method][part][key], key) for part in ("seen", "held_out")
                 for key in ("style_accuracy", "content_accuracy")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results_md(path, metrics_json: dict, metrics: tuple[Metric, ...], methods: list[str],
                     protocol_notes: dict[str, str], notes: list[str]) -> None:
    ev = metrics_json["evaluators"]
    parts = [
        "# Pigeon: evaluation results",
        "",
        ("**User histories are simulated** (seeded preferred style, preferred emoji groups and a history "
        "noise rate; no public log of users interacting with multi-style images exists). Images are real "
        "emoji artwork."),
        "",
        (f"{metrics_json['test_windows']} seeded test windows per protocol; mean per window with a "
        f"percentile bootstrap 95% interval ({metrics_json['bootstrap']} resamples) in brackets; best per "
        "column in bold."),
        "",
        (f"Evaluators (a CNN trained here on real images only, never on generated ones, never the reward "
        f"encoder): style accuracy {ev['style_accuracy']:.3f} on held-out emoji, content accuracy "
        f"{ev['content_accuracy']:.3f} (top-5 {ev.get('content_top5_accuracy', float('nan')):.3f}) on the held-out "
        f"style `{ev['holdout_style']}` "
        f"(chance {ev['style_accuracy_chance']:.3f} / {ev['content_accuracy_chance']:.4f}), measured at step "
        f"{ev.get('measured_at_step', '?')}, after which the held-out labels joined training."),
        "",
        *[f"- {note}" for note in notes],
    ]
    for protocol, note in protocol_notes.items():
        parts += ["", f"## Protocol `{protocol}`", "", note, "",
                  results_table(metrics_json[protocol], metrics_json["ci95"][protocol], metrics, methods,
                                metrics_json.get("chance"))]
        if "by_emoji" in metrics_json:
            windows = metrics_json["by_emoji"]["windows"]
            parts += ["", (f"By emoji: {windows['seen']} windows whose emoji the foundation saw in training (in "
                           f"other styles, or this one), {windows['held_out']} whose emoji it never saw:"), "",
                      split_table(metrics_json["by_emoji"][protocol], methods)]
    parts += ["", ("Metric definitions: style acc = the evaluator names the user's preferred style; hist sim = "
              "mean cosine similarity of evaluator features to the 5 history images; hist SSIM = mean SSIM to "
              "them; content acc = the evaluator names the reference's emoji; ref / truth sim = feature "
              "cosine to the reference / the ground truth; FD = Fréchet distance of evaluator features to real "
              "images of the preferred styles (style mix of the windows; its interval is the bootstrap spread "
              "re-centred on the value, since repeated images inflate a resampled FD); truth SSIM / PSNR = pixels vs the ground truth "
              "(PSNR of identical images is capped at 100 dB)."), ""]
    atomic_write_text(path, "\n".join(parts))


def write_csv(path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def safe_name(text: str) -> str:
    """A file-name-safe form of an id."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text))


def write_grid(path, rows: list[dict], columns: list[str], title: str) -> None:
    """rows: {"label": str, column: uint8 [S, S, 3] or a list of them (history)} → one PNG."""
    from matplotlib.figure import Figure

    cells = []
    for name in columns:
        first = rows[0][name]
        cells += [(name, i) for i in range(len(first))] if isinstance(first, list) else [(name, None)]
    fig = Figure(figsize=(0.75 * len(cells) + 0.4, 0.8 * len(rows) + 0.6), dpi=110)
    axes = fig.subplots(len(rows), len(cells), squeeze=False)
    for r, row in enumerate(rows):
        for c, (name, i) in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(row[name] if i is None else row[name][i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                label = f"history {i + 1}" if i is not None else name
                ax.set_title(label.replace("_", "\n"), fontsize=6)
            if c == 0:
                ax.set_ylabel(row["label"], fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
