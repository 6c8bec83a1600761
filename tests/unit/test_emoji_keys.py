"""Emoji keys and cross-set name matching (no network, no tarballs)."""

from __future__ import annotations

import pytest

from pigeon.data.emoji_keys import (
    NameIndex,
    build_name_index,
    is_base_key,
    key_of_text,
    match_icons,
    name_slugs,
    normalize_key,
    text_of_key,
)


@pytest.mark.parametrize(
    ("codepoints", "key"),
    [
        ("1F600", "1f600"),
        ("00A9", "a9"),
        ("0023-FE0F-20E3", "23-20e3"),
        ("1F636-200D-1F32B-FE0F", "1f636-200d-1f32b"),
        ("2764-fe0e", "2764"),
        ("1f468_200d_1f469", "1f468-200d-1f469"),
        (" 1f3f3-FE0F-200D-1F308 ", "1f3f3-200d-1f308"),
        ("0030", "30"),
    ],
)
def test_normalize_key(codepoints, key):
    assert normalize_key(codepoints) == key
    assert normalize_key(key) == key  # idempotent


@pytest.mark.parametrize("bad", ["", "grinning-face", "1f600-zz", "FE0F", "1234567"])
def test_normalize_key_rejects_non_codepoints(bad):
    with pytest.raises(ValueError):
        normalize_key(bad)


def test_key_of_text_round_trip():
    assert key_of_text("😀") == "1f600"
    assert key_of_text("❤️") == "2764"  # FE0F dropped
    assert key_of_text("👩‍🚀") == "1f469-200d-1f680"
    assert key_of_text(text_of_key("1f469-200d-1f680")) == "1f469-200d-1f680"


@pytest.mark.parametrize(
    ("key", "base"),
    [
        ("1f600", True),
        ("1f469-200d-1f680", True),
        ("1f44b-1f3fb", False),  # skin tone
        ("1f469-1f3ff-200d-1f680", False),
        ("23-20e3", False),  # keycap
        ("1f1fa-1f1f8", False),  # regional-indicator flag
        ("1f3f4-e0067-e0062-e0065-e006e-e0067-e007f", False),  # tag sequence
    ],
)
def test_is_base_key(key, base):
    assert is_base_key(key) is base


def test_name_slugs_cover_icon_set_spellings():
    assert name_slugs("grinning face") == ("grinning-face",)
    assert name_slugs("piñata") == ("pinata", "piata")  # accents folded, or dropped as some sets do
    assert name_slugs("flag: Côte d’Ivoire")[0] == "flag-cote-divoire"
    assert name_slugs(":smile_cat:") == ("smile-cat",)
    assert name_slugs("smiling cat with heart-eyes") == ("smiling-cat-with-heart-eyes",)


def test_name_index_tiers_votes_and_ties():
    index = NameIndex(["1f431", "1f408", "1f621", "1f64e"])
    index.add_tier("first", [("cat", "1f408"), ("pouting-face", "1f621"), ("pouting-face", "1f621"),
                             ("pouting-face", "1f64e"), ("keyboard", "e1d1")])
    index.add_tier("second", [("cat", "1f431"), ("cat-face", "1f431"), ("tied", "1f431"), ("x", "1f408")])
    index.add_tier("third", [("tied", "1f408")])
    assert index.lookup("cat") == ("1f408", "first")  # the first tier that knows a name decides
    assert index.lookup("Cat Face") == ("1f431", "second")
    assert index.resolve("pouting-face") == "1f621"  # majority of the tier's votes
    assert index.resolve("keyboard") is None  # keys outside the known set are ignored
    assert index.resolve("nothing") is None
    tie = NameIndex(["1f431", "1f408"]).add_tier("t", [("cat", "1f431"), ("cat", "1f408")])
    tie.add_tier("later", [("cat", "1f431")])
    assert tie.resolve("cat") is None  # equal evidence: no guess, not even from a later tier


LABELS = {
    "1f43b": "bear",
    "1f63a": "grinning cat",
    "1f621": "enraged face",
    "1f64e": "person pouting",
    "1f635": "face with crossed-out eyes",
    "1f52b": "water pistol",
    "1f449": "backhand index pointing right",
    "1f448": "backhand index pointing left",
    "1f600": "grinning face",
}


def test_build_name_index_matches_old_and_new_names():
    reference = [{"1f621": "pouting-face"}, {"1f621": "pouting-face"}, {"1f64e": "pouting-face"}]
    index = build_name_index(LABELS, reference)
    assert index.lookup("pouting-face") == ("1f621", "chars.json")
    assert index.lookup("grinning-face") == ("1f600", "emojibase")
    assert index.lookup("bear-face") == ("1f43b", "legacy-cldr")
    assert index.lookup("grinning-cat-face") == ("1f63a", "legacy-cldr")
    assert index.lookup("dizzy-face") == ("1f635", "emoji-alias")
    assert index.resolve("pistol") is None  # the old gun artwork is not the water pistol


def test_match_icons_own_chars_first_then_names():
    index = build_name_index(LABELS)
    names = ["backhand-index-pointing-left", "grinning", "grinning-face", "smiley", "backhand-index-pointing-right"]
    own = {"1f448": "backhand-index-pointing-left", "1f600": "grinning", "00a9": "not-in-set"}
    matched = match_icons(names, own, index)
    assert matched == {
        "1f448": "backhand-index-pointing-left",
        "1f449": "backhand-index-pointing-right",  # a mirrored alias, found by name
        "1f600": "grinning",  # chars.json wins over the name match of "grinning-face"
    }


def test_match_icons_prefers_stronger_tier_then_first_listed():
    index = build_name_index(LABELS)
    # "grinning-face" (emojibase tier) beats ":grinning:" (alias tier) though listed later
    assert match_icons(["grinning", "grinning-face"], {}, index) == {"1f600": "grinning-face"}
    # two names of the same tier: the one listed first (icons before aliases) wins
    labels = LABELS | {"1f63a": "grinning cat"}
    index = NameIndex(labels).add_tier("t", [("a", "1f63a"), ("b", "1f63a")])
    assert match_icons(["b", "a"], {}, index) == {"1f63a": "b"}
