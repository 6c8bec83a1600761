"""A small synthetic emoji dataset in the exact raw format of :mod:`pigeon.data.raw` (no network).

Content is an emoji-like glyph: a shape (circle, star, …) in a colour, with or without facial
marks; shapes are grouped into emoji groups. Style is how a vendor draws it: flat fill, outline
only, 3D shading, black silhouette, drop shadow, glossy, at the vendor's own scale. Glyphs are
drawn from signed distance functions with analytic anti-aliasing, so the build is exact,
deterministic and fast (~300 images a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pigeon.config import STYLES
from pigeon.data.raw import ITEM_COLUMNS, content_hashes, image_path, png_bytes
from pigeon.errors import DataError
from pigeon.io import atomic_dir, write_json

SHAPES = ("circle", "star", "square", "triangle", "diamond", "hexagon", "cross", "ring")
COLOURS = {  # name -> RGB in [0, 1]
    "yellow": (0.98, 0.80, 0.15),
    "red": (0.88, 0.18, 0.20),
    "blue": (0.20, 0.45, 0.90),
    "green": (0.25, 0.70, 0.30),
    "purple": (0.60, 0.30, 0.80),
    "orange": (0.97, 0.55, 0.12),
    "pink": (0.96, 0.50, 0.70),
    "brown": (0.55, 0.35, 0.20),
}
MARKS = ("plain", "face", "stripe")
GROUPS = ("smileys-emotion", "animals-nature", "food-drink", "travel-places")
MAX_EMOJI = len(SHAPES) * len(COLOURS) * len(MARKS)

# How each vendor style draws a glyph: fill kind, outline, shadow, scale (share of the canvas).
STYLE_LOOK = {
    "twemoji": {"fill": "flat", "outline": 0.0, "shadow": False, "scale": 0.95},
    "noto": {"fill": "radial", "outline": 0.0, "shadow": False, "scale": 0.85},
    "noto-v1": {"fill": "flat", "outline": 0.07, "outline_colour": "dark", "shadow": False, "scale": 0.80},
    "openmoji": {
        "fill": "pastel",
        "outline": 0.05,
        "outline_colour": "black",
        "shadow": False,
        "scale": 0.75,
    },
    "openmoji-black": {
        "fill": "none",
        "outline": 0.06,
        "outline_colour": "black",
        "shadow": False,
        "scale": 0.75,
    },
    "fluent-emoji-flat": {"fill": "pastel", "outline": 0.0, "shadow": True, "scale": 0.85},
    "fluent-emoji-high-contrast": {"fill": "black", "outline": 0.0, "shadow": False, "scale": 0.88},
    "fluent-3d": {"fill": "shaded", "outline": 0.0, "shadow": True, "scale": 0.82},
    "emojione": {"fill": "gloss", "outline": 0.03, "outline_colour": "dark", "shadow": False, "scale": 0.92},
    "emojione-monotone": {"fill": "grey", "outline": 0.0, "shadow": False, "scale": 0.70},
}


@dataclass(frozen=True)
class Glyph:
    """The content of one synthetic emoji (identical across styles)."""

    key: str
    shape: str
    colour: str
    mark: str
    offset: tuple[float, float]  # small per-emoji placement jitter, seeded

    @property
    def name(self) -> str:
        return (
            f"{self.colour} {self.shape}"
            + {"plain": "", "face": " face", "stripe": " with stripe"}[self.mark]
        )

    @property
    def group(self) -> str:
        return GROUPS[SHAPES.index(self.shape) % len(GROUPS)]


def glyphs(n_emoji: int, seed: int = 0) -> list[Glyph]:
    """``n_emoji`` distinct glyphs; consecutive ones cycle through shapes, then colours, then marks."""
    if not 1 <= n_emoji <= MAX_EMOJI:
        raise DataError(f"n_emoji {n_emoji}: must be between 1 and {MAX_EMOJI}")
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-0.04, 0.04, size=(n_emoji, 2))
    colour_names = list(COLOURS)
    out = []
    for i in range(n_emoji):
        shape = SHAPES[i % len(SHAPES)]
        colour = colour_names[(i // len(SHAPES) + i) % len(colour_names)]
        mark = MARKS[i // (len(SHAPES) * len(colour_names))]
        out.append(
            Glyph(f"{0xE000 + i:x}", shape, colour, mark, (float(offsets[i, 0]), float(offsets[i, 1])))
        )
    return out


def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to a unit-radius shape centred at the origin."""
    r = np.hypot(x, y)
    if shape == "circle":
        return r - 1.0
    if shape == "ring":
        return np.abs(r - 0.72) - 0.28
    if shape == "square":
        qx, qy = np.abs(x) - 0.72, np.abs(y) - 0.72
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0) - 0.18
    if shape == "diamond":
        return (np.abs(x) + np.abs(y) - 1.0) / np.sqrt(2.0)
    if shape == "hexagon":
        ax, ay = np.abs(x), np.abs(y)
        return np.maximum(ay * 0.5 + ax * (np.sqrt(3) / 2), ay) - 0.9
    if shape == "triangle":  # equilateral, pointing up, circumradius 1
        k = np.sqrt(3.0)
        yy = -y + 0.25
        return np.maximum(np.abs(x) * k / 2 + yy * 0.5, -yy) - 0.5
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return np.minimum(np.maximum(ax - 0.95, ay - 0.32), np.maximum(ax - 0.32, ay - 0.95))
    if shape == "star":  # five points; radius modulated by angle (close enough to a distance here)
        theta = np.arctan2(y, x) + np.pi / 2
        radius = 0.62 + 0.38 * np.abs(np.cos(2.5 * theta)) ** 1.5
        return (r - radius) * 0.8
    raise DataError(f"unknown synthetic shape {shape!r}")


