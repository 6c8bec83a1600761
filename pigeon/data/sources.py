"""The pinned package tarballs the raw dataset is built from (docs/design.md §7), one row per style.

Every tarball is checked against its ``integrity`` (the registry's ``dist.integrity``, sha512) before
it is read, so a build either uses exactly these bytes or fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How a package holds its artwork: an Iconify JSON set (``icons.json`` + ``chars.json``), plain SVG
# files named by codepoints, or WebP files named by codepoints.
ArtFormat = Literal["iconify", "svg-files", "webp-files"]


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    integrity: str
    licence: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball_name(self) -> str:
        """The file name ``npm pack`` gives this package (``@scope/name`` → ``scope-name-VERSION.tgz``)."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


@dataclass(frozen=True)
class StyleSource:
    style: str
    package: Package
    format: ArtFormat
    credit: str  # who drew the artwork, as the licence asks to credit them
    homepage: str
    member_prefix: str = "package/"  # where the artwork lives inside the tarball
    has_chars: bool = True  # Iconify sets whose chars.json is empty are matched by icon name


def _iconify(style: str, version: str, integrity: str, licence: str, credit: str, homepage: str,
             has_chars: bool = True) -> StyleSource:
    package = Package(f"@iconify-json/{style}", version, integrity, licence)
    return StyleSource(style, package, "iconify", credit, homepage, has_chars=has_chars)


MICROSOFT = "Microsoft Corporation (Fluent Emoji)"
FLUENT_HOME = "https://github.com/microsoft/fluentui-emoji"
OPENMOJI = "OpenMoji – the open-source emoji and icon project, HfG Schwäbisch Gmünd"
NOTO_HOME = "https://github.com/googlefonts/noto-emoji"
EMOJIONE_HOME = "https://github.com/EmojiTwo/emojitwo"

STYLE_SOURCES: dict[str, StyleSource] = {
    s.style: s
    for s in (
        _iconify(
            "twemoji", "1.2.5",
            "sha512-uKpuIEV0v6K5BW3Mjdyl+XKFVAbbcPxAgifKvEMtZoUZB5+YiY5zaMm2uNNCxyXzAWU9yNLlj41WU6/mvgALsw==",
            "CC-BY-4.0", "Twitter, Inc. and other contributors (Twemoji)", "https://github.com/jdecked/twemoji"),
        _iconify(
            "noto", "1.2.9",
            "sha512-DQiuXENbun41ch+XPSV55H9FaWKpHTyz46YIKtSaKYD4fIDDzL1tR6H4np/T38jfrTAeI3rcKF0mqHYeZVAuaw==",
            "Apache-2.0", "Google Inc. (Noto Emoji)", NOTO_HOME),
        _iconify(
            "noto-v1", "1.2.5",
            "sha512-/DsVMius69Q0fRS53z7QK1TROSuar606jiIx+laXtdsYGMXpf6LtHBx6CGfoo3UHHb/XpBsw+1L1x3eyPqMuVA==",
            "Apache-2.0", "Google Inc. (Noto Emoji, version 1)", NOTO_HOME, has_chars=False),
        _iconify(
            "openmoji", "1.2.29",
            "sha512-vXdhkqcXVSO6suy+m9LbcUM3OdVyuNOtpV8/als/WqfkQIRxevL5Geb/g+6GH/Qwnq1OqksEmaDGTCmZ5nFKJQ==",
            "CC-BY-SA-4.0", OPENMOJI, "https://openmoji.org/"),
        StyleSource(
            "openmoji-black",
            Package(
                "openmoji", "17.0.0",
                "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
                "CC-BY-SA-4.0"),
            "svg-files", OPENMOJI, "https://openmoji.org/", member_prefix="package/black/svg/"),
        _iconify(
            "fluent-emoji-flat", "1.2.6",
            "sha512-RY47RgPb47fYUiyrA64sIOL0+UU02s29sXpNBbIQRBUlPlfNFTKUmZDERGuxDs/7yNGWqQYvuaSYM1M4fRXlUw==",
            "MIT", MICROSOFT, FLUENT_HOME),
        _iconify(
            "fluent-emoji-high-contrast", "1.2.6",
            "sha512-esqhZPpkrF7sNX3NsLoh8KW64okEr/bzko7WNnFP+qTJGAqDPDYjp0925yxuivXy3HtVQB8xhIKu3+Nq1byX5w==",
            "MIT", MICROSOFT, FLUENT_HOME),
        StyleSource(
            "fluent-3d",
            Package(
                "@lobehub/fluent-emoji-3d", "1.1.0",
                "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==",
                "MIT"),
            "webp-files", MICROSOFT + ", packaged by LobeHub", FLUENT_HOME, member_prefix="package/assets/"),
        _iconify(
            "emojione", "1.2.3",
            "sha512-T9+T3HIbJNLKKsmxYKlaYhvnHYkz/HNYTV7SHCXVZPfeUi4FqskY70YeN8yYAZT8cCv7w5vJxS4Q1m8zb9CMMg==",
            "CC-BY-4.0", "Emoji One", EMOJIONE_HOME, has_chars=False),
        _iconify(
            "emojione-monotone", "1.2.1",
            "sha512-cZSNcPsuiAD6HCzCh/2dYKGh3pNI0jJlxBxQWfC33cQsPtqYZqulGBvlkThXYNvDl8VxgVHT9u+izyX/yeEIkA==",
            "CC-BY-4.0", "Emoji One", EMOJIONE_HOME, has_chars=False),
    )
}

# CLDR labels and Unicode groups of every emoji (names and groups of the items table).
EMOJIBASE = Package(
    "emojibase-data", "17.0.0",
    "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==", "MIT",
)
EMOJIBASE_LABELS = "package/en/compact.json"
EMOJIBASE_GROUPS = "package/meta/groups.json"
EMOJIBASE_LICENCE = "package/LICENSE"

# Sets whose chars.json names the emoji: the reference for matching sets without one, by icon name.
NAME_REFERENCE_STYLES: tuple[str, ...] = tuple(
    s.style for s in STYLE_SOURCES.values() if s.format == "iconify" and s.has_chars
)

LICENCE_URLS = {
    "CC-BY-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "CC-BY-SA-4.0": "https://creativecommons.org/licenses/by-sa/4.0/",
    "Apache-2.0": "https://www.apache.org/licenses/LICENSE-2.0",
    "MIT": "https://opensource.org/license/mit",
}


def packages_for(styles: tuple[str, ...]) -> list[Package]:
    """Packages a build of ``styles`` reads, each once, in a fixed order."""
    wanted = [STYLE_SOURCES[s].package for s in styles]
    if any(not STYLE_SOURCES[s].has_chars for s in styles):
        wanted += [STYLE_SOURCES[s].package for s in NAME_REFERENCE_STYLES]
    wanted.append(EMOJIBASE)
    seen: dict[str, Package] = {}
    for package in wanted:
        seen.setdefault(package.spec, package)
    return sorted(seen.values(), key=lambda p: p.spec)
