"""Detokenizer: the VQ decoder vs the diffusion decoder at 10/25/50 DDIM steps, images per second."""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import best_of, save, table
from pigeon.config import BackboneConfig
from pigeon.models.tiny import TinyBackbone
from pigeon.runtime import autocast


def run(batch: int = 64, steps=(10, 25, 50), device: str = "cpu") -> list[dict]:
    dev = torch.device(device)
    sync = dev.type == "cuda"
    backbone = TinyBackbone.create(BackboneConfig(detokenizer="diffusion"), ["a b"], seed=0).to(dev).eval()
    codes = torch.randint(0, backbone.codebook_size, (batch, backbone.tokens_per_image), device=dev)
    rows = []
    with torch.no_grad(), autocast(dev):
        vq = best_of(lambda: backbone.vq_decode(codes), sync=sync)
        rows.append({"decoder": "vq", "steps": None, "batch": batch, "seconds": vq, "images_per_s": batch / vq,
                     "vs_vq": 1.0})
        vectors = backbone.code_vectors(codes)
        for n in steps:
            g = torch.Generator(device=dev).manual_seed(0)
            s = best_of(lambda: backbone.diffusion.sample(vectors, g, steps=n), repeats=1, sync=sync)
            rows.append({"decoder": "diffusion", "steps": n, "batch": batch, "seconds": s,
                         "images_per_s": batch / s, "vs_vq": vq / s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    rows = run(args.batch, device=args.device)
    print(table(rows, list(rows[0])))
    save("detokenizer", rows)


if __name__ == "__main__":
    main()
