"""GPU path check: CUDA device, bf16, the `gpu` profile's tiny backbone and a Janus-Pro-1B-sized backbone
built from a random config (no weights are downloaded). Prints a table and writes JSON.

    python -m benchmarks.gpu_check [--out results.json] [--skip-janus]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import best_of, table
from pigeon.config import LoraConfig, ModelConfig, SamplingConfig, load_params
from pigeon.models.pigeon import PigeonModel, WindowBatch

REPO = Path(__file__).resolve().parents[1]


def batch_for(model: PigeonModel, b: int, device) -> WindowBatch:
    bb = model.backbone
    t, k = bb.tokens_per_image, bb.codebook_size
    ids, mask = bb.tokenize_captions(["grinning face"] * b, 12)
    g = torch.Generator().manual_seed(0)
    return WindowBatch(torch.randint(0, k, (b, model.history_len, t), generator=g),
                       torch.randint(0, k, (b, t), generator=g), ids, mask,
                       torch.randint(0, k, (b, t), generator=g)).to(device)


def measure(name: str, model: PigeonModel, train_batch: int, gen_batch: int, device) -> dict:
    from pigeon.runtime import autocast

    cuda = device.type == "cuda"
    model.add_lora(LoraConfig())
    model.to(device)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = batch_for(model, train_batch, device)

    def step():
        with autocast(device):
            loss, _ = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    model.train()
    loss0 = float(step())
    train_s = best_of(step, repeats=3, warmup=1, sync=cuda)
    model.eval()
    gbatch = batch_for(model, gen_batch, device)
    cond = model.condition(gbatch, alpha_ref=0.5)
    with torch.no_grad(), autocast(device):
        gen_s = best_of(lambda: model.generate(gbatch, 0.5, sampling=SamplingConfig(top_k=100), seed=0, cond=cond),
                        repeats=2, warmup=1, sync=cuda)
        bound_s = best_of(lambda: model.sequence_logps(gbatch, gbatch.target_codes, cond), repeats=3, sync=cuda)
        codes = model.generate(gbatch, 0.5, seed=0, cond=cond).codes
        decode_s = best_of(lambda: model.decode(codes[:8]), repeats=1, warmup=1, sync=cuda)
    t = model.backbone.tokens_per_image
    return {
        "backbone": name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "tokens_per_image": t,
        "prompt_tokens": 12 + model.history_len + model.query_length,
        "train_batch": train_batch,
        "train_step_s": round(train_s, 4),
        "train_loss_first": round(loss0, 3),
        "gen_batch": gen_batch,
        "gen_s": round(gen_s, 3),
        "gen_tokens_per_s": round(gen_batch * t / gen_s, 1),
        "gen_vs_teacher_forced": round(bound_s / gen_s, 3),
        "decode_8_images_s": round(decode_s, 4),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


def tiny_gpu_profile(profile: str = "gpu") -> PigeonModel:
    from pigeon.models.tiny import TinyBackbone

    params = load_params(REPO / "params.yaml", profile=profile)
    backbone = TinyBackbone.create(params.backbone, ["grinning face", "red apple", "rocket"], seed=0)
    return PigeonModel(backbone, params.model)


def janus_pro_1b_sized(device: str = "cuda", scale: int = 1) -> PigeonModel:
    """Janus-Pro-1B's shapes (LM 2048×24, VQ 16384 codes, 384 px → 576 tokens), random weights, bf16.
    ``scale`` > 1 divides widths/depths (a CPU dry run of the same code path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig,
                              LlamaConfig, PreTrainedTokenizerFast)

    from pigeon.models.janus import JanusBackbone

    special = ["<pad>", "<unk>", "<s>", "</s>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>"]
    vocab = {w: i for i, w in enumerate(special + ["grinning", "face"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image_placeholder>",
                                                              "boi_token": "<begin_of_image>",
                                                              "eoi_token": "<end_of_image>"})
    d, side = 2048 // scale, 24 // scale
    text = LlamaConfig(vocab_size=102400 // scale, hidden_size=d, intermediate_size=5632 // scale,
                       num_hidden_layers=24 // scale, num_attention_heads=16 // scale,
                       num_key_value_heads=16 // scale, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                       max_position_embeddings=16384)
    vision = JanusVisionConfig(hidden_size=1024 // scale, num_hidden_layers=24 // scale,
                               num_attention_heads=16 // scale, image_size=16 * side, patch_size=16,
                               projection_dim=d, num_image_tokens=side * side)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=16384 // scale, projection_dim=d, image_token_embed_dim=d,
                          num_patches=side)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=vocab["<image_placeholder>"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = JanusForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    backbone = JanusBackbone(model.eval(), tokenizer)
    return PigeonModel(backbone, ModelConfig(adapter_hidden=512)).to(device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--skip-janus", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="the same code path on the CPU at small sizes")
    args = parser.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        rows = [measure("tiny (smoke, dry run)", tiny_gpu_profile("smoke"), 2, 2, device)]
        rows.append(measure("janus (1/8 size, dry run)", janus_pro_1b_sized("cpu", scale=8), 1, 2, device))
        print(table(rows, list(rows[0])))
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    device = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
            "bf16": torch.cuda.is_bf16_supported(), "torch": torch.__version__, "cuda": torch.version.cuda}
    print(json.dumps(info), flush=True)
    rows = []
    start = time.perf_counter()
    rows.append(measure("tiny (gpu profile)", tiny_gpu_profile(), train_batch=64, gen_batch=64, device=device))
    print(table(rows[-1:], list(rows[-1])), flush=True)
    if not args.skip_janus:
        torch.cuda.reset_peak_memory_stats()
        rows.append(measure("janus-pro-1b-sized (random)", janus_pro_1b_sized(), train_batch=4, gen_batch=16,
                            device=device))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    print(table(rows, list(rows[0])))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "rows": rows,
                                          "seconds": round(time.perf_counter() - start, 1)}, indent=2))


if __name__ == "__main__":
    main()
