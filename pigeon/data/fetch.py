"""``pigeon data fetch``: build ``data/raw/`` from the pinned package tarballs, byte for byte reproducibly.

Tarballs come from ``npm pack`` into the cache folder and are checked against their pinned sha512
before each is read once, front to back. Emoji are matched across styles by key (emoji_keys), the
base emoji that every selected style draws are kept, each is rendered at every size, and the whole
folder is written to a temporary sibling and renamed, so a failed build leaves the old one intact.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pigeon.config import DataConfig
from pigeon.data import emoji_render
from pigeon.data.attribution import build_attribution
from pigeon.data.emoji_keys import build_name_index, is_base_key, match_icons, normalize_key
from pigeon.data.raw import ITEM_COLUMNS, content_hashes, image_path, png_bytes
from pigeon.data.sources import (
    EMOJIBASE,
    EMOJIBASE_GROUPS,
    EMOJIBASE_LABELS,
    EMOJIBASE_LICENCE,
    NAME_REFERENCE_STYLES,
    STYLE_SOURCES,
    Package,
    StyleSource,
    packages_for,
)
from pigeon.errors import DataError
from pigeon.io import atomic_dir, write_json

EXCLUDED_GROUPS = ("flags",)  # "base" emoji: flags are left out whatever data.drop_groups says


@dataclass(frozen=True)
class Art:
    """One style's artwork for one emoji, ready to render."""

    style: str
    key: str
    source: str  # "<package@version>:<member>[#icon]", the items table's `source`
    kind: str  # "svg" (payload: SVG text) or "raster" (payload: WebP bytes)
    payload: str | bytes


@dataclass(frozen=True)
class Emojibase:
    labels: dict[str, str]  # key → CLDR label, skin-tone variants included (for name matching)
    groups: dict[str, str]  # key → group slug, base entries only
    licence: str


# ---------------------------------------------------------------- tarballs


def sri_sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def verify_tarball(path: Path, package: Package, shown: Path | None = None) -> Path:
    """Check a tarball against its pinned integrity; a mismatch removes it and fails, naming ``shown``."""
    actual = sri_sha512(path)
    if actual != package.integrity:
        path.unlink(missing_ok=True)
        raise DataError(f"{shown or path}: integrity mismatch for {package.spec} (expected "
                        f"{package.integrity}, got {actual}); the file was removed, run again to download it")
    return path


def ensure_tarballs(packages: Sequence[Package], cache_dir: Path) -> dict[str, Path]:
    """spec → verified tarball in ``cache_dir``; the missing ones come from one ``npm pack`` call."""
    paths = {p.spec: cache_dir / p.tarball_name for p in packages}
    missing = [p for p in packages if not paths[p.spec].is_file()]
    if missing:
        cache_dir.mkdir(parents=True, exist_ok=True)
        specs = [p.spec for p in missing]
        with tempfile.TemporaryDirectory(prefix=".npm-pack.", dir=cache_dir) as tmp:
            try:
                done = subprocess.run(["npm", "pack", *specs, "--pack-destination", tmp, "--silent"],
                                      capture_output=True, text=True, timeout=900, check=False)
            except FileNotFoundError as exc:
                raise DataError(f"npm not found: it is needed to download {', '.join(specs)}") from exc
            except subprocess.TimeoutExpired as exc:
                raise DataError(f"npm pack {' '.join(specs)}: no answer after {exc.timeout:.0f} s") from exc
            for package in missing:
                fetched = Path(tmp) / package.tarball_name
                if done.returncode != 0 or not fetched.is_file():
                    why = (done.stderr.strip().splitlines() or ["no tarball written"])[-1]
                    raise DataError(f"npm pack {package.spec} failed (exit {done.returncode}): {why}")
                verify_tarball(fetched, package, shown=paths[package.spec])
                fetched.replace(paths[package.spec])
    for package in packages:
        if package not in missing:
            verify_tarball(paths[package.spec], package)
    return paths


