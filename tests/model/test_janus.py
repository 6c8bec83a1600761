"""JanusBackbone from a tiny random JanusConfig saved to disk, and PigeonModel running on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pigeon.config import load_params
from pigeon.errors import CheckpointError
from pigeon.models.janus import JanusBackbone
from pigeon.models.pigeon import PigeonModel, WindowBatch
from pigeon.models.style_transfer import decode_in_style
from pigeon.paths import Workspace

REPO = Path(__file__).resolve().parents[2]
WORDS = [":", "a", "grinning", "face", "red", "star", "cat", "with", "stripe"]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>",
           "<|User|>", "<|Assistant|>"]
K, SIDE, D = 64, 4, 32  # codebook, latent grid side (T = 16 codes), LM width


def write_tiny_janus(folder: Path) -> Path:
    """A random Janus checkpoint obeying the tiny-config rules of docs/design.md §8, with a word-level tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"})
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                               patch_size=4, projection_dim=D, num_image_tokens=SIDE * SIDE, mlp_ratio=2)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=K, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1, 1], num_res_blocks=1, projection_dim=D,
                          image_token_embed_dim=D, num_hidden_layers=2)
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                                                      image_token_id=vocab["<image_placeholder>"]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared CPU is faster with one thread than with oversubscribed two
    yield write_tiny_janus(tmp_path_factory.mktemp("janus"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone(janus_dir) -> JanusBackbone:
    return JanusBackbone.from_pretrained(janus_dir).eval()


def janus_params(path: Path):
    return load_params(REPO / "params.yaml", profile="smoke",
                       overrides=["backbone.kind=janus", f"backbone.janus_path={path}", "model.mask.num_heads=2",
                                  "model.adapter_hidden=16"])


def test_backbone_contract(backbone):
    assert (backbone.codebook_size, backbone.tokens_per_image, backbone.hidden_size, backbone.cond_dim,
            backbone.image_size) == (K, SIDE * SIDE, D, 8, 16)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        codes = backbone.encode_images(images)
        assert codes.shape == (3, 16) and int(codes.max()) < K
        pixels = backbone.decode_codes(codes)
        assert pixels.shape == (3, 3, 16, 16) and float(pixels.abs().max()) <= 1.0
        assert backbone.condition_features(codes).shape == (3, 16, 8)
        assert backbone.image_features(images).shape[0] == 3
        assert backbone.embed_codes(codes).shape == (3, 16, D)
        hidden = torch.randn(2, 5, D)
        logits = backbone.image_logits(hidden)
        assert logits.shape == (2, 5, K + 1)
        end_row = backbone.model.lm_head.weight[backbone.eoi_token_id]
        torch.testing.assert_close(logits[..., K], hidden @ end_row)
        torch.testing.assert_close(logits[..., :K], backbone.model.model.generation_head(hidden))
    table = backbone.model.get_input_embeddings().weight
    assert torch.equal(backbone.special_embedding("img"), table[backbone.boi_token_id])
    assert backbone.boi_token_id == SPECIAL.index("<begin_of_image>")


def test_style_transfer_runs_on_the_janus_detokenizer(backbone):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (2, SIDE * SIDE), generator=g)
    history = torch.randint(0, K, (2, 3, SIDE * SIDE), generator=g)
    keep = torch.ones(2, 3, SIDE * SIDE, dtype=torch.bool)
    with torch.no_grad():
        plain = backbone.decode_codes(codes)
        styled = decode_in_style(backbone, codes, history, keep, 1.0)
    assert styled.shape == plain.shape and not torch.allclose(styled, plain, atol=1e-4)


def test_caption_prompt_left_padded_and_truncated_in_the_caption(backbone):
    ids, mask = backbone.tokenize_captions(["red star", "a grinning face with a stripe"], 10)
    assert ids.shape == mask.shape == (2, 10)
    tok = backbone.text_tokenizer
    short = tok.convert_ids_to_tokens(ids[0][mask[0].bool()].tolist())
    assert short == ["<s>", "<|User|>", ":", "red", "star", "<|Assistant|>", ":"]
    assert mask[0].tolist() == [0, 0, 0] + [1] * 7
    long = tok.convert_ids_to_tokens(ids[1].tolist())
    assert mask[1].all() and long[:3] == ["<s>", "<|User|>", ":"] and long[-2:] == ["<|Assistant|>", ":"]


def test_pigeon_on_janus_loss_logps_generate(backbone):
    params = janus_params(Path("unused"))
    torch.manual_seed(0)
    model = PigeonModel(backbone, params.model)
    model.add_lora(params.stage1.lora)
    g = torch.Generator().manual_seed(0)
    ids, mask = backbone.tokenize_captions(["red star", "cat face"], 10)
    batch = WindowBatch(torch.randint(0, K, (2, 5, 16), generator=g), torch.randint(0, K, (2, 16), generator=g),
                        ids, mask, torch.randint(0, K, (2, 16), generator=g))
    model.train()
    loss, _ = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mask_generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters(
        mask_generator=False, adapter=False))  # LoRA B starts at zero: at least LoRA B gets gradient
    model.eval()
    out = model.generate(batch, [0.2, 0.9], seed=3)
    assert out.codes.shape == (4, 16) and int(out.codes.max()) < K
    assert torch.equal(out.codes, model.generate(batch, [0.2, 0.9], seed=3, use_cache=False).codes)
    from pigeon.models.decoding import fast_decoder

    assert fast_decoder(model.backbone.decoder_body(), torch.float32) is not None  # the lean step ran
    assert torch.equal(out.codes, model.generate(batch, [0.2, 0.9], seed=3, fast_decode=False).codes)
    rows = batch.select(out.window_index)
    with torch.no_grad():
        logps = model.sequence_logps(rows, out.codes, out.conditioning)
        again = model.sequence_logps(rows, out.codes, out.conditioning)
        rows.target_codes = out.codes
        replay_loss, _ = model.loss(rows, out.conditioning)
    assert torch.equal(logps, again) and bool((logps < 0).all())
    torch.testing.assert_close(replay_loss, -logps.sum() / (4 * 17), rtol=1e-5, atol=1e-5)


