"""Generation: KV-cache sampling vs the same without cache vs teacher-forced scoring of the same tokens.

``kv_cache_s`` is the shipped path (library prefill, then :mod:`pigeon.models.decoding`'s lean step);
``library_cache_s`` runs every cached step through the library forward (the reference implementation).

The teacher-forced forward (one pass over prompt + T codes, as ``sequence_logps`` runs it) is the bound
a sampler can approach; ``cache / bound`` is the share of it generation reaches (goal ≥ 0.70 at 16–64).
``prompt_s`` is the prompt's forward alone (generation's prefill, ~85% of the bound's tokens), so
``decode_ms_per_step`` = (kv_cache_s − prompt_s) / (T − 1) is what each sampled token costs. A decode
step reads every layer's whole KV cache for one query per row: on a CPU that is memory-bound (it runs
at the speed of copying the cache), while the bound's one pass is compute-bound and gains from threads.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import best_of, random_batch, random_model, save, table
from pigeon.config import SamplingConfig
from pigeon.runtime import autocast


def _prompt_forward(model, batch, cond) -> None:
    """The prompt alone (what generation's prefill runs): the part of the bound no sampler can skip."""
    prefix, attention = model.prefix(batch, cond.history_keep.float(), cond.reference_keep.float())
    model.backbone.transformer(prefix, attention, model.positions(attention))


def run(batches=(1, 4, 16, 64), scales=(1, 4), device: str = "cpu", uncached_max_batch: int = 4) -> list[dict]:
    rows = []
    dev = torch.device(device)
    sync = dev.type == "cuda"
    for scale in scales:
        model = random_model(lm_scale=scale, device=device)
        t = model.backbone.tokens_per_image
        for b in batches:
            batch = random_batch(model, b, device)
            cond = model.condition(batch, alpha_ref=0.5)
            with torch.no_grad(), autocast(dev):
                gen = best_of(lambda: model.generate(batch, 0.5, sampling=SamplingConfig(), seed=0, cond=cond),
                              sync=sync)
                library = best_of(lambda: model.generate(batch, 0.5, seed=0, cond=cond, fast_decode=False),
                                  sync=sync)
                bound = best_of(lambda: model.sequence_logps(batch, batch.target_codes, cond), sync=sync)
                prompt = best_of(lambda: _prompt_forward(model, batch, cond), sync=sync)
                nocache = None
                if b <= uncached_max_batch:
                    nocache = best_of(lambda: model.generate(batch, 0.5, seed=0, cond=cond, use_cache=False),
                                      repeats=1, warmup=0, sync=sync)
            rows.append({
                "lm": f"x{scale}", "batch": b, "kv_cache_s": gen, "library_cache_s": library, "no_cache_s": nocache,
                "teacher_forced_s": bound, "prompt_s": prompt, "decode_ms_per_step": 1000 * (gen - prompt) / (t - 1),
                "cache_vs_bound": bound / gen, "library_vs_bound": bound / library, "cache_speedup": (nocache / gen) if nocache else None,
                "tokens_per_s": b * t / gen, "images_per_s": b / gen,
            })
            print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--scales", default="1,4")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: every available core)")
    args = parser.parse_args()
    from pigeon.runtime import available_cores

    torch.set_num_threads(args.threads or available_cores())
    rows = run(tuple(int(b) for b in args.batches.split(",")), tuple(int(s) for s in args.scales.split(",")),
               args.device)
    print(table(rows, list(rows[0])))
    save("generation", rows)


if __name__ == "__main__":
    main()