def read_members(path: Path, package: Package, wanted) -> dict[str, bytes]:
    """One sequential pass over a tarball: the bytes of every file member ``wanted(name)`` accepts."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    out[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read tarball of {package.spec} ({exc})") from exc
    return out


def _json(path: Path, member: str, data: bytes | None):
    if data is None:
        raise DataError(f"{path}: member {member} missing")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: member {member} is not valid JSON ({exc})") from exc


# ---------------------------------------------------------------- sources → artwork


def read_emojibase(path: Path) -> Emojibase:
    wanted = {EMOJIBASE_LABELS, EMOJIBASE_GROUPS, EMOJIBASE_LICENCE}
    files = read_members(path, EMOJIBASE, wanted.__contains__)
    entries = _json(path, EMOJIBASE_LABELS, files.get(EMOJIBASE_LABELS))
    group_names = _json(path, EMOJIBASE_GROUPS, files.get(EMOJIBASE_GROUPS))["groups"]
    labels, groups = {}, {}
    for entry in entries:
        key = normalize_key(entry["hexcode"])
        labels[key] = entry["label"]
        for skin in entry.get("skins", []):
            labels.setdefault(normalize_key(skin["hexcode"]), skin["label"])
        if entry.get("group") is not None and is_base_key(key):
            groups[key] = group_names[str(entry["group"])]
    return Emojibase(labels, groups, files.get(EMOJIBASE_LICENCE, b"").decode("utf-8"))


def read_iconify(path: Path, src: StyleSource) -> tuple[dict, dict]:
    """(icon set, chars.json) of an Iconify package, whose info.json must state the pinned licence."""
    names = {f"{src.member_prefix}{m}" for m in ("icons.json", "chars.json", "info.json")}
    files = read_members(path, src.package, names.__contains__)
    icon_set = _json(path, "icons.json", files.get(f"{src.member_prefix}icons.json"))
    chars_raw = files.get(f"{src.member_prefix}chars.json")
    chars = _json(path, "chars.json", chars_raw) if chars_raw is not None else {}
    info = _json(path, "info.json", files.get(f"{src.member_prefix}info.json"))
    spdx = info.get("license", {}).get("spdx")
    if spdx != src.package.licence:
        raise DataError(f"{path}: info.json licence {spdx!r} differs from the pinned {src.package.licence!r}")
    return icon_set, chars


def iconify_art(src: StyleSource, icon_set: dict, chars: dict, index, keep: set[str]) -> dict[str, Art]:
    names = list(icon_set.get("icons", {})) + list(icon_set.get("aliases", {}))
    matched = match_icons(names, chars if src.has_chars else {}, index)
    arts = {}
    for key, name in matched.items():
        if key in keep:
            source = f"{src.package.spec}:{src.member_prefix}icons.json#{name}"
            try:
                svg = emoji_render.iconify_svg(icon_set, name)
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"style {src.style}, emoji {key}: bad icon {source} ({exc})") from exc
            arts[key] = Art(src.style, key, source, "svg", svg)
    return arts


def file_art(path: Path, src: StyleSource, keep: set[str]) -> dict[str, Art]:
    """Artwork stored as one file per emoji, named by its codepoints (``1F600.svg``, ``1f600.webp``)."""
    suffix = ".svg" if src.format == "svg-files" else ".webp"

    def key_of(member: str) -> str | None:
        if not (member.startswith(src.member_prefix) and member.endswith(suffix)):
            return None
        stem = member[len(src.member_prefix):-len(suffix)]
        try:
            return normalize_key(stem)
        except ValueError:
            return None

    files = read_members(path, src.package, lambda m: key_of(m) in keep)
    arts = {}
    for member in sorted(files):  # a key with two files (with and without FE0F): the first name wins
        key = key_of(member)
        if key in arts:
            continue
        source = f"{src.package.spec}:{member}"
        if src.format == "svg-files":
            try:
                payload: str | bytes = files[member].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"style {src.style}, emoji {key}: {source} is not UTF-8 text") from exc
            arts[key] = Art(src.style, key, source, "svg", payload)
        else:
            arts[key] = Art(src.style, key, source, "raster", files[member])
    return arts


def collect_art(styles: Sequence[str], tarballs: dict[str, Path], base: Emojibase,
                keep: set[str]) -> dict[str, dict[str, Art]]:
    """Artwork of every style for the ``keep`` keys (style → key → Art)."""
    arts: dict[str, dict[str, Art]] = {}
    reference_chars: list[dict] = []
    # Sets with a chars.json first: their maps are the reference for matching the others by name.
    needs_reference = any(not STYLE_SOURCES[s].has_chars for s in styles)
    order = sorted(set(styles) | (set(NAME_REFERENCE_STYLES) if needs_reference else set()),
                   key=lambda s: (not STYLE_SOURCES[s].has_chars, STYLE_SOURCES[s].format != "iconify", s))
    own_index = build_name_index(base.labels)
    reference_index = None  # built once, after every reference chars.json has been read
    for style in order:
        src = STYLE_SOURCES[style]
        path = tarballs[src.package.spec]
        if src.format == "iconify":
            icon_set, chars = read_iconify(path, src)
            if style in NAME_REFERENCE_STYLES:
                reference_chars.append(chars)
            if style not in styles:
                continue
            if not src.has_chars and reference_index is None:
                reference_index = build_name_index(base.labels, reference_chars)
            index = own_index if src.has_chars else reference_index
            arts[style] = iconify_art(src, icon_set, chars, index, keep)
        elif style in styles:
            arts[style] = file_art(path, src, keep)
    return arts


# ---------------------------------------------------------------- rendering and writing


def render_art(art: Art, sizes: Sequence[int], normalize_bbox: bool = False) -> dict[int, np.ndarray]:
    """Every size of one artwork; unreadable artwork is a DataError naming style, emoji and file."""
    try:
        if art.kind == "svg":
            return {s: emoji_render.render_svg(art.payload, s, normalize_bbox) for s in sizes}
        square = emoji_render.decode_raster(art.payload, normalize_bbox)
        return {s: emoji_render.render_raster(square, s) for s in sizes}
    except Exception as exc:  # resvg and PIL raise many types for corrupt input
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"style {art.style}, emoji {art.key}: cannot render {art.source} ({msg})") from exc


def select_emoji(cfg: DataConfig, arts: dict[str, dict[str, Art]], base: Emojibase,
                 emoji_keys: Sequence[str] | None) -> list[str]:
    """The emoji of the build: those every style draws, or exactly ``emoji_keys`` (all must exist)."""
    styles = list(cfg.styles)
    if emoji_keys is not None:
        keys = sorted({normalize_key(k) for k in emoji_keys})
        for key in keys:
            if key not in base.groups or base.groups[key] in cfg.drop_groups + EXCLUDED_GROUPS:
                raise DataError(f"emoji {key}: not a base emoji of a kept group (data.drop_groups)")
            missing = [s for s in styles if key not in arts[s]]
            if missing:
                raise DataError(f"emoji {key} ({base.labels.get(key, '?')}): no artwork in style(s) "
                                f"{', '.join(missing)}")
        return keys
    shared = sorted(set.intersection(*(set(arts[s]) for s in styles)))
    if not shared:
        raise DataError(f"data.styles: {', '.join(styles)} share no emoji")
    if cfg.max_emoji is not None and cfg.max_emoji > len(shared):
        raise DataError(f"data.max_emoji: {cfg.max_emoji} asked for, but {', '.join(styles)} "
                        f"share only {len(shared)} emoji")
    return shared[: cfg.max_emoji] if cfg.max_emoji else shared


def items_table(keys: list[str], cfg: DataConfig, arts: dict[str, dict[str, Art]],
                base: Emojibase) -> pa.Table:
    rows = [(key, base.labels[key], base.groups[key], style, STYLE_SOURCES[style].package.licence,
             arts[style][key].source, f"{style}/{key}.png")
            for style in sorted(cfg.styles) for key in keys]
    columns = {name: [row[i] for row in rows] for i, name in enumerate(ITEM_COLUMNS[1:])}
    schema = pa.schema([("item_id", pa.int64())] + [(name, pa.string()) for name in ITEM_COLUMNS[1:]])
    return pa.table({"item_id": np.arange(len(rows), dtype=np.int64), **columns}, schema=schema)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("resvg-py", "pillow", "emoji", "pyarrow")}


def fetch_dataset(cfg: DataConfig, out: Path, emoji_keys: Sequence[str] | None = None,
                  cache_root: Path | None = None) -> dict:
    """Build the raw dataset into ``out`` (replaced whole); return a summary of the build.

    ``cfg.cache_dir`` is relative to ``cache_root`` (default: the current folder). ``emoji_keys``
    selects exactly those emoji instead of the shared ones.
    """
    started = time.perf_counter()
    out = Path(out)
    cache_dir = Path(cfg.cache_dir)
    cache_dir = cache_dir if cache_dir.is_absolute() else Path(cache_root or Path.cwd()) / cache_dir
    styles = tuple(cfg.styles)
    packages = packages_for(styles)
    tarballs = ensure_tarballs(packages, cache_dir)
    base = read_emojibase(tarballs[EMOJIBASE.spec])
    known_groups = sorted(set(base.groups.values()))
    unknown = [g for g in cfg.drop_groups if g not in known_groups]
    if unknown:
        raise DataError(f"data.drop_groups: unknown group(s) {', '.join(unknown)} "
                        f"(known: {', '.join(known_groups)})")
    dropped = set(cfg.drop_groups) | set(EXCLUDED_GROUPS)
    keep = {k for k, group in base.groups.items() if group not in dropped}
    arts = collect_art(styles, tarballs, base, keep)
    keys = select_emoji(cfg, arts, base, emoji_keys)
    table = items_table(keys, cfg, arts, base)
    sizes = tuple(cfg.sizes)

    written = 0
    with atomic_dir(out) as tmp:
        with tqdm(total=len(styles) * len(keys) * len(sizes), desc="render", unit="img", mininterval=1.0) as bar:
            for style in sorted(styles):
                bar.set_postfix_str(style)
                for size in sizes:
                    (tmp / "images" / str(size) / style).mkdir(parents=True, exist_ok=True)
                for key in keys:
                    for size, image in render_art(arts[style][key], sizes, cfg.normalize_bbox).items():
                        data = png_bytes(image)
                        image_path(tmp, size, f"{style}/{key}.png").write_bytes(data)
                        written += len(data)
                        bar.update(1)
        pq.write_table(table, tmp / "items.parquet", compression="zstd", write_statistics=False)
        (tmp / "ATTRIBUTION.md").write_text(
            build_attribution(styles, sizes, cfg.normalize_bbox, base.licence), encoding="utf-8")
        groups = Counter(base.groups[k] for k in keys)
        manifest = {
            "source": "packages",
            "styles": sorted(styles),
            "sizes": list(sizes),
            "counts": {
                "emoji": len(keys),
                "items": table.num_rows,
                "images": table.num_rows * len(sizes),
                "groups": dict(sorted(groups.items())),
                "styles": {s: len(keys) for s in sorted(styles)},
                "available": {s: len(arts[s]) for s in sorted(styles)},  # before the intersection
            },
            "packages": {p.name: {"version": p.version, "integrity": p.integrity, "licence": p.licence}
                         for p in packages},
            "params": {"styles": list(styles), "sizes": list(sizes), "drop_groups": list(cfg.drop_groups),
                       "max_emoji": cfg.max_emoji, "normalize_bbox": cfg.normalize_bbox,
                       "emoji_keys": None if emoji_keys is None else keys},
            "renderer": _versions(),
            "hashes": content_hashes(tmp, sizes),
        }
        write_json(tmp / "manifest.json", manifest)
        size_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    return {"emoji": len(keys), "styles": len(styles), "images": table.num_rows * len(sizes),
            "bytes": size_bytes, "png_bytes": written, "seconds": round(time.perf_counter() - started, 2),
            "groups": dict(sorted(groups.items())), "out": str(out)}