def test_load_pigeon_round_trip_through_stage_folder(janus_dir, tmp_path):
    from pigeon.artifacts import load_backbone, load_pigeon

    params, ws = janus_params(janus_dir), Workspace.at(tmp_path)
    fresh = load_pigeon(params, ws, None, "cpu")
    assert fresh.lora_config == params.stage1.lora and not fresh.training
    with torch.no_grad():
        for p in fresh.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fresh.save_trainable(ws.stage1)
    loaded = load_pigeon(params, ws, "stage1", "cpu")
    for mine, theirs in zip(fresh.trainable_parameters(), loaded.trainable_parameters(), strict=True):
        assert torch.equal(mine, theirs)
    with pytest.raises(CheckpointError, match="dpo"):
        load_pigeon(params, ws, "dpo", "cpu")
    with pytest.raises(CheckpointError, match="config.json"):
        load_backbone(janus_params(tmp_path / "missing"), ws, "cpu")


def test_backbone_stages_follow_the_janus_checkpoint(janus_dir, tmp_path):
    """Pointing ``backbone.janus_path`` at another checkpoint makes ``dvc status`` report the stages that
    load the backbone (in params.yaml: exactly those; in the profile: every stage that reads the profile
    file); a change inside the folder changes the flow's cache key of exactly those stages."""
    import json
    import shutil
    import subprocess
    import sys

    import yaml

    from pigeon.hashing import load_stage_specs, stage_fingerprint
    from pigeon.pipeline import BACKBONE_STAGES, PIPELINE

    repo, other = tmp_path / "repo", tmp_path / "other-janus"
    shutil.copytree(janus_dir, other)
    (repo / "profiles").mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = {**yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")), "profile": "janus"}
    profile = yaml.safe_load((REPO / "profiles" / "janus.yaml").read_text(encoding="utf-8"))

    def write(params_janus_path, profile_janus_path) -> None:
        params["backbone"] = {**params["backbone"], "janus_path": params_janus_path}
        profile["backbone"] = {**profile["backbone"], "janus_path": profile_janus_path}
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        (repo / "profiles" / "janus.yaml").write_text(yaml.safe_dump(profile, sort_keys=False), encoding="utf-8")

    def dvc(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                              check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"}).stdout

    write(None, str(janus_dir))
    for spec in PIPELINE:  # stand-ins for every input and output: dvc status compares hashes only
        for path in (*spec.deps, *spec.outs, *spec.metrics):
            target = repo / path.replace("${profile}", "janus")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(path, encoding="utf-8")
    dvc("init", "--no-scm", "-q")
    dvc("commit", "--force", "-q")
    assert json.loads(dvc("status", "--json")) == {}

    write(str(other), str(janus_dir))  # params.yaml points at another one (`dvc exp run -S backbone.janus_path=…`)
    assert set(json.loads(dvc("status", "--json"))) == set(BACKBONE_STAGES)
    write(None, str(janus_dir))
    assert json.loads(dvc("status", "--json")) == {}
    write(None, str(other))  # the janus profile does: every stage that reads the profile file changes
    readers = {spec.name for spec in PIPELINE if "profiles/${profile}.yaml" in spec.deps}
    assert set(json.loads(dvc("status", "--json"))) == readers and readers >= set(BACKBONE_STAGES)
    assert set(BACKBONE_STAGES) == {"foundation", "evaluators", "stage1", "candidates", "rank", "dpo", "evaluate", "register"}

    specs, ws = load_stage_specs(REPO / "dvc.yaml", "janus"), Workspace.at(tmp_path / "ws")
    before = {name: stage_fingerprint(specs[name], janus_params(other), ws, REPO) for name in specs}
    config = other / "config.json"
    config.write_text(config.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    after = {name: stage_fingerprint(specs[name], janus_params(other), ws, REPO) for name in specs}
    assert {name for name in specs if before[name] != after[name]} == set(BACKBONE_STAGES)
