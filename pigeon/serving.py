"""Serving: strict request parsing, the generator behind it, and the MLflow pyfunc model.

A request is one JSON object (or one DataFrame row):

```
{"history":   ["<base64 PNG>", ...],   # exactly model.history_len images
 "reference": "<base64 PNG>",
 "caption":   "grinning face",
 "alpha_ref": 0.5,                      # optional, in [0, 1] (default: evaluate.alpha_ref)
 "seed":      0}                        # optional, integer >= 0
```

The answer is one base64 PNG per request. Every malformed request raises :class:`InvalidRequest`
(a one-line message naming the field); the pyfunc turns it into MLflow's INVALID_PARAMETER_VALUE,
which ``mlflow models serve`` answers with HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pigeon.errors import PigeonError
from pigeon.pixels import to_pixels, to_uint8

REQUIRED_FIELDS = ("history", "reference", "caption")
OPTIONAL_FIELDS = ("alpha_ref", "seed")
ACCEPTED_FORMATS = ("PNG", "JPEG")
_DATA_URL = re.compile(r"^data:image/[a-z]+;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


class InvalidRequest(PigeonError, ValueError):
    """A generation request that does not follow the documented format or limits."""


@dataclass(frozen=True)
class RequestLimits:
    max_image_bytes: int = 1 << 20  # decoded bytes per image
    max_image_pixels: int = 1 << 20  # width × height per image, checked before decoding
    max_caption_chars: int = 200
    max_requests: int = 8  # rows per predict call
    max_seed: int = 2**63 - 1


@dataclass
class GenerationRequest:
    history: np.ndarray  # [H, S, S, 3] uint8
    reference: np.ndarray  # [S, S, 3] uint8
    caption: str
    alpha_ref: float | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)


# --- request parsing (pure) -------------------------------------------------------------------


def parse_request(payload: Any, history_len: int, image_size: int,
                  limits: RequestLimits = RequestLimits()) -> GenerationRequest:
    """Validate one request (a dict, or a JSON object as str/bytes) → decoded, resized images."""
    if isinstance(payload, (str, bytes, bytearray)):
        try:
            payload = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidRequest(f"request is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise InvalidRequest(f"request must be a JSON object with fields {', '.join(REQUIRED_FIELDS)}; "
                             f"got {type(payload).__name__}")
    unknown = sorted(str(k) for k in payload if k not in REQUIRED_FIELDS + OPTIONAL_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])} "
                             f"(allowed: {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})")
    missing = [k for k in REQUIRED_FIELDS if _is_missing(payload.get(k))]
    if missing:
        raise InvalidRequest(f"missing required field(s): {', '.join(missing)}")

    history = payload["history"]
    if isinstance(history, np.ndarray):
        history = history.tolist() if history.ndim == 1 else None
    if not isinstance(history, (list, tuple)):
        raise InvalidRequest(f"field 'history' must be a list of {history_len} base64 images; "
                             f"got {type(payload['history']).__name__}")
    if len(history) != history_len:
        raise InvalidRequest(f"field 'history' must hold exactly {history_len} images; got {len(history)}")
    history_images = np.stack([decode_image(item, f"history[{i}]", image_size, limits)
                               for i, item in enumerate(history)])
    reference = decode_image(payload["reference"], "reference", image_size, limits)
    return GenerationRequest(
        history=history_images,
        reference=reference,
        caption=_caption(payload["caption"], limits),
        alpha_ref=_alpha_ref(payload.get("alpha_ref")),
        seed=_seed(payload.get("seed"), limits),
    )


def _is_missing(value: Any) -> bool:
    # A DataFrame fills an absent optional column with NaN/None/NA.
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    return isinstance(value, float) and math.isnan(value)


def _caption(value: Any, limits: RequestLimits) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"field 'caption' must be a string; got {type(value).__name__}")
    caption = " ".join(value.split())
    if not caption:
        raise InvalidRequest("field 'caption' is empty")
    if len(caption) > limits.max_caption_chars:
        raise InvalidRequest(f"field 'caption' is {len(caption)} characters; at most "
                             f"{limits.max_caption_chars} allowed")
    return caption


def _alpha_ref(value: Any) -> float | None:
    if _is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidRequest(f"field 'alpha_ref' must be a number in [0, 1]; got {type(value).__name__}")
    alpha = float(value)
    if not 0.0 <= alpha <= 1.0:
        raise InvalidRequest(f"field 'alpha_ref' must be in [0, 1]; got {alpha}")
    return alpha


def _seed(value: Any, limits: RequestLimits) -> int:
    if _is_missing(value):
        return 0
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidRequest(f"field 'seed' must be an integer >= 0; got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        seed = int(value)
    elif math.isfinite(float(value)) and float(value).is_integer():  # DataFrames turn int columns to float
        seed = int(float(value))
    else:
        raise InvalidRequest(f"field 'seed' must be an integer >= 0; got {value!r}")
    if not 0 <= seed <= limits.max_seed:
        raise InvalidRequest(f"field 'seed' must be in [0, {limits.max_seed}]; got {seed}")
    return seed


def decode_image(value: Any, name: str, image_size: int, limits: RequestLimits = RequestLimits()) -> np.ndarray:
    """base64 PNG/JPEG → [S, S, 3] uint8 (transparency on white, padded square, resized)."""
    from PIL import Image

    if not isinstance(value, str):
        raise InvalidRequest(f"field {name!r} must be a base64 string; got {type(value).__name__}")
    text = _DATA_URL.sub("", value, count=1)
    if len(text) > (limits.max_image_bytes * 4) // 3 + 64:  # refuse before decoding anything
        raise InvalidRequest(f"field {name!r} is larger than {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(_WHITESPACE.sub(b"", text.encode("ascii")), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise InvalidRequest(f"field {name!r} is not valid base64") from None
    if not raw:
        raise InvalidRequest(f"field {name!r} is empty")
    if len(raw) > limits.max_image_bytes:
        raise InvalidRequest(f"field {name!r} is {len(raw)} bytes; at most {limits.max_image_bytes} allowed")
    try:
        img = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        raise InvalidRequest(f"field {name!r} has too many pixels (decompression bomb)") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for foreign or corrupt data
        raise InvalidRequest(f"field {name!r} is not a PNG or JPEG image") from None
    with img:
        width, height = img.size
        # Size from the header, before any pixel is decoded (decompression bombs stop here).
        if width < 1 or height < 1 or width * height > limits.max_image_pixels:
            raise InvalidRequest(f"field {name!r} is {width}x{height} pixels; at most "
                                 f"{limits.max_image_pixels} pixels allowed")
        try:
            img.load()
            return _to_square_rgb(img, image_size)
        except InvalidRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - decoding errors of any PIL plugin
            raise InvalidRequest(f"field {name!r}: cannot decode image ({type(exc).__name__})") from None


def _to_square_rgb(img, size: int) -> np.ndarray:
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))  # dataset images are drawn on white
    else:
        img = img.convert("RGB")
    if img.width != img.height:
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def request_rows(model_input: Any, limits: RequestLimits = RequestLimits()) -> list[dict]:
    """A pyfunc input (DataFrame, dict, list of dicts, JSON text) → request dicts."""
    if isinstance(model_input, (str, bytes, bytearray)):
        try:
            model_input = json.loads(model_input)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidRequest(f"request is not valid JSON ({type(exc).__name__})") from None
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, list):
        rows = model_input
    else:
        raise InvalidRequest(f"unsupported input type {type(model_input).__name__}")
    if not rows:
        raise InvalidRequest("no request rows")
    if len(rows) > limits.max_requests:
        raise InvalidRequest(f"{len(rows)} requests in one call; at most {limits.max_requests} allowed")
    return rows


def png_base64(image: np.ndarray) -> str:
    from pigeon.data.raw import png_bytes

    return base64.b64encode(png_bytes(image)).decode("ascii")


def file_base64(path: str | Path) -> str:
    path = Path(path)
    try:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise PigeonError(f"{path}: cannot read image ({exc.strerror or exc})") from None


# --- generation -------------------------------------------------------------------------------


class PigeonGenerator:
    """A loaded Pigeon model answering parsed requests; used by the pyfunc and ``pigeon generate``."""

    def __init__(self, params, ws, weights: str = "dpo", device: str | None = None):
        from pigeon.artifacts import load_pigeon
        from pigeon.runtime import resolve_device

        self.params = params
        self.device = resolve_device(device or "auto")
        self.model = load_pigeon(params, ws, weights, self.device).eval()
        self.history_len = params.model.history_len
        self.image_size = params.backbone.image_size

    def parse(self, payload: Any, limits: RequestLimits = RequestLimits()) -> GenerationRequest:
        return parse_request(payload, self.history_len, self.image_size, limits)

    def generate(self, request: GenerationRequest) -> np.ndarray:
        """One request → one [S, S, 3] uint8 image, deterministic under ``request.seed``."""
        import torch

        from pigeon.models.personalization import reference_view
        from pigeon.models.types import WindowBatch
        from pigeon.runtime import autocast

        backbone = self.model.backbone
        # the reference enters as its style-stripped view, as in training and evaluation
        images = np.concatenate([request.history, reference_view(request.reference[None])])
        pixels = to_pixels(images, self.device)
        with torch.no_grad():
            codes = backbone.encode_images(pixels).long()
            caption_ids, caption_mask = backbone.tokenize_captions(
                [request.caption], self.params.backbone.lm.max_caption_tokens)
            batch = WindowBatch(
                history_codes=codes[: self.history_len].unsqueeze(0),
                reference_codes=codes[self.history_len:],
                caption_ids=caption_ids.to(self.device),
                caption_mask=caption_mask.to(self.device),
                target_codes=None,
            )
            alpha_ref = self.params.evaluate.alpha_ref if request.alpha_ref is None else request.alpha_ref
            with autocast(self.device):
                out = self.model.generate(batch, alpha_ref=alpha_ref, num_samples=1,
                                          sampling=self.params.evaluate.sampling, seed=request.seed)
            image = self.model.decode_generated(out, batch, self.params.evaluate.style_strength).float()[0]
        return to_uint8(image[None])[0]


# --- MLflow pyfunc ----------------------------------------------------------------------------

MODEL_ARTIFACT = "workspace"  # artifact folder: params.yaml + models/<foundation, dpo>


class PigeonPyfunc(mlflow.pyfunc.PythonModel):
    """``predict`` takes request rows and returns one base64 PNG per row."""

    def load_context(self, context) -> None:
        import yaml

        from pigeon.config import params_from_dict
        from pigeon.paths import Workspace
        from pigeon.runtime import setup_torch

        root = Path(context.artifacts[MODEL_ARTIFACT])
        params = params_from_dict(yaml.safe_load((root / "params.yaml").read_text()), str(root / "params.yaml"))
        setup_torch(params.threads)
        self.generator = PigeonGenerator(params, Workspace.at(root), weights="dpo")

    # The DataFrame hint only silences MLflow's type-hint notice: the signature below governs the input.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from mlflow.exceptions import MlflowException

        try:
            requests = [self.generator.parse(row) for row in request_rows(model_input)]
        except InvalidRequest as exc:
            # INVALID_PARAMETER_VALUE: the scoring server answers 400 with this message.
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return [png_base64(self.generator.generate(request)) for request in requests]


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    inputs = Schema([
        ColSpec(Array(DataType.string), "history"),
        ColSpec(DataType.string, "reference"),
        ColSpec(DataType.string, "caption"),
        ColSpec(DataType.double, "alpha_ref", required=False),
        ColSpec(DataType.long, "seed", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(DataType.string)]))


def example_request(images: list[np.ndarray], caption: str, alpha_ref: float = 0.5, seed: int = 0) -> dict:
    """A request built from uint8 images (the last one is the reference)."""
    encoded = [png_base64(image) for image in images]
    return {"history": encoded[:-1], "reference": encoded[-1], "caption": caption,
            "alpha_ref": float(alpha_ref), "seed": int(seed)}


def generate_file(params, ws, history: list[str], reference: str, caption: str, out: str | Path,
                  model_uri: str | None = None, alpha_ref: float | None = None, seed: int = 0) -> dict:
    """``pigeon generate``: image files in, one PNG out; the model comes from MLflow (``model_uri``,
    e.g. ``models:/pigeon@champion``) or, without one, from the workspace's ``models/dpo``."""
    from pigeon.io import atomic_write_bytes

    request = {"history": [file_base64(p) for p in history], "reference": file_base64(reference),
               "caption": caption, "seed": int(seed)}
    if alpha_ref is not None:
        request["alpha_ref"] = float(alpha_ref)
    try:  # refuse a bad image before any model loads, naming its file rather than its request field
        parse_request(request, params.model.history_len, params.backbone.image_size)
    except InvalidRequest as exc:
        files = {f"'history[{i}]'": p for i, p in enumerate(history)} | {"'reference'": reference}
        message = str(exc)
        for field_name, path in files.items():
            message = message.replace(f"field {field_name}", f"{path} ({field_name[1:-1]})")
        raise InvalidRequest(message) from None
    if model_uri:
        encoded = _predict_with_mlflow(params, ws, model_uri, request)
    else:
        generator = PigeonGenerator(params, ws, weights="dpo", device=params.device)
        encoded = png_base64(generator.generate(generator.parse(request)))
    atomic_write_bytes(out, base64.b64decode(encoded))
    return {"out": str(out), "model": model_uri or str(ws.dpo), "seed": int(seed), "alpha_ref": alpha_ref}


def _predict_with_mlflow(params, ws, model_uri: str, request: dict) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    from pigeon.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(params.tracking.uri, ws.root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        return model.predict(pd.DataFrame([request]))[0]
    except MlflowException as exc:
        raise PigeonError(f"{model_uri}: {exc.message.strip().splitlines()[-1]}") from None