def _marks_sdf(mark: str, x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    if mark == "face":  # two eyes and a smile
        eyes = np.minimum(np.hypot(x - 0.3, y + 0.2), np.hypot(x + 0.3, y + 0.2)) - 0.12
        smile = np.maximum(np.abs(np.hypot(x, y + 0.05) - 0.42) - 0.06, -(y - 0.12))
        return np.minimum(eyes, smile)
    if mark == "stripe":
        return np.abs(y) - 0.12
    return None


def _coverage(sdf: np.ndarray, pixel: float) -> np.ndarray:
    """Analytic anti-aliasing: the share of a pixel inside the shape."""
    return np.clip(0.5 - sdf / pixel, 0.0, 1.0)


def render_glyph(glyph: Glyph, style: str, size: int) -> np.ndarray:
    """One glyph in one style as a ``size × size × 3`` uint8 RGB image on white."""
    if style not in STYLE_LOOK:
        raise DataError(f"unknown style {style!r} for the synthetic dataset")
    look = STYLE_LOOK[style]
    scale = look["scale"]
    pixel = 2.0 / size
    coords = (np.arange(size) + 0.5) * pixel - 1.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    gx, gy = (x - glyph.offset[0]) / scale, (y - glyph.offset[1]) / scale
    body = _shape_sdf(glyph.shape, gx, gy) * scale
    base = np.array(COLOURS[glyph.colour])
    dark = base * 0.45
    canvas = np.ones((size, size, 3))

    def paint(alpha: np.ndarray, colour: np.ndarray) -> None:
        nonlocal canvas
        alpha = alpha[..., None]
        canvas = canvas * (1 - alpha) + colour * alpha

    if look["shadow"]:
        shadow = _shape_sdf(glyph.shape, gx - 0.12, gy - 0.12) * scale
        paint(0.35 * np.clip(0.5 - shadow / (4 * pixel), 0, 1), np.zeros(3))
    inside = _coverage(body, pixel)
    fill = look["fill"]
    if fill == "flat":
        paint(inside, base)
    elif fill == "pastel":
        paint(inside, base * 0.6 + 0.4)
    elif fill == "black":
        paint(inside, np.full(3, 0.05))
    elif fill == "grey":
        paint(inside, np.full(3, 0.35))
    elif fill == "radial":  # soft lighting from the top-left
        light = np.clip(1.15 - 0.45 * np.hypot(gx + 0.35, gy + 0.35), 0.55, 1.15)[..., None]
        paint(inside, np.clip(base * light, 0, 1))
    elif fill == "shaded":  # 3D-ish: vertical gradient, bright specular highlight
        shade = (1.25 - 0.5 * (gy + 1) / 2)[..., None]
        paint(inside, np.clip(base * shade, 0, 1))
        paint(inside * np.clip(1.0 - np.hypot(gx + 0.35, gy + 0.45) / 0.35, 0, 1) * 0.8, np.ones(3))
    elif fill == "gloss":  # flat with a white band across the top
        paint(inside, base)
        paint(inside * ((gy > -0.75) & (gy < -0.45)) * 0.55, np.ones(3))
    if look["outline"] > 0:
        line = _coverage(np.abs(body) - look["outline"] / 2, pixel)
        paint(line, np.zeros(3) if look["outline_colour"] == "black" else dark)
    marks = _marks_sdf(glyph.mark, gx, gy)
    if marks is not None:
        mark_alpha = _coverage(np.maximum(marks * scale, body), pixel)
        if fill == "none":
            mark_colour = np.zeros(3)
        elif fill in ("black", "grey"):
            mark_colour = np.ones(3)
        else:
            mark_colour = dark * 0.6
        paint(mark_alpha, mark_colour)
    return np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)


