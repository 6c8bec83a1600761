"""Stage ``foundation``: pretrain the tiny backbone (tokenizer, LM, diffusion decoder if enabled).

Reads ``data/raw`` (every item image at ``backbone.image_size``, minus a seeded held-out set of
emoji in all their styles); writes ``models/foundation/`` atomically: the backbone
(``TinyBackbone.save_pretrained``), ``metrics.json``, ``curves.csv``/``curves.png``,
``reconstructions.png`` (held-out) and ``samples.png`` (caption → image). Resumes from
``.pigeon/checkpoints/foundation`` after a kill. The janus backbone has no foundation stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time

import numpy as np
import pandas as pd
import torch

from pigeon.config import Params, section_dict
from pigeon.data.raw import load_images, read_items
from pigeon.io import atomic_dir, atomic_write_bytes, atomic_write_text, write_json
from pigeon.paths import Workspace
from pigeon.pixels import to_uint8
from pigeon.runtime import autocast, resolve_device
from pigeon.training.foundation import (
    FoundationData,
    FoundationTrainer,
    conditioned_lm_loss,
    lm_loss,
    reconstruct,
    reconstruction_metrics,
    sample_caption_codes,
    split_holdout,
)

GRID_IMAGES = 12  # held-out images shown in reconstructions.png
SAMPLE_CAPTIONS = 8  # captions in samples.png, one image per caption in each of SAMPLES_PER_CAPTION styles
SAMPLES_PER_CAPTION = 3
DIFFUSION_EVAL_IMAGES = 64  # DDIM sampling is slow: diffusion metrics on a fixed subset


def run(params: Params, ws: Workspace) -> dict:
    if params.backbone.kind != "tiny":
        with atomic_dir(ws.foundation) as tmp:
            note = (f"# Foundation\n\nThe `{params.backbone.kind}` backbone is loaded pretrained from "
                    "`backbone.janus_path`; there is nothing to pretrain here.\n")
            atomic_write_text(tmp / "NOTE.md", note)
            write_json(tmp / "metrics.json", {"skipped": True, "backbone": params.backbone.kind})
        return {"skipped": True, "backbone": params.backbone.kind}
    from pigeon.models.tiny import TinyBackbone

    cfg, size = params.foundation, params.backbone.image_size
    device = resolve_device(params.device)
    items = read_items(ws.raw)
    images = load_images(ws.raw, size, items)
    captions = items["name"].astype(str).tolist()
    train_ids, holdout_ids = split_holdout(items, cfg.holdout_fraction, params.seed)
    styles = items["style"].astype(str).tolist()
    data = FoundationData(torch.from_numpy(images[train_ids]), [captions[i] for i in train_ids],
                          torch.from_numpy(images[holdout_ids]), [captions[i] for i in holdout_ids],
                          [styles[i] for i in train_ids], [styles[i] for i in holdout_ids])
    # Every item name is in the caption vocabulary: later stages caption held-out emoji too.
    backbone = TinyBackbone.create(params.backbone, captions, seed=params.seed).to(device)
    trainer = FoundationTrainer(backbone, data, cfg, params.seed, ws.checkpoint_dir("foundation"),
                                fingerprint(params, data), history_len=params.model.history_len,
                                reference_views=params.model.reference_views)
    state = trainer.run()

    start = time.perf_counter()
    untrained = TinyBackbone.create(params.backbone, captions, seed=params.seed).to(device).eval()
    backbone.eval()
    originals, recons = reconstruct(backbone, data.holdout_images)
    _, untrained_recons = reconstruct(untrained, data.holdout_images)
    seen = len(holdout_ids)  # the LM's training loss is measured on as many training items
    metrics = {
        "backbone": {"kind": "tiny", "detokenizer": params.backbone.detokenizer, "image_size": size,
                     "tokens_per_image": backbone.tokens_per_image, "codebook_size": backbone.codebook_size},
        "parameters": backbone.parameter_counts(),
        "data": {"train_images": len(train_ids), "holdout_images": len(holdout_ids),
                 "holdout_emoji": int(items.loc[holdout_ids, "emoji_key"].nunique())},
        "steps": {"vq": cfg.vq_steps, "lm": cfg.lm_steps, "diffusion": trainer_diffusion_steps(trainer)},
        "tokenizer": {"trained": reconstruction_metrics(originals, recons),
                      "untrained": reconstruction_metrics(originals, untrained_recons),
                      "codebook_usage_train": usage(trainer.codes, backbone.codebook_size),
                      "codebook_usage_holdout": usage(trainer.holdout_codes, backbone.codebook_size)},
        "lm": lm_metrics(trainer, data, seen),
        "final_loss": final_losses(state.rows),
        "resumed_from": list(trainer.resumed_from) if trainer.resumed_from else None,
    }
    shown = np.linspace(0, len(holdout_ids) - 1, min(GRID_IMAGES, len(holdout_ids))).round().astype(int)
    rows = {"held-out": originals[shown], "trained VQ": recons[shown],
            "untrained VQ": untrained_recons[shown]}
    if backbone.diffusion is not None and trainer_diffusion_steps(trainer):
        subset = data.holdout_images[:DIFFUSION_EVAL_IMAGES]
        diff_originals, diff_recons = reconstruct(backbone, subset, decoder="diffusion")
        metrics["diffusion"] = {**reconstruction_metrics(diff_originals, diff_recons), "images": len(subset)}
        rows["diffusion"] = reconstruct(backbone, data.holdout_images[shown], decoder="diffusion")[1]

    sample_captions = pick_captions(data, params.seed)
    picked = [data.holdout_captions.index(c) if c in data.holdout_captions else None for c in sample_captions]
    sample_styles = trainer.contexts.names[:: max(1, len(trainer.contexts.names) // SAMPLES_PER_CAPTION)]
    sample_styles = sample_styles[:SAMPLES_PER_CAPTION]
    codes = personalized_samples(trainer, sample_captions, picked, sample_styles, params.seed)
    # An untrained diffusion decoder draws noise: show such samples through the VQ decoder instead.
    decode = backbone.vq_decode if backbone.diffusion is not None and not trainer_diffusion_steps(trainer) \
        else backbone.decode_codes
    with torch.no_grad(), autocast(device):
        samples = decode(codes).float().cpu()
    metrics["seconds"] = {**state.seconds, "evaluate": round(time.perf_counter() - start, 3)}

    with atomic_dir(ws.foundation) as tmp:
        backbone.save_pretrained(tmp)
        write_json(tmp / "metrics.json", metrics)
        curves = curve_table(state.rows)
        atomic_write_text(tmp / "curves.csv", curves.to_csv(index=False))
        atomic_write_bytes(tmp / "curves.png", curves_png(curves))
        grid_titles = [data.holdout_captions[i] for i in shown]
        atomic_write_bytes(tmp / "reconstructions.png", grid_png(rows, grid_titles))
        atomic_write_bytes(tmp / "samples.png", samples_png(samples, sample_captions,
                                                            [f"in {s}" for s in sample_styles]))
    shutil.rmtree(ws.checkpoint_dir("foundation"), ignore_errors=True)
    tok = metrics["tokenizer"]
    return {"holdout_psnr": tok["trained"]["psnr"], "holdout_ssim": tok["trained"]["ssim"],
            "untrained_psnr": tok["untrained"]["psnr"], "holdout_lm_loss": metrics["lm"]["holdout_loss"],
            "parameters": metrics["parameters"]["total"], "phase_seconds": state.seconds}


def fingerprint(params: Params, data: FoundationData) -> str:
    """What a checkpoint must match to be resumed (checkpoint_every may change between runs)."""
    sections = section_dict(params, "backbone", "foundation", "seed")
    sections["foundation"].pop("checkpoint_every")
    text = json.dumps(sections, sort_keys=True) + data.fingerprint()
    return hashlib.md5(text.encode()).hexdigest()


def curve_table(rows: list[dict]) -> pd.DataFrame:
    """Curve rows in a fixed column order (rows restored from a checkpoint's JSON come key-sorted)."""
    curves = pd.DataFrame(rows)
    lead = [c for c in ("phase", "step", "loss") if c in curves]
    return curves[lead + sorted(c for c in curves.columns if c not in lead)]


def trainer_diffusion_steps(trainer: FoundationTrainer) -> int:
    return trainer.cfg.diffusion_steps if trainer.model.diffusion is not None else 0


def usage(codes: torch.Tensor, k: int) -> float:
    return round(codes.unique().numel() / k, 4)


def final_losses(curves: list[dict], last: int = 10) -> dict[str, float]:
    frame = pd.DataFrame(curves)
    if frame.empty:
        return {}
    return {phase: round(float(group["loss"].tail(last).mean()), 5)
            for phase, group in frame.groupby("phase")}


def pick_captions(data: FoundationData, seed: int) -> list[str]:
    """Half held-out, half training captions, distinct, seeded."""
    rng = np.random.default_rng(seed)
    held = list(dict.fromkeys(data.holdout_captions))
    seen = list(dict.fromkeys(data.captions))
    half = SAMPLE_CAPTIONS // 2
    picked = [held[i] for i in rng.permutation(len(held))[:half]]
    picked += [seen[i] for i in rng.permutation(len(seen))[: SAMPLE_CAPTIONS - len(picked)]]
    return picked


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return to_uint8(images)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def grid_png(rows: dict[str, torch.Tensor], titles: list[str]) -> bytes:
    from matplotlib.figure import Figure

    cols = len(titles)
    fig = Figure(figsize=(1.3 * cols + 1.2, 1.45 * len(rows)))
    axes = np.asarray(fig.subplots(len(rows), cols, squeeze=False))
    for r, (label, images) in enumerate(rows.items()):
        for c, image in enumerate(_to_uint8(images)):
            ax = axes[r, c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c][:18], fontsize=6)
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    return _png(fig)


