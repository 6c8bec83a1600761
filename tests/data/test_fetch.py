"""``pigeon data fetch``: a real two-style build from the pinned tarballs, and its failure modes."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import numpy as np
import pytest

from pigeon.config import DataConfig
from pigeon.data import emoji_render
from pigeon.data.fetch import Art, Emojibase, fetch_dataset, render_art, select_emoji
from pigeon.data.raw import ITEM_COLUMNS, load_images, read_items
from pigeon.data.sources import STYLE_SOURCES
from pigeon.errors import DataError
from pigeon.io import read_json

STYLES = ("twemoji", "noto")
N_EMOJI = 6


def _config(cache: Path, **extra) -> DataConfig:
    return DataConfig(styles=STYLES, sizes=(32,), max_emoji=N_EMOJI, cache_dir=str(cache), **extra)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build from an empty cache: (cache folder, output folder, summary)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is needed to download the pinned packages")
    root = tmp_path_factory.mktemp("fetch")
    cache, out = root / "cache", root / "raw"
    summary = fetch_dataset(_config(cache), out)
    return cache, out, summary


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_fetch_builds_the_raw_format(built):
    cache, out, summary = built
    assert summary["emoji"] == N_EMOJI and summary["styles"] == 2 and summary["images"] == 2 * N_EMOJI
    items = read_items(out)
    assert tuple(items.columns) == ITEM_COLUMNS
    assert len(items) == 2 * N_EMOJI
    assert list(items["style"]) == sorted(items["style"])  # item_id follows (style, emoji_key)
    for style in STYLES:
        keys = items.loc[items["style"] == style, "emoji_key"].tolist()
        assert keys == sorted(keys) and len(set(keys)) == N_EMOJI
        assert set(items.loc[items["style"] == style, "licence"]) == {STYLE_SOURCES[style].package.licence}
    assert items["name"].str.len().min() > 0 and "symbols" not in set(items["group"])
    assert (items["file"] == items["style"] + "/" + items["emoji_key"] + ".png").all()
    assert items["source"].str.startswith("@iconify-json/").all()

    images = load_images(out, 32, items)  # decode_png checks mode and size of every file
    assert images.shape == (2 * N_EMOJI, 32, 32, 3)
    assert (images.reshape(len(items), -1).min(axis=1) < 200).all()  # every image draws something
    assert (images[:, 0, 0] == 255).all()  # white background in the corner
    # The same emoji in two vendor styles is drawn differently.
    assert not np.array_equal(images[:N_EMOJI], images[N_EMOJI:])

    attribution = (out / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for needle in ("Twemoji", "CC-BY-4.0", "Apache License", "Version 2.0, January 2004", "emojibase-data@17.0.0"):
        assert needle in attribution
    manifest = read_json(out / "manifest.json")
    assert manifest["counts"]["emoji"] == N_EMOJI and manifest["sizes"] == [32]
    assert set(manifest["packages"]) == {"@iconify-json/twemoji", "@iconify-json/noto", "emojibase-data"}
    assert sorted(p.name for p in cache.glob("*.tgz")) == [
        "emojibase-data-17.0.0.tgz", "iconify-json-noto-1.2.9.tgz", "iconify-json-twemoji-1.2.5.tgz"]


@pytest.mark.slow
def test_second_build_from_cache_is_byte_identical(built, tmp_path):
    cache, first, _ = built
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tgz")}
    second = tmp_path / "raw"
    fetch_dataset(_config(cache), second)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tgz")} == stamps  # reused, not fetched
    assert _tree(first) == _tree(second)
    _, mismatch, errors = filecmp.cmpfiles(first, second, _tree(first), shallow=False)
    assert mismatch == [] and errors == []


@pytest.mark.slow
def test_tampered_tarball_fails_and_keeps_previous_build(built, tmp_path):
    cache, first, _ = built
    bad_cache = tmp_path / "cache"
    shutil.copytree(cache, bad_cache)
    tarball = bad_cache / "iconify-json-twemoji-1.2.5.tgz"
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tarball.write_bytes(bytes(data))
    out = tmp_path / "raw"
    shutil.copytree(first, out)
    with pytest.raises(DataError, match=r"iconify-json-twemoji-1\.2\.5\.tgz: integrity mismatch"):
        fetch_dataset(_config(bad_cache), out)
    assert not tarball.exists()  # the bad file is removed, the next run downloads it again
    assert _tree(out) == _tree(first)  # the previous dataset is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw.")]  # no temp folder left


def _art(kind: str, payload) -> Art:
    return Art("twemoji", "1f600", "test-package@1.0.0:bad-file", kind, payload)


@pytest.mark.parametrize(
    ("kind", "payload", "why"),
    [
        ("svg", '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36"><path d="M0 0 L', "unexpected end"),
        ("svg", "", "no <svg> root"),
        ("svg", '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36"><path d="zzz"/></svg>', "blank"),
        ("raster", b"RIFF\x10\x00\x00\x00WEBPVP8 garbage", "decoder"),
    ],
)
def test_corrupt_artwork_is_a_data_error_naming_it(kind, payload, why):
    with pytest.raises(DataError, match=rf"^style twemoji, emoji 1f600: cannot render "
                                        rf"test-package@1\.0\.0:bad-file \(.*{why}"):
        render_art(_art(kind, payload), (32,))


def test_flip_and_non_square_viewbox():
    arrow = '<path fill="#000" d="M0 0h8v32H0z"/>'  # a bar on the left edge
    icon_set = {"width": 32, "height": 32, "icons": {"bar": {"body": arrow}, "tall": {"body": arrow, "height": 64}},
                "aliases": {"bar-right": {"parent": "bar", "hFlip": True}}}
    left = emoji_render.render_svg(emoji_render.iconify_svg(icon_set, "bar"), 32)
    right = emoji_render.render_svg(emoji_render.iconify_svg(icon_set, "bar-right"), 32)
    assert left[:, :8].max() < 10 and right[:, -8:].max() < 10
    np.testing.assert_array_equal(left[:, ::-1], right)
    tall = emoji_render.render_svg(emoji_render.iconify_svg(icon_set, "tall"), 32)
    assert tall.shape == (32, 32, 3)  # 32×64 viewBox centred on a square canvas, aspect kept
    assert tall[4, 8:12].max() < 10 and tall[4, 4].min() > 240  # bar is 4 px wide, 8 px from the edge


def test_normalize_bbox_fills_the_canvas():
    svg = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><circle cx="6" cy="6" r="4"/></svg>'
    plain = emoji_render.render_svg(svg, 64)
    filled = emoji_render.render_svg(svg, 64, normalize_bbox=True)
    assert (plain < 128).any(axis=2).sum() < 0.1 * 64 * 64
    drawn = np.flatnonzero((filled < 128).any(axis=2).any(axis=0))
    assert drawn[0] <= 4 and drawn[-1] >= 59  # content spans the canvas up to the margin


def test_selection_errors_name_the_missing_emoji():
    base = Emojibase(labels={"1f600": "grinning face", "1f408": "cat", "2764": "red heart"},
                     groups={"1f600": "smileys-emotion", "1f408": "animals-nature", "2764": "smileys-emotion"},
                     licence="")
    arts = {"twemoji": {"1f600": _art("svg", ""), "1f408": _art("svg", "")}, "noto": {"1f600": _art("svg", "")}}
    cfg = DataConfig(styles=STYLES)
    assert select_emoji(cfg, arts, base, None) == ["1f600"]
    with pytest.raises(DataError, match=r"^emoji 1f408 \(cat\): no artwork in style\(s\) noto$"):
        select_emoji(cfg, arts, base, ["1F600", "1f408"])
    with pytest.raises(DataError, match=r"^data\.max_emoji: 2 asked for, but twemoji, noto share only 1 emoji$"):
        select_emoji(DataConfig(styles=STYLES, max_emoji=2), arts, base, None)
    with pytest.raises(DataError, match=r"^emoji 1f1fa-1f1f8: not a base emoji"):
        select_emoji(cfg, arts, base, ["1f1fa-1f1f8"])
