"""Rasterise one emoji artwork (SVG or WebP) to a square RGB uint8 image on a white background.

SVG is rendered by resvg directly at the target size (no supersampling). Every canvas is square:
a non-square viewBox is centred in a square one (the artwork keeps its aspect), a non-square WebP
is padded with white before it is resized (LANCZOS). With ``normalize_bbox`` the drawn content is
scaled to fill the canvas (bounding box centred, small margin), an ablation of vendor scale.
The functions raise ``ValueError`` on unreadable artwork; the caller names the file.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

WHITE = "#ffffff"
PROBE_SIZE = 256  # resolution at which an SVG's content box is measured (normalize_bbox)
CONTENT_THRESHOLD = 250  # a pixel darker than this in any channel counts as drawn
BBOX_MARGIN = 0.04  # share of the side left blank around normalised content

_ROOT = re.compile(r"<svg\b[^>]*>", re.DOTALL)
_ATTR = r'\s{name}\s*=\s*("[^"]*"|\'[^\']*\')'


def _num(value: float) -> str:
    return f"{value:.6g}"


def iconify_svg(icon_set: dict, name: str) -> str:
    """The standalone SVG of icon ``name`` of an Iconify JSON set, aliases and flips applied."""
    icons, aliases = icon_set.get("icons", {}), icon_set.get("aliases", {})
    props: dict = {}
    h_flip = v_flip = False
    seen = []
    current = name
    while current not in icons:  # walk alias → parent; child properties override the parent's
        if current not in aliases or current in seen:
            raise ValueError(f"icon {current!r} not in the set (or alias loop)")
        seen.append(current)
        alias = aliases[current]
        if alias.get("rotate"):
            raise ValueError(f"alias {current!r}: rotate is not supported")
        h_flip ^= bool(alias.get("hFlip"))
        v_flip ^= bool(alias.get("vFlip"))
        props = {k: v for k, v in alias.items() if k in ("left", "top", "width", "height")} | props
        current = alias["parent"]
    icon = icons[current]
    if icon.get("rotate"):
        raise ValueError(f"icon {current!r}: rotate is not supported")
    h_flip ^= bool(icon.get("hFlip"))
    v_flip ^= bool(icon.get("vFlip"))
    box = {"left": icon_set.get("left", 0), "top": icon_set.get("top", 0),
           "width": icon_set.get("width", 16), "height": icon_set.get("height", 16)}
    box |= {k: icon[k] for k in box if k in icon}
    box |= props
    left, top, width, height = (float(box[k]) for k in ("left", "top", "width", "height"))
    body = icon["body"]
    if h_flip:  # mirror inside the same viewBox: x → 2·left + width − x
        body = f'<g transform="translate({_num(2 * left + width)} 0) scale(-1 1)">{body}</g>'
    if v_flip:
        body = f'<g transform="translate(0 {_num(2 * top + height)}) scale(1 -1)">{body}</g>'
    return ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{_num(left)} {_num(top)} {_num(width)} {_num(height)}">{body}</svg>')


def _root_viewbox(svg: str) -> tuple[str, tuple[float, float, float, float]]:
    match = _ROOT.search(svg)
    if match is None:
        raise ValueError("no <svg> root element")
    root = match.group(0)
    found = re.search(_ATTR.format(name="viewBox"), root)
    if found:
        values = [float(v) for v in re.split(r"[\s,]+", found.group(1)[1:-1].strip())]
    else:
        dims = [re.search(_ATTR.format(name=n), root) for n in ("width", "height")]
        if not all(dims):
            raise ValueError("root <svg> has neither viewBox nor width/height")
        values = [0.0, 0.0] + [float(re.sub(r"[a-z%]+$", "", d.group(1)[1:-1])) for d in dims]
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise ValueError(f"bad viewBox {values}")
    return root, (values[0], values[1], values[2], values[3])


def _with_square_root(svg: str, size: int, box: tuple[float, float, float]) -> str:
    """Replace the root's size and viewBox: ``box`` is (x, y, side) of a square viewBox."""
    root, _ = _root_viewbox(svg)
    new_root = root
    for name in ("width", "height", "viewBox", "preserveAspectRatio"):
        new_root = re.sub(_ATTR.format(name=name), "", new_root)
    x, y, side = box
    attrs = (f' width="{size}" height="{size}" viewBox="{_num(x)} {_num(y)} {_num(side)} {_num(side)}"'
             ' preserveAspectRatio="xMidYMid meet"')
    new_root = re.sub(r"^<svg\b", "<svg" + attrs, new_root)
    return svg.replace(root, new_root, 1)


def _rasterise(svg: str) -> np.ndarray:
    import resvg_py

    png = resvg_py.svg_to_bytes(svg_string=svg, background=WHITE, skip_system_fonts=True)
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _content_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _check_drawn(image: np.ndarray) -> np.ndarray:
    if not (image < CONTENT_THRESHOLD).any():
        raise ValueError("renders as a blank image")
    return image


def render_svg(svg: str, size: int, normalize_bbox: bool = False) -> np.ndarray:
    """[size, size, 3] uint8 rendering of a standalone SVG document."""
    _, (x, y, width, height) = _root_viewbox(svg)
    side = max(width, height)  # centre a non-square viewBox in a square one
    box = (x - (side - width) / 2, y - (side - height) / 2, side)
    if normalize_bbox:
        probe = _rasterise(_with_square_root(svg, PROBE_SIZE, box))
        found = _content_box((probe < CONTENT_THRESHOLD).any(axis=2))
        if found is None:
            raise ValueError("renders as a blank image")
        x0, y0, x1, y1 = found
        scale = box[2] / PROBE_SIZE
        content = max(x1 - x0, y1 - y0) * scale * (1 + 2 * BBOX_MARGIN)
        cx, cy = box[0] + (x0 + x1) / 2 * scale, box[1] + (y0 + y1) / 2 * scale
        box = (cx - content / 2, cy - content / 2, content)
    image = _rasterise(_with_square_root(svg, size, box))
    if image.shape != (size, size, 3):
        raise ValueError(f"rendered {image.shape[1]}x{image.shape[0]}, expected {size}x{size}")
    return _check_drawn(image)


def decode_raster(data: bytes, normalize_bbox: bool = False) -> Image.Image:
    """A WebP/PNG as a square RGB image on white: padded (centred), or cropped to content first."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgba = img.convert("RGBA")
    if normalize_bbox:
        found = rgba.getchannel("A").point(lambda a: 255 if a > 255 - CONTENT_THRESHOLD else 0).getbbox()
        if found is None:
            raise ValueError("image is fully transparent")
        rgba = rgba.crop(found)
    side = max(rgba.size)
    if normalize_bbox:
        side = round(side * (1 + 2 * BBOX_MARGIN))
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    offset = ((side - rgba.width) // 2, (side - rgba.height) // 2)
    canvas.alpha_composite(rgba, offset)
    return canvas.convert("RGB")


def render_raster(square: Image.Image, size: int) -> np.ndarray:
    """Resize a square RGB image (from ``decode_raster``) to [size, size, 3] uint8."""
    image = np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
    return _check_drawn(image)