def samples_png(samples: torch.Tensor, captions: list[str], labels: list[str]) -> bytes:
    per = len(samples) // len(captions)
    rows = {labels[s]: samples[s::per] for s in range(per)}
    return grid_png(rows, captions)


def lm_metrics(trainer: FoundationTrainer, data: FoundationData, seen: int) -> dict[str, float]:
    """Held-out LM losses (nats per code) with everything, without the style context, and from the caption
    alone: the gaps say how much the LM reads the context and the reference."""
    style = trainer.holdout_style
    references = trainer.holdout_references[:, 0]
    args = (trainer, data.holdout_captions, trainer.holdout_codes, references, style)
    return {"holdout_loss": conditioned_lm_loss(*args),
            "holdout_loss_no_context": conditioned_lm_loss(*args, with_context=False),
            "holdout_loss_caption_only": lm_loss(trainer, data.holdout_captions, trainer.holdout_codes),
            "train_loss_caption_only": lm_loss(trainer, data.captions[:seen], trainer.codes[:seen]),
            "uniform_loss": round(math.log(trainer.model.codebook_size + 1), 4)}


def personalized_samples(trainer: FoundationTrainer, captions: list[str], holdout_rows: list[int | None],
                         styles: list[str], seed: int) -> torch.Tensor:
    """samples.png: each caption's emoji drawn in each of ``styles`` — a style context of 5 training images of
    that style and, for held-out emoji, the plain reference view. Row = caption i * len(styles) + style s."""
    from pigeon.seeds import step_generator

    generator = step_generator(seed, "sample-context", 0)
    t = trainer.model.tokens_per_image
    rows, contexts, references = [], [], []
    for caption, row in zip(captions, holdout_rows):
        for name in styles:
            style = torch.tensor([trainer.contexts.names.index(name)])
            contexts.append(trainer.codes[trainer.contexts.draw(style, None, generator)][0])
            ref = trainer.holdout_references[row, 0] if row is not None else torch.zeros(t, dtype=torch.long)
            references.append(ref)
            rows.append(caption)
    has_reference = torch.tensor([r is not None for r in holdout_rows for _ in styles])
    codes_with = sample_caption_codes(trainer.model, rows, seed, history_codes=torch.stack(contexts).cpu(),
                                      reference=torch.stack(references).cpu())
    codes_without = sample_caption_codes(trainer.model, rows, seed, history_codes=torch.stack(contexts).cpu())
    return torch.where(has_reference[:, None].to(codes_with.device), codes_with, codes_without)


def curves_png(curves: pd.DataFrame) -> bytes:
    from matplotlib.figure import Figure

    phases = list(dict.fromkeys(curves["phase"])) if not curves.empty else []
    fig = Figure(figsize=(4 * max(1, len(phases)), 3))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(phases)), squeeze=False)[0])
    for ax, phase in zip(axes, phases):
        part = curves[curves["phase"] == phase]
        for column in [c for c in ("loss", "recon", "vq") if c in part and part[c].notna().any()]:
            ax.plot(part["step"], part[column], label=column, linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"foundation {phase}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)
