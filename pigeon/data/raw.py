"""The raw dataset's on-disk format (``data/raw/``), one reader and one writer for every caller.

```
data/raw/
  items.parquet        item_id, emoji_key, name, group, style, licence, source, file
  images/<size>/<style>/<emoji_key>.png     RGB, white background, size × size
  ATTRIBUTION.md
  manifest.json        styles, sizes, counts, package versions and integrity hashes
```

``manifest.json``'s ``hashes`` hold the md5 of ``items.parquet`` and one digest per image folder
(``images/<size>``, :func:`content_hashes`). The pipeline stages depend on the manifest and the items
table rather than on the 17,500 image files (so a no-op ``dvc repro`` does not walk them once per
stage); the ``validate`` stage depends on the whole folder and fails when an image no longer
matches its digest.

``item_id`` is the row's position in ``items`` sorted by (style, emoji_key); ``file`` is
``<style>/<emoji_key>.png`` relative to ``images/<size>/``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pigeon.errors import DataError

ITEM_COLUMNS = ("item_id", "emoji_key", "name", "group", "style", "licence", "source", "file")


def image_path(raw_dir: str | Path, size: int, file: str) -> Path:
    return Path(raw_dir) / "images" / str(size) / file


def content_hashes(raw_dir: str | Path, sizes) -> dict[str, str]:
    """The manifest's ``hashes``: md5 of ``items.parquet`` and a digest of each ``images/<size>`` folder."""
    from pigeon.io import file_md5, tree_hash

    raw_dir = Path(raw_dir)
    return {"items.parquet": file_md5(raw_dir / "items.parquet"),
            **{f"images/{size}": tree_hash(raw_dir / "images" / str(size)) for size in sizes}}


def png_bytes(image: np.ndarray) -> bytes:
    """Deterministic PNG encoding of an HxWx3 uint8 array (no timestamps, fixed compression)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def decode_png(path: Path, size: int) -> np.ndarray:
    """Read one dataset image; a missing, corrupt, wrong-mode or wrong-size file is a DataError."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode != "RGB":
                raise DataError(f"{path}: image mode {img.mode}, expected RGB")
            if img.size != (size, size):
                raise DataError(f"{path}: image is {img.size[0]}x{img.size[1]}, expected {size}x{size}")
            return np.asarray(img, dtype=np.uint8)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file missing") from exc
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def read_table(path: Path, columns: list[str] | tuple[str, ...], missing_hint: str) -> pd.DataFrame:
    """Read a parquet table; a missing file, unreadable parquet or missing column is a one-line DataError."""
    if not path.is_file():
        raise DataError(f"{path}: {missing_hint}")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read parquet ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def read_items(raw_dir: str | Path) -> pd.DataFrame:
    path = Path(raw_dir) / "items.parquet"
    items = read_table(path, ITEM_COLUMNS, "items table missing (run `pigeon data fetch` or `dvc pull`)")
    if not np.array_equal(items["item_id"].to_numpy(), np.arange(len(items))):
        raise DataError(f"{path}: item_id must be 0..N-1 in row order")
    return items


def load_images(raw_dir: str | Path, size: int, items: pd.DataFrame | None = None) -> np.ndarray:
    """All item images at ``size`` as an [N, size, size, 3] uint8 array indexed by item_id."""
    items = read_items(raw_dir) if items is None else items
    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    for i, file in enumerate(items["file"].tolist()):
        out[i] = decode_png(image_path(raw_dir, size, file), size)
    return out
