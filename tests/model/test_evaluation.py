"""The evaluation can tell methods apart: each metric fails on the baseline built to fail it.

Runs the real ``evaluators`` (and, end to end, ``evaluate``) stages of the smoke pipeline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pigeon.data.raw import load_images, read_items
from pigeon.data.users import history_columns, read_windows
from pigeon.evaluation.evaluators import load_evaluator, pretrained_encoders
from pigeon.evaluation.methods import GENERATIVE, METHODS, PROTOCOLS, RewardSelector, baseline_images
from pigeon.evaluation.metrics import WindowScorer
from pigeon.io import read_json

pytestmark = pytest.mark.slow
HISTORY = history_columns(5)


@pytest.fixture(scope="module")
def scored(smoke):
    """Evaluator, scorer and every test window of the smoke workspace (evaluators stage done)."""
    from pigeon.artifacts import load_backbone

    ws = smoke.run_until("evaluators")
    items = read_items(ws.raw)
    images = load_images(ws.raw, smoke.params.backbone.image_size, items)
    windows = read_windows(ws, "test", 5)
    evaluator = load_evaluator(ws.evaluators)
    scorer = WindowScorer(evaluator, images, items)
    train = read_windows(ws, "train", 5)
    selector = RewardSelector(load_backbone(smoke.params, ws, "cpu"), images,
                              train[HISTORY + ["target_item"]].to_numpy(np.int64).ravel())
    report = read_json(ws.reports / "evaluators.json")

    def score(images_of_windows, frame=windows, protocol="ground_truth"):
        cols = PROTOCOLS[protocol]
        return scorer.score(images_of_windows, frame, cols["reference"], cols["truth"], HISTORY)[0]

    def baseline(method, protocol="ground_truth"):
        return baseline_images(method, windows, PROTOCOLS[protocol]["reference"], images, selector, 5).images

    return {"ws": ws, "images": images, "windows": windows, "report": report, "score": score,
            "baseline": baseline, "evaluator": evaluator}


def test_holdout_split_hides_one_style_and_some_emoji(synthetic_raw, smoke):
    from pigeon.training.evaluators import make_holdout_split

    items = read_items(synthetic_raw)
    split = make_holdout_split(items, smoke.params.evaluators, seed=0)
    held_emoji = items["emoji_key"].isin(split.holdout_emoji).to_numpy()
    assert (~split.style_train == held_emoji).all() and 0 < held_emoji.mean() < 0.5
    assert (~split.content_train == (items["style"] == split.holdout_style).to_numpy()).all()
    again = make_holdout_split(items, smoke.params.evaluators, seed=0)
    assert (again.holdout_emoji, again.holdout_style) == (split.holdout_emoji, split.holdout_style)


def test_augment_moves_whole_pixels_and_keeps_colours():
    import torch

    from pigeon.training.evaluators import augment

    images = torch.rand(6, 3, 8, 8) * 2 - 1
    moved = augment(images, torch.Generator().manual_seed(0), max_shift=2, brightness=0.0)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), value=1.0)
    for i in range(len(images)):  # each output is an exact white-filled crop: no resampling blur
        assert any(torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], moved[i]) for dy in range(5) for dx in range(5))


def test_evaluators_stage_outputs_and_held_out_accuracy(smoke, scored):
    ws, report = scored["ws"], scored["report"]
    for name in ("model.safetensors", "config.json", "metrics.json", "curves.csv"):
        assert (ws.evaluators / name).is_file(), name
    config = read_json(ws.evaluators / "config.json")
    assert config["holdout_style"] == report["holdout_style"] in config["styles"]
    assert report["num_styles"] == 4 and len(config["emoji_keys"]) == report["num_emoji"]
    # Held out: style on unseen emoji, content on an unseen style; both well above chance.
    assert report["style_accuracy"] >= 0.7 > 2 * report["style_accuracy_chance"]
    assert report["content_accuracy"] > 3 * report["content_accuracy_chance"]
    assert report["holdout_emoji_images"] > 0 and report["holdout_style_images"] > 0
    # Measured before the held-out labels joined training; the saved model then learned them too.
    assert 0 < report["measured_at_step"] < smoke.params.evaluators.steps
    assert report["final_style_accuracy_all_images"] >= report["style_accuracy"] - 0.05
    curve = pd.read_csv(ws.evaluators / "curves.csv")
    assert curve["loss"].iloc[-1] < curve["loss"].iloc[0]
    # The saved weights reproduce the evaluator that was measured.
    images = scored["images"][:16]
    again = load_evaluator(ws.evaluators).predict(images)
    first = scored["evaluator"].predict(images)
    assert np.allclose(again["features"], first["features"], atol=1e-5)
    assert (again["style"] == first["style"]).all() and config["style_width"] == smoke.params.evaluators.style_width


def test_the_style_network_is_separate_from_the_content_network():
    import torch

    from pigeon.evaluation.evaluators import EvaluatorNet

    torch.manual_seed(0)
    net = EvaluatorNet(4, 7, width=8, feature_dim=16, style_width=8).eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    features, style, content = net(x)
    with torch.no_grad():
        for p in net.trunk.parameters():  # the content trunk changes …
            p.add_(torch.randn_like(p))
    features2, style2, content2 = net(x)
    assert torch.equal(style, style2)  # … the style logits do not
    assert not torch.allclose(content, content2) and not torch.allclose(features, features2)
    shared = EvaluatorNet(4, 7, width=8, feature_dim=16, pooled_style=True).eval()
    assert shared.style_trunk is None and shared(x)[1].shape == (5, 4)


def test_ground_truth_images_score_like_the_evaluator(scored):
    windows, report = scored["windows"], scored["report"]
    truth = scored["score"](scored["images"][windows["gt_item"].to_numpy()])
    # Ground truth is real art in the preferred style: style accuracy close to the held-out one
    # (its emoji were mostly seen in training, so it may be a little higher, never much lower).
    assert abs(truth["style_correct"].mean() - report["style_accuracy"]) <= 0.2
    assert truth["content_correct"].mean() >= report["content_accuracy"] - 0.1
    assert truth["gt_ssim"].min() == pytest.approx(1.0) and truth["gt_similarity"].min() == pytest.approx(1.0, abs=1e-4)


def test_shuffled_preferred_styles_drop_style_accuracy_to_chance(scored):
    windows = scored["windows"]
    truth_images = scored["images"][windows["gt_item"].to_numpy()]
    honest = scored["score"](truth_images)["style_correct"].mean()
    rng = np.random.default_rng(0)
    wrong = np.mean([scored["score"](truth_images, windows.assign(
        preferred_style=rng.permutation(windows["preferred_style"].to_numpy())))["style_correct"].mean()
        for _ in range(4)])
    # Chance for a shuffled label = Σ p_s² over the windows' preferred-style shares.
    chance = float((windows["preferred_style"].value_counts(normalize=True) ** 2).sum())
    assert wrong <= chance + 0.12
    assert honest - wrong >= 0.4


def test_reference_copy_keeps_content_but_not_style(scored):
    copy = scored["score"](scored["baseline"]("reference_copy"))
    assert copy["content_correct"].mean() >= 0.6
    assert copy["style_correct"].mean() <= 0.2
    assert copy["reference_similarity"].min() == pytest.approx(1.0, abs=1e-4)


def test_nearest_history_keeps_style_but_not_content(scored):
    nearest = scored["score"](scored["baseline"]("nearest_history"))
    copy = scored["score"](scored["baseline"]("reference_copy"))
    assert nearest["style_correct"].mean() >= 0.5
    assert nearest["style_correct"].mean() >= copy["style_correct"].mean() + 0.3
    assert nearest["content_correct"].mean() <= copy["content_correct"].mean() - 0.3
    assert nearest["history_similarity"].mean() > copy["history_similarity"].mean()


def test_local_clip_and_dino_encoders_score_similarities(tmp_path, smoke):
    """A tiny CLIP and DINOv2 saved locally load offline and add their similarity columns."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
    )

    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    CLIPModel(CLIPConfig(text_config={**small, "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1},
                         vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=8)
              ).save_pretrained(tmp_path / "clip")
    Dinov2Model(Dinov2Config(**small, image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino")
    crop = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    CLIPImageProcessor(**crop).save_pretrained(tmp_path / "clip")
    BitImageProcessor(**crop).save_pretrained(tmp_path / "dino")
    assert pretrained_encoders(smoke.params.evaluators, "cpu") == {}
    cfg = smoke.params.evaluators.model_copy(update={"clip_path": str(tmp_path / "clip"),
                                                     "dino_path": str(tmp_path / "dino")})
    encoders = pretrained_encoders(cfg, "cpu")
    ws = smoke.run_until("evaluators")
    items = read_items(ws.raw)
    images = load_images(ws.raw, 32, items)
    windows = read_windows(ws, "test", 5).head(6)
    scorer = WindowScorer(load_evaluator(ws.evaluators), images, items, encoders,
                          windows[HISTORY + ["reference_item", "gt_item"]].to_numpy().ravel())
    scores, _ = scorer.score(images[windows["reference_item"].to_numpy()], windows, "reference_item", "gt_item", HISTORY)
    for name in ("clip", "dino"):
        assert np.allclose(scores[f"{name}_reference_similarity"], 1.0, atol=1e-4)
        assert scores[f"{name}_history_similarity"].shape == (6,)


def test_evaluate_stage_writes_every_output(smoke):
    ws = smoke.run_until("evaluate")
    params = smoke.params
    metrics = read_json(ws.reports / "metrics.json")
    n = metrics["test_windows"]
    assert n == min(params.evaluate.test_windows, len(read_windows(ws, "test", 5)))
    for protocol in PROTOCOLS:
        assert set(metrics[protocol]) == set(METHODS)
        for method in METHODS:
            values, ci = metrics[protocol][method], metrics["ci95"][protocol][method]
            for key in ("style_accuracy", "content_accuracy", "history_similarity", "reference_similarity",
                        "gt_similarity", "frechet_distance", "gt_ssim", "gt_psnr", "history_ssim"):
                assert np.isfinite(values[key]), (protocol, method, key)
                assert len(ci[key]) == 2
        # Copying the reference is exact under the paper protocol (reference = truth).
        assert metrics["paper"]["reference_copy"]["gt_ssim"] == pytest.approx(1.0)
        assert (ws.reports / f"grid_{protocol}.png").stat().st_size > 1000
        sweep = pd.read_csv(ws.reports / "plots" / f"alpha_sweep_{protocol}.csv")
        assert sweep["alpha_ref"].tolist() == list(params.evaluate.select_sweep)
        assert len(pd.read_csv(ws.reports / "plots" / f"methods_{protocol}.csv")) == len(METHODS)
    assert "reference_copy" in metrics["ground_truth"] and metrics["evaluators"]["style_accuracy"] > 0
    assert metrics["ground_truth"]["reference_copy"]["style_accuracy"] < 0.5
    # The truth row is the real target image: its pixels equal the ground truth, and the evaluator names
    # its style more often than the reference's (another style); the tokenizer's copy loses pixels.
    truth, ceiling = metrics["ground_truth"]["truth"], metrics["ground_truth"]["tokenizer_ceiling"]
    assert truth["gt_psnr"] == pytest.approx(100.0) and ceiling["gt_psnr"] < 100.0
    assert truth["style_accuracy"] > metrics["ground_truth"]["reference_copy"]["style_accuracy"]
    assert metrics["chance"]["style_accuracy"] == pytest.approx(1 / metrics["evaluators"]["num_styles"])
    windows = metrics["by_emoji"]["windows"]
    assert windows["seen"] + windows["held_out"] == n
    assert set(metrics["by_emoji"]["ground_truth"]) == set(METHODS)

    index = pd.read_csv(ws.reports / "samples" / "test" / "index.csv")
    for column in ("window_id", "user_id", "protocol", "method", "preferred_style", "reference_item",
                   "reference_style", "target_item", "target_emoji", "path"):
        assert column in index.columns, column
    per_protocol = n * (len(METHODS) + len(params.evaluate.select_sweep))
    assert len(index) == 2 * per_protocol
    assert all((ws.reports / "samples" / "test" / p).is_file() for p in index["path"])
    gt = index[(index["protocol"] == "ground_truth") & (index["method"] == "reference_copy")]
    assert (gt["reference_style"] != gt["preferred_style"]).all()

    # Generation ran in shards (the smoke profile makes several), each kept as codes + images.
    shards = sorted((ws.root / "artifacts" / "evaluate").glob("shard-*.json"))
    assert len(shards) == -(-n // params.evaluate.shard_size) >= 2
    first_ids = index["window_id"].astype(str).tolist()[: params.evaluate.shard_size]
    assert read_json(shards[0])["window_ids"] == first_ids

    results = (ws.reports / "results.md").read_text()
    assert "simulated" in results and "**" in results and "the paper selected with its evaluation model" in results
    assert all(f"| {method} |" in results for method in METHODS)
    assert "| *chance* |" in results and "held-out emoji" in results


def test_evaluation_shards_give_the_same_images_whatever_the_shard_size(tmp_path):
    """Shards of 4 windows and one shard of 12 generate the same codes and images for every row, and a
    lost shard is made again on its own, byte for byte."""
    import torch

    from pigeon.artifacts import load_pigeon
    from pigeon.evaluation.generation import shard_size
    from pigeon.io import file_md5
    from pigeon.shards import read_tensor_shard, tensor_shard_files
    from pigeon.stages import evaluate
    from tests.conftest import smoke_params, untrained_workspace

    torch.set_num_threads(1)  # as the smoke fixture: threads only contend on a small shared CPU
    params = smoke_params()
    assert params.evaluate.batch_size == 4 and len(params.evaluate.select_sweep) == 2
    assert shard_size(params.evaluate.model_copy(update={"shard_size": 5})) == 8  # whole batches only
    ws = untrained_workspace(tmp_path, params)
    load_pigeon(params, ws, None, "cpu").save_trainable(ws.dpo)  # an untrained head stands in for DPO
    folder = evaluate.shard_folder(ws)

    def generate(size: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
        evaluate_cfg = params.evaluate.model_copy(update={"shard_size": size})
        sized = params.model_copy(update={"evaluate": evaluate_cfg})
        run = evaluate.open_run(sized, ws)
        reports = [evaluate.generate_shard(sized, ws, i, run) for i in range(run.plan.num_shards)]
        shards = [read_tensor_shard(folder, i)[1] for i in range(run.plan.num_shards)]
        return reports, {key: torch.cat([shard[key] for shard in shards]) for key in shards[0]}

    whole_reports, whole = generate(12)
    sharded_reports, sharded = generate(4)
    assert len(whole_reports) == 1 and len(sharded_reports) == 3
    assert len(whole) == 2 * len(GENERATIVE) * 2  # protocols × generative rows × (codes, images)
    assert whole["paper/pigeon_select/codes"].shape[0] == 12 * 2  # every window × the selection sweep
    for key, value in whole.items():
        assert torch.equal(sharded[key], value), key
    # Seeds differ by protocol and by batch: the rows are not copies of one another.
    assert not torch.equal(whole["paper/pigeon/codes"], whole["ground_truth/pigeon/codes"])
    assert not torch.equal(whole["paper/pigeon/codes"][:4], whole["paper/pigeon/codes"][4:8])

    tensors_path, json_path = tensor_shard_files(folder, 1)
    before = file_md5(tensors_path)
    json_path.unlink()  # shard 1 was interrupted before its JSON: it alone is made again
    again, _ = generate(4)
    assert [r["skipped"] for r in again] == [True, False, True]
    assert file_md5(tensors_path) == before
