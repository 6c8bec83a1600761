"""The foundation stage on the smoke pipeline: artefacts, a tokenizer that learned, sampling, resume."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import torch

from pigeon.data.raw import load_images, read_items
from pigeon.io import load_tensors
from pigeon.models.tiny import TinyBackbone
from pigeon.training.foundation import (
    reconstruct,
    reconstruction_metrics,
    sample_caption_codes,
    split_holdout,
)
from tests.conftest import REPO

ARTEFACTS = ("backbone.json", "vq_config.json", "lm_config.json", "weights.safetensors",
             "tokenizer/tokenizer.json", "metrics.json", "curves.csv", "curves.png", "reconstructions.png",
             "samples.png")


def metrics_of(ws) -> dict:
    return json.loads((ws.foundation / "metrics.json").read_text())


def holdout_images(smoke, ws) -> np.ndarray:
    items = read_items(ws.raw)
    _, held = split_holdout(items, smoke.params.foundation.holdout_fraction, smoke.params.seed)
    return load_images(ws.raw, smoke.params.backbone.image_size, items)[held]


def test_holdout_takes_whole_emoji_in_every_style(synthetic_raw):
    items = read_items(synthetic_raw)
    train, held = split_holdout(items, 0.2, seed=3)
    assert len(train) + len(held) == len(items) and len(held) > 0
    held_keys = set(items.loc[held, "emoji_key"])
    assert held_keys.isdisjoint(items.loc[train, "emoji_key"])
    assert len(held) == len(held_keys) * items["style"].nunique()
    assert np.array_equal(held, split_holdout(items, 0.2, seed=3)[1])
    assert not np.array_equal(held, split_holdout(items, 0.2, seed=4)[1])


def test_janus_backbone_has_no_foundation_to_train(tmp_path):
    from pigeon.paths import Workspace
    from pigeon.stages import foundation
    from tests.conftest import smoke_params

    params = smoke_params("backbone.kind=janus", "backbone.janus_path=/nonexistent")
    ws = Workspace.at(tmp_path)
    assert foundation.run(params, ws)["skipped"] is True
    assert "janus" in (ws.foundation / "NOTE.md").read_text() and metrics_of(ws)["skipped"] is True


@pytest.mark.slow
def test_artefacts_load_back_identical(smoke, tmp_path):
    ws = smoke.run_until("foundation")
    for name in ARTEFACTS:
        assert (ws.foundation / name).is_file(), name
    assert not ws.checkpoint_dir("foundation").exists()  # cleared after success
    model = TinyBackbone.from_pretrained(ws.foundation)
    model.save_pretrained(tmp_path / "again")
    saved = load_tensors(ws.foundation / "weights.safetensors")
    resaved = load_tensors(tmp_path / "again" / "weights.safetensors")
    assert saved.keys() == resaved.keys() and all(torch.equal(saved[k], resaved[k]) for k in saved)
    # The saved model is the one that was measured: its held-out reconstruction scores match metrics.json.
    measured = reconstruction_metrics(*reconstruct(model, torch.from_numpy(holdout_images(smoke, ws))))
    assert measured == pytest.approx(metrics_of(ws)["tokenizer"]["trained"], abs=2e-3)
    assert metrics_of(ws)["parameters"] == model.parameter_counts()


@pytest.mark.slow
def test_trained_tokenizer_beats_an_untrained_one_on_held_out_emoji(smoke):
    ws = smoke.run_until("foundation")
    tok = metrics_of(ws)["tokenizer"]
    assert tok["trained"]["psnr"] > tok["untrained"]["psnr"] + 3.0
    assert tok["trained"]["ssim"] > tok["untrained"]["ssim"] + 0.1
    # Recomputed independently from a freshly initialised backbone (what training started from).
    items = read_items(ws.raw)
    untrained = TinyBackbone.create(smoke.params.backbone, items["name"].astype(str), seed=smoke.params.seed)
    held = torch.from_numpy(holdout_images(smoke, ws))
    fresh = reconstruction_metrics(*reconstruct(untrained.eval(), held))
    trained = reconstruction_metrics(*reconstruct(TinyBackbone.from_pretrained(ws.foundation), held))
    assert trained["psnr"] > fresh["psnr"] + 3.0


@pytest.mark.slow
def test_lm_learned_and_caption_sampling_decodes_to_images(smoke):
    ws = smoke.run_until("foundation")
    metrics, curves = metrics_of(ws), pd.read_csv(ws.foundation / "curves.csv")
    assert metrics["lm"]["holdout_loss"] < metrics["lm"]["uniform_loss"]
    for phase, steps in (("vq", smoke.params.foundation.vq_steps), ("lm", smoke.params.foundation.lm_steps)):
        losses = curves.loc[curves["phase"] == phase, "loss"].to_numpy()
        assert len(losses) == steps and losses[-5:].mean() < losses[:5].mean()
    model = TinyBackbone.from_pretrained(ws.foundation)
    captions = read_items(ws.raw)["name"].astype(str).tolist()[:4]
    codes = sample_caption_codes(model, captions, seed=1)
    assert codes.shape == (4, model.tokens_per_image) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < model.codebook_size
    assert torch.equal(codes, sample_caption_codes(model, captions, seed=1))
    with torch.no_grad():
        images = model.decode_codes(codes)
    assert images.shape == (4, 3, model.image_size, model.image_size)
    assert images.abs().max() <= 1.0 and images.flatten(1).std(1).min() > 0.01


def _run_cli_until(args: list[str], checkpoint, phase: str, step: int, log) -> int:
    """Start the stage; SIGKILL it once a checkpoint at (phase, step) or later exists."""
    order = ("vq", "encode", "lm", "diffusion", "done")
    proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=REPO)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            state = json.loads((checkpoint / "latest" / "state.json").read_text())
        except (OSError, ValueError):
            state = None
        at = state and (order.index(state["phase"]), state["step"])
        if at and at >= (order.index(phase), step) and state["phase"] != "done":
            proc.kill()
            break
        time.sleep(0.02)
    return proc.wait()
