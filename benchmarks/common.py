"""Shared helpers: timing, tables, JSON output, a randomly initialised Pigeon model of a given size."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def best_of(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, sync: bool = False) -> float:
    """Fastest wall time of ``repeats`` calls after ``warmup`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def save(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    from pigeon.io import write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    return write_json(RESULTS / f"{name}.json", {"machine": machine(), "rows": rows, **(extra or {})})


def random_model(lm_scale: int = 1, image_size: int = 32, device: str = "cpu", **backbone_overrides):
    """A randomly initialised tiny-backbone Pigeon model at the default sizes (×lm_scale LM width)."""
    from pigeon.config import BackboneConfig, LMConfig, LoraConfig, ModelConfig
    from pigeon.models.pigeon import PigeonModel
    from pigeon.models.tiny import TinyBackbone

    base = LMConfig()
    lm = LMConfig(hidden_size=base.hidden_size * lm_scale, num_layers=base.num_layers,
                  num_heads=base.num_heads * lm_scale, intermediate_size=base.intermediate_size * lm_scale)
    cfg = BackboneConfig(image_size=image_size, lm=lm, **backbone_overrides)
    backbone = TinyBackbone.create(cfg, ["grinning face", "red apple", "dog face", "rocket", "house"], seed=0)
    model = PigeonModel(backbone, ModelConfig())
    model.add_lora(LoraConfig())
    return model.to(device).eval()


def random_batch(model, batch: int, device: str = "cpu", seed: int = 0):
    from pigeon.models.pigeon import WindowBatch

    bb = model.backbone
    g = torch.Generator().manual_seed(seed)
    t, k, h = bb.tokens_per_image, bb.codebook_size, model.history_len
    ids, mask = bb.tokenize_captions(["grinning face"] * batch, 12)
    return WindowBatch(
        history_codes=torch.randint(0, k, (batch, h, t), generator=g),
        reference_codes=torch.randint(0, k, (batch, t), generator=g),
        caption_ids=ids, caption_mask=mask,
        target_codes=torch.randint(0, k, (batch, t), generator=g),
    ).to(device)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
