"""Emoji keys (one id per emoji across every vendor) and matching vendor icon names to them.

A key is the emoji's codepoint sequence in lower-case hex, leading zeros stripped, joined by ``-``,
with the variation selectors FE0F/FE0E removed: ``0023-FE0F-20E3`` → ``23-20e3``.

Iconify sets name icons with CLDR slugs (``grinning-face``). A set whose ``chars.json`` is empty is
matched by name through, in order: the other sets' ``chars.json`` (majority vote), the current CLDR
labels (emojibase), the ``emoji`` package's CLDR names, a short table of renamed CLDR labels, and
the ``emoji`` package's shortcode aliases. A name that two keys claim equally often is left unmatched.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

VARIATION_SELECTORS = frozenset({"fe0f", "fe0e"})
SKIN_TONES = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})
KEYCAP = "20e3"
_HEX = re.compile(r"^[0-9a-f]{1,6}$")

# Older CLDR labels some sets still use → the current label (same glyph, renamed by CLDR).
# "pistol" is left out on purpose: the old artwork is a gun, the current emoji a water pistol.
LEGACY_CLDR_NAMES = {
    "bear-face": "bear",
    "frog-face": "frog",
    "hamster-face": "hamster",
    "direct-hit": "bullseye",
    "laptop-computer": "laptop",
    "grinning-cat-face": "grinning cat",
    "grinning-cat-face-with-smiling-eyes": "grinning cat with smiling eyes",
    "cat-face-with-tears-of-joy": "cat with tears of joy",
    "smiling-cat-face-with-heart-eyes": "smiling cat with heart-eyes",
    "cat-face-with-wry-smile": "cat with wry smile",
    "kissing-cat-face": "kissing cat",
    "weary-cat-face": "weary cat",
    "pouting-cat-face": "pouting cat",
    "man-with-chinese-cap": "person with skullcap",
    "man-and-woman-holding-hands": "woman and man holding hands",
    "man-in-suit-levitating": "person in suit levitating",
    "heavy-large-circle": "hollow red circle",
    "white-heavy-check-mark": "check mark button",
}


def normalize_key(codepoints: str) -> str:
    """``"1F636-200D-1F32B-FE0F"``, ``"00a9"``, ``"1f600_1f3fb"`` → the emoji key; ValueError if not hex."""
    parts = [p for p in re.split(r"[-_\s]+", codepoints.strip().lower().removeprefix("u+")) if p]
    parts = [p.removeprefix("u+") for p in parts]
    if not parts or not all(_HEX.match(p) for p in parts):
        raise ValueError(f"not a codepoint sequence: {codepoints!r}")
    kept = [p.lstrip("0") or "0" for p in parts]
    kept = [p for p in kept if p not in VARIATION_SELECTORS]
    if not kept:
        raise ValueError(f"only variation selectors: {codepoints!r}")
    return "-".join(kept)


def key_of_text(text: str) -> str:
    """The key of an emoji given as text (``"😀"`` → ``"1f600"``)."""
    return normalize_key("-".join(f"{ord(ch):x}" for ch in text))


def text_of_key(key: str) -> str:
    return "".join(chr(int(p, 16)) for p in key.split("-"))


def is_base_key(key: str) -> bool:
    """No skin tone, no keycap, no regional-indicator flag and no tag sequence (subdivision flags)."""
    for part in key.split("-"):
        value = int(part, 16)
        if part in SKIN_TONES or part == KEYCAP:
            return False
        if 0x1F1E6 <= value <= 0x1F1FF or 0xE0020 <= value <= 0xE007F:
            return False
    return True


def name_slugs(name: str) -> tuple[str, ...]:
    """Slugs a CLDR label may appear as: accents folded (``pinata``) and dropped (``piata``), as
    icon sets do both; apostrophes vanish (``cote-divoire``); ``:smile_cat:`` → ``smile-cat``."""
    text = name.strip().strip(":").lower().replace("’", "").replace("'", "")
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    dropped = text.encode("ascii", "ignore").decode()
    slugs = []
    for variant in (folded, dropped):
        slug = re.sub(r"[^a-z0-9]+", "-", variant).strip("-")
        if slug and slug not in slugs:
            slugs.append(slug)
    return tuple(slugs)


class NameIndex:
    """Icon name → emoji key, through tiers of evidence tried in order (first tier that knows wins)."""

    def __init__(self, known_keys: Iterable[str]):
        self.known = frozenset(known_keys)
        self.tiers: list[tuple[str, dict[str, Counter]]] = []

    def add_tier(self, label: str, pairs: Iterable[tuple[str, str]]) -> NameIndex:
        """Add one tier from ``(name, key)`` pairs; keys outside ``known_keys`` are ignored."""
        votes: dict[str, Counter] = defaultdict(Counter)
        for name, key in pairs:
            if key in self.known:
                for slug in name_slugs(name):
                    votes[slug][key] += 1
        self.tiers.append((label, dict(votes)))
        return self

    def lookup(self, name: str) -> tuple[str | None, str | None]:
        """(key, tier label), or (None, None) when no tier knows the name or its best tier is tied."""
        slugs = name_slugs(name)
        slug = slugs[0] if slugs else ""
        for label, votes in self.tiers:
            counts = votes.get(slug)
            if counts:
                top = counts.most_common(2)
                if len(top) == 2 and top[0][1] == top[1][1]:
                    return None, None  # equal evidence for two emoji: do not guess
                return top[0][0], label
        return None, None

    def resolve(self, name: str) -> str | None:
        return self.lookup(name)[0]


def chars_pairs(chars: Mapping[str, str]) -> list[tuple[str, str]]:
    """``chars.json`` (codepoints → icon name) as ``(name, key)`` pairs; non-codepoint keys skipped."""
    pairs = []
    for codepoints, name in sorted(chars.items()):
        try:
            pairs.append((name, normalize_key(codepoints)))
        except ValueError:
            continue
    return pairs


def emoji_package_pairs(aliases: bool) -> list[tuple[str, str]]:
    """CLDR names (or, with ``aliases``, shortcode aliases) of the ``emoji`` package as (name, key)."""
    import emoji

    pairs = []
    for text, data in sorted(emoji.EMOJI_DATA.items()):
        key = key_of_text(text)
        names = data.get("alias", []) if aliases else [data["en"]]
        pairs.extend((name, key) for name in names)
    return pairs


def build_name_index(
    labels: Mapping[str, str], reference_chars: Iterable[Mapping[str, str]] = ()
) -> NameIndex:
    """The index used for icon names: ``labels`` is key → current CLDR label (emojibase)."""
    index = NameIndex(labels)
    chars_tier = [pair for chars in reference_chars for pair in chars_pairs(chars)]
    if chars_tier:
        index.add_tier("chars.json", chars_tier)
    index.add_tier("emojibase", [(label, key) for key, label in sorted(labels.items())])
    index.add_tier("emoji", emoji_package_pairs(aliases=False))
    label_to_key = {slug: key for key, label in sorted(labels.items()) for slug in name_slugs(label)}
    legacy = [(old, label_to_key[name_slugs(new)[0]]) for old, new in LEGACY_CLDR_NAMES.items()
              if name_slugs(new)[0] in label_to_key]
    index.add_tier("legacy-cldr", legacy)
    index.add_tier("emoji-alias", emoji_package_pairs(aliases=True))
    return index


def match_icons(
    icon_names: Iterable[str], own_chars: Mapping[str, str], index: NameIndex
) -> dict[str, str]:
    """Emoji key → icon name for one Iconify set.

    The set's own ``chars.json`` decides first; every other icon (aliases such as Fluent's mirrored
    hands, sets with an empty chars.json) is matched by name. When two names match one key, the one
    from the stronger tier wins, then the one listed first in ``icon_names`` (icons before aliases).
    """
    names = list(icon_names)
    present = set(names)
    matched: dict[str, str] = {}
    for name, key in chars_pairs(own_chars):
        if name in present and key in index.known:
            matched.setdefault(key, name)
    used = set(matched.values())
    tier_rank = {label: i for i, (label, _) in enumerate(index.tiers)}
    claims: dict[str, tuple[int, int, str]] = {}
    for order, name in enumerate(names):
        if name in used:
            continue
        key, tier = index.lookup(name)
        if key is None or key in matched:
            continue
        claim = (tier_rank[tier], order, name)
        if key not in claims or claim < claims[key]:
            claims[key] = claim
    matched.update({key: claim[2] for key, claim in claims.items()})
    return dict(sorted(matched.items()))