ATTRIBUTION = """# Attribution

This dataset is synthetic: every image was drawn by `pigeon.data.synthetic` from geometric
shapes. It contains no third-party artwork. The style ids only name the vendor look each
rendering imitates (flat, outline, 3D, high contrast, …); no vendor artwork is reproduced.
Licence: CC0-1.0.
"""


def build_synthetic_raw(
    out: str | Path,
    styles: tuple[str, ...] | list[str] = STYLES,
    sizes: tuple[int, ...] | list[int] = (32, 64),
    n_emoji: int = 36,
    seed: int = 0,
) -> dict:
    """Write a synthetic raw dataset to ``out`` (replaced atomically); return its manifest."""
    out = Path(out)
    styles, sizes = tuple(styles), tuple(int(s) for s in sizes)
    unknown = [s for s in styles if s not in STYLE_LOOK]
    if unknown:
        raise DataError(f"styles: unknown style(s) {', '.join(unknown)} (known: {', '.join(STYLES)})")
    content = glyphs(n_emoji, seed)
    rows = [
        {
            "emoji_key": g.key,
            "name": g.name,
            "group": g.group,
            "style": style,
            "licence": "CC0-1.0",
            "source": "synthetic",
            "file": f"{style}/{g.key}.png",
        }
        for style in styles
        for g in content
    ]
    items = pd.DataFrame(rows).sort_values(["style", "emoji_key"], kind="stable").reset_index(drop=True)
    items.insert(0, "item_id", np.arange(len(items), dtype=np.int64))
    items = items[list(ITEM_COLUMNS)]
    by_key = {g.key: g for g in content}
    with atomic_dir(out) as tmp:
        for size in sizes:
            for style in styles:
                (tmp / "images" / str(size) / style).mkdir(parents=True, exist_ok=True)
            for file, style, key in zip(items["file"], items["style"], items["emoji_key"]):
                image_path(tmp, size, file).write_bytes(png_bytes(render_glyph(by_key[key], style, size)))
        items.to_parquet(tmp / "items.parquet", index=False)
        (tmp / "ATTRIBUTION.md").write_text(ATTRIBUTION, encoding="utf-8")
        manifest = {
            "source": "synthetic",
            "seed": seed,
            "styles": sorted(styles),
            "sizes": list(sizes),
            "counts": {
                "emoji": n_emoji,
                "items": len(items),
                "images": len(items) * len(sizes),
                "groups": items.drop_duplicates("emoji_key")["group"].value_counts().sort_index().to_dict(),
                "styles": {s: n_emoji for s in sorted(styles)},
            },
            "packages": {},
            "params": {"styles": list(styles), "sizes": list(sizes), "n_emoji": n_emoji},
            "hashes": content_hashes(tmp, sizes),
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest
