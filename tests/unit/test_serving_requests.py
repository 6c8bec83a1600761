"""Request parsing of the serving path: valid requests parse, anything else is one clear InvalidRequest."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pigeon.serving import InvalidRequest, RequestLimits, parse_request, request_rows

H, S = 5, 32
LIMITS = RequestLimits()


def png(width=S, height=S, mode="RGB", color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color if mode != "L" else 128).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request(**changes) -> dict:
    out = {"history": [b64(png(color=(10 * i, 0, 0))) for i in range(H)], "reference": b64(png()),
           "caption": "grinning face"}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not ...}


def parse(payload, limits=LIMITS):
    return parse_request(payload, history_len=H, image_size=S, limits=limits)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels, with almost no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_valid_request_parses_to_model_sized_images():
    parsed = parse(request(alpha_ref=0.25, seed=7, caption="  grinning \n face "))
    assert parsed.history.shape == (H, S, S, 3) and parsed.history.dtype == np.uint8
    assert parsed.reference.shape == (S, S, 3)
    assert parsed.history[3, 0, 0].tolist() == [30, 0, 0]  # images kept in order
    assert (parsed.caption, parsed.alpha_ref, parsed.seed) == ("grinning face", 0.25, 7)


def test_defaults_json_text_data_urls_and_jpeg():
    payload = request(reference="data:image/png;base64," + b64(png(64, 64)))
    payload["history"][0] = b64(png(fmt="JPEG"))
    parsed = parse(json.dumps(payload).encode())
    assert parsed.alpha_ref is None and parsed.seed == 0 and parsed.reference.shape == (S, S, 3)


def test_transparency_goes_on_white_and_non_square_is_padded():
    parsed = parse(request(reference=b64(png(mode="RGBA", color=(0, 0, 0, 0))),
                           history=[b64(png(40, 10, color=(0, 0, 0)))] * H))
    assert (parsed.reference == 255).all()
    assert (parsed.history[0, 0] == 255).all() and (parsed.history[0, S // 2] == 0).all()


def test_dataframe_rows_with_absent_optionals_parse():
    frame = pd.DataFrame([request(alpha_ref=0.5, seed=3), request(alpha_ref=None, seed=None)])
    rows = request_rows(frame)
    parsed = [parse(row) for row in rows]
    assert parsed[0].seed == 3 and parsed[1].alpha_ref is None and parsed[1].seed == 0
    with pytest.raises(InvalidRequest, match="at most 8"):
        request_rows(pd.concat([frame] * 5))


BAD = {
    "not an object": ([1, 2], "JSON object"),
    "malformed JSON": ('{"history": [', "not valid JSON"),
    "missing caption": (request(caption=...), "missing required field.*caption"),
    "unknown field": (request(style="noto"), "unknown field.*'style'"),
    "too few history": (request(history=[b64(png())] * 4), "exactly 5 images; got 4"),
    "too many history": (request(history=[b64(png())] * 6), "exactly 5 images; got 6"),
    "history not a list": (request(history=b64(png())), "'history' must be a list"),
    "history item not str": (request(history=[b64(png())] * 4 + [3]), r"'history\[4\]' must be a base64"),
    "bad base64": (request(reference="@@not base64@@"), "'reference' is not valid base64"),
    "non-ascii base64": (request(reference="ü" * 8), "'reference' is not valid base64"),
    "not an image": (request(reference=b64(b"hello, this is text")), "not a PNG or JPEG"),
    "gif not accepted": (request(reference=b64(png(fmt="GIF"))), "not a PNG or JPEG"),
    "truncated png": (request(reference=b64(png(mode="RGB", color=(1, 2, 3))[:60])), "reference"),
    "bomb header": (request(reference=b64(png_header_only(100_000, 100_000))), "pixels"),
    "empty caption": (request(caption=" \n "), "'caption' is empty"),
    "caption too long": (request(caption="a" * 201), "at most 200"),
    "caption not str": (request(caption=5), "'caption' must be a string"),
    "alpha too big": (request(alpha_ref=1.5), r"'alpha_ref' must be in \[0, 1\]"),
    "alpha negative": (request(alpha_ref=-0.1), r"'alpha_ref' must be in \[0, 1\]"),
    "alpha infinite": (request(alpha_ref=float("inf")), "alpha_ref"),
    "alpha str": (request(alpha_ref="0.5"), "'alpha_ref' must be a number"),
    "alpha bool": (request(alpha_ref=True), "'alpha_ref' must be a number"),
    "seed negative": (request(seed=-1), "'seed' must be in"),
    "seed fraction": (request(seed=1.5), "'seed' must be an integer"),
    "seed huge": (request(seed=2**64), "'seed' must be in"),
    "seed str": (request(seed="3"), "'seed' must be an integer"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_requests_raise_one_clear_error(name):
    payload, message = BAD[name]
    with pytest.raises(InvalidRequest, match=message) as err:
        parse(payload)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_oversized_bytes_are_refused_before_base64_decoding():
    big = b64(png(64, 64)) + "A" * 4000
    with pytest.raises(InvalidRequest, match="larger than 1000 bytes"):
        parse(request(reference=big), RequestLimits(max_image_bytes=1000))


def test_decompression_bomb_is_refused_before_any_pixel_is_decoded(monkeypatch):
    bomb = io.BytesIO()
    Image.new("L", (2000, 2000), 255).save(bomb, format="PNG")  # 4 Mpx in a few kB
    assert len(bomb.getvalue()) < 20_000
    payload = request(history=[b64(bomb.getvalue())] + request()["history"][1:])

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(InvalidRequest, match=r"'history\[0\]' is 2000x2000 pixels; at most 1048576"):
        parse(payload)


# --- properties ------------------------------------------------------------------------------------

images = st.builds(
    lambda w, h, mode, seed: png(w, h, mode, color={"RGB": (seed, 255 - seed, 7), "RGBA": (seed, 0, 0, seed),
                                                    "L": seed, "P": seed}[mode]),
    st.integers(1, 80), st.integers(1, 80), st.sampled_from(["RGB", "RGBA", "L", "P"]), st.integers(0, 255))
captions = st.text(min_size=1, max_size=60).filter(lambda s: s.strip())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=st.lists(images, min_size=H, max_size=H), reference=images, caption=captions,
       alpha=st.none() | st.floats(0.0, 1.0), seed=st.integers(0, 2**63 - 1))
def test_any_valid_request_parses(history, reference, caption, alpha, seed):
    parsed = parse({"history": [b64(x) for x in history], "reference": b64(reference), "caption": caption,
                    "alpha_ref": alpha, "seed": seed})
    assert parsed.history.shape == (H, S, S, 3) and parsed.reference.shape == (S, S, 3)
    assert parsed.caption == " ".join(caption.split()) and parsed.seed == seed and parsed.alpha_ref == alpha


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
field_junk = json_junk | st.binary(max_size=200).map(b64) | images.map(b64) | st.lists(
    images.map(b64) | st.binary(max_size=64).map(b64), min_size=0, max_size=7)
junk_requests = (
    json_junk
    | st.binary(max_size=300)
    | st.text(max_size=300)
    | st.fixed_dictionaries({}, optional={k: field_junk for k in ("history", "reference", "caption",
                                                                  "alpha_ref", "seed", "extra")})
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=junk_requests)
def test_junk_never_crashes_with_anything_but_invalid_request(payload):
    try:
        parse(payload)
    except InvalidRequest as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_image_bytes_never_crash(data):
    raw = bytearray(png(24, 24, "RGB", (9, 99, 199)))
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    try:
        parsed = parse(request(reference=b64(bytes(raw[:cut]))))
    except InvalidRequest as exc:
        assert "reference" in str(exc)
    else:
        assert parsed.reference.shape == (S, S, 3)
