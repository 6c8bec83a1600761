"""The bad-input matrix of docs/bad_inputs.md: each case through the real entry point.

Every case asserts the one-line message (naming the file, field or value), the exit code (or the
HTTP 400 the served model answers), and that nothing already written was lost or half-written:
the outputs the command would replace hash the same afterwards and no temp file is left behind.
Stages fail on their inputs before they train, so the whole matrix runs in seconds. Related cases
tested elsewhere at function level: tests/unit/test_config.py (params), tests/data/test_validation.py
(the validate stage's suites), tests/unit/test_serving_requests.py (request parsing),
tests/flows/test_registry.py and tests/flows/test_serving.py (registry store, HTTP 4xx).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pigeon.cli import main
from pigeon.data.raw import image_path, png_bytes, read_items
from pigeon.io import tree_hash
from pigeon.paths import Workspace
from tests.conftest import REPO, SMOKE_OVERRIDES, smoke_params, untrained_workspace

OVERRIDES = (*SMOKE_OVERRIDES, "tracking.enabled=false", "threads=1", "device=cpu")
OUTPUTS = ("data/users", "models", "reports", "artifacts")


class LivePickle:
    """Unpickling this creates ``marker``: proof that a loader did (or did not) unpickle a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Workspace:
    """Synthetic raw data, simulated users, an untrained tiny foundation and Pigeon head (stage1, dpo)."""
    torch.set_num_threads(1)
    ws = untrained_workspace(tmp_path_factory.mktemp("bad-inputs"), smoke_params(*OVERRIDES))
    shutil.copytree(ws.stage1, ws.dpo)
    return ws


@pytest.fixture
def ws(base, tmp_path) -> Workspace:
    shutil.copytree(base.root, tmp_path / "ws")
    return Workspace.at(tmp_path / "ws")


# --- helpers -------------------------------------------------------------------------------------


def stage_args(name: str, ws: Workspace, *extra: str) -> list[str]:
    sets = [a for o in (*OVERRIDES, *extra) for a in ("--set", o)]
    return ["stage", name, "--workspace", str(ws.root), "--params", str(REPO / "params.yaml"), "--profile",
            "smoke", *sets]


def snapshot(ws: Workspace) -> dict[str, str]:
    return {rel: tree_hash(ws.root / rel) for rel in OUTPUTS if (ws.root / rel).exists()}


def leftovers(ws: Workspace) -> list[Path]:
    return [p for p in ws.root.rglob("*") if p.name.endswith((".tmp", ".old"))]


def fails(capsys, argv: list[str], *fragments: str, code: int = 2) -> str:
    """Run the CLI in-process; assert exit ``code`` and exactly one error line holding every fragment."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("pigeon: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert rc == code
    return errors[0]


def unchanged(ws: Workspace, before: dict[str, str], *stages: str) -> None:
    assert snapshot(ws) == before
    assert not leftovers(ws), leftovers(ws)
    for stage in stages:
        assert not ws.checkpoint_dir(stage).exists(), stage


def edit_windows(ws: Workspace, split: str, change) -> Path:
    path = ws.users / f"windows_{split}.parquet"
    change(pd.read_parquet(path)).to_parquet(path, index=False)
    return path


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- data/raw: the foundation stage reads every item image first ---------------------------------

IMAGE_DEFECTS = {
    "corrupt": (lambda p: p.write_bytes(p.read_bytes()[:40]), "cannot decode image"),
    "empty": (lambda p: p.write_bytes(b""), "cannot decode image"),
    "wrong-size": (lambda p: p.write_bytes(png_bytes(np.zeros((16, 16, 3), np.uint8))), "is 16x16, expected 32x32"),
    "wrong-mode-rgba": (lambda p: Image.new("RGBA", (32, 32)).save(p), "image mode RGBA, expected RGB"),
    "wrong-mode-gray": (lambda p: Image.new("L", (32, 32)).save(p, format="PNG"), "image mode L, expected RGB"),
    "missing": (lambda p: p.unlink(), "image file missing"),
}


@pytest.mark.parametrize("defect", list(IMAGE_DEFECTS))
def test_bad_raw_image_fails_the_stage_naming_the_file(ws, capsys, defect):
    plant, message = IMAGE_DEFECTS[defect]
    path = image_path(ws.raw, 32, read_items(ws.raw)["file"].iloc[3])
    plant(path)
    before = snapshot(ws)
    fails(capsys, stage_args("foundation", ws), str(path), message)
    unchanged(ws, before, "foundation")


def test_unreadable_items_table(ws, capsys):
    (ws.raw / "items.parquet").write_bytes(b"not parquet")
    before = snapshot(ws)
    fails(capsys, stage_args("foundation", ws), str(ws.raw / "items.parquet"), "cannot read parquet")
    unchanged(ws, before, "foundation")


# --- windows: stage1 reads them through the one reader -------------------------------------------

WINDOW_DEFECTS = {
    "unknown-item-id": (
        "train",
        lambda f: f.assign(history_2=f["history_2"].where(f.index != 7, 99_999)),
        ("history_2 = 99999", "is not an item id"),
    ),
    "unknown-reference": (
        "val",
        lambda f: f.assign(reference_item=f["reference_item"].where(f.index != 0, -3)),
        ("reference_item = -3",),
    ),
    "six-history-items": (
        "train",
        lambda f: f.assign(history_5=f["history_4"]),
        ("6 history items per window, expected 5", "history_5"),
    ),
    "four-history-items": ("val", lambda f: f.drop(columns=["history_4"]), ("missing column(s) history_4",)),
    "empty-train-split": ("train", lambda f: f.iloc[:0], ("no training windows",)),
    "empty-val-split": ("val", lambda f: f.iloc[:0], ("no validation windows",)),
}


@pytest.mark.parametrize("defect", list(WINDOW_DEFECTS))
def test_bad_windows_fail_stage1_before_training(ws, capsys, defect):
    split, change, fragments = WINDOW_DEFECTS[defect]
    path = edit_windows(ws, split, change)
    before = snapshot(ws)
    fails(capsys, stage_args("stage1", ws), path.name, *fragments)
    unchanged(ws, before, "stage1")


# --- params ----------------------------------------------------------------------------------------

PARAM_DEFECTS = {
    "nan": ("stage1.lr=nan", "stage1.lr: Input should be a finite number"),
    "nan-yaml": ("dpo.beta=.nan", "dpo.beta: Input should be a finite number"),
    "negative": ("stage1.batch_size=-4", "stage1.batch_size: Input should be greater than or equal to 1 (got -4)"),
    "out-of-range": ("simulate.noise_rate=1.5", "simulate.noise_rate: Input should be less than 1 (got 1.5)"),
    "misspelled": ("simulate.noise_rat=0.1", "simulate.noise_rat: unknown key (typo?)"),
}


@pytest.mark.parametrize("defect", list(PARAM_DEFECTS))
def test_bad_params_fail_before_the_stage_starts(ws, capsys, defect):
    override, message = PARAM_DEFECTS[defect]
    before = snapshot(ws)
    fails(capsys, stage_args("simulate", ws, "seed=1", override), "params.yaml (+profile smoke)", message)
    unchanged(ws, before)


# --- checkpoints -------------------------------------------------------------------------------------


def _plant_foreign_keys(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(4, 4)}, str(path))


def _plant_foreign_shapes(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state["lm.lm_head.weight"] = torch.zeros(3, 3)
    save_file(state, str(path))


CHECKPOINT_DEFECTS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:1000]), "not a valid safetensors file"),
    "foreign-keys": (_plant_foreign_keys, "weights do not fit the config (vq."),
    "foreign-shapes": (_plant_foreign_shapes, "size mismatch for lm.lm_head.weight"),
}


@pytest.mark.parametrize("defect", list(CHECKPOINT_DEFECTS))
def test_bad_foundation_checkpoint_is_a_checkpoint_error(ws, capsys, defect):
    plant, message = CHECKPOINT_DEFECTS[defect]
    path = ws.foundation / "weights.safetensors"
    plant(path)
    before = snapshot(ws)
    fails(capsys, stage_args("stage1", ws), str(path), message)
    unchanged(ws, before, "stage1")


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy-pickle"])
def test_pickle_checkpoint_is_refused_and_never_unpickled(ws, capsys, tmp_path, zip_format):
    path = ws.foundation / "weights.safetensors"
    marker, control = tmp_path / "unpickled", tmp_path / "control-unpickled"
    torch.save({"payload": LivePickle(marker)}, path, _use_new_zipfile_serialization=zip_format)
    torch.save({"payload": LivePickle(control)}, tmp_path / "control.pt", _use_new_zipfile_serialization=zip_format)
    torch.load(tmp_path / "control.pt", weights_only=False)  # the payload is live: unpickling runs it
    assert control.exists()
    before = snapshot(ws)
    fails(capsys, stage_args("stage1", ws), str(path), "is a pickle/zip checkpoint; only safetensors are loaded")
    assert not marker.exists()
    unchanged(ws, before, "stage1")


def test_plain_pickle_with_a_safetensors_name_is_refused(ws, capsys):
    path = ws.foundation / "weights.safetensors"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=5))
    fails(capsys, stage_args("stage1", ws), str(path), "is a pickle/zip checkpoint")


def test_torn_resume_checkpoint_names_the_file(ws, capsys):
    latest = ws.checkpoint_dir("foundation") / "latest"
    latest.mkdir(parents=True)
    (latest / "state.json").write_text(json.dumps({"fingerprint": "x"}))
    (latest / "state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # header cut short
    before = snapshot(ws)
    fails(capsys, stage_args("foundation", ws), str(latest / "state.safetensors"), "not a valid safetensors file")
    assert snapshot(ws) == before and not leftovers(ws)


# --- outputs that cannot be written (a FILE where a folder should be: fails for root too) ------------


def test_workspace_state_folder_is_a_file(ws, capsys):
    shutil.rmtree(ws.root / ".pigeon", ignore_errors=True)
    (ws.root / ".pigeon").write_text("not a folder")
    before = snapshot(ws)
    fails(capsys, stage_args("simulate", ws, "seed=1"), f"{ws.root / '.pigeon'} is a file, not a folder")
    unchanged(ws, before)


def test_second_output_folder_is_a_file_fails_before_the_first_is_replaced(ws, capsys):
    shutil.rmtree(ws.reports)
    ws.reports.write_text("not a folder")
    before = snapshot(ws)
    fails(capsys, stage_args("simulate", ws, "seed=1"), f"cannot write into {ws.reports}: it is a file")
    unchanged(ws, before)  # seed=1 would have replaced data/users with different users


def test_params_write_under_a_file(ws, capsys):
    blocker = ws.root / "blocker"
    blocker.write_text("a file")
    target = blocker / "params.yaml"
    fails(capsys, ["params", "--params", str(REPO / "params.yaml"), "--write", str(target)],
          f"cannot write {target}: {blocker} is a file, not a folder")
    assert blocker.read_text() == "a file" and not leftovers(ws)


# --- tracking -----------------------------------------------------------------------------------------


def test_unreachable_tracking_server_fails_before_the_stage_works(ws, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    before = snapshot(ws)
    fails(capsys, stage_args("simulate", ws, "seed=1", "tracking.enabled=true", f"tracking.uri={uri}"),
          f"MLflow tracking server {uri} cannot be reached")
    unchanged(ws, before)


# --- the served model: the pyfunc answers INVALID_PARAMETER_VALUE (HTTP 400) ----------------------


@pytest.fixture(scope="module")
def served(base, tmp_path_factory):
    """The pyfunc loaded the way MLflow loads it: from an artifact folder (params.yaml + models)."""
    from mlflow.pyfunc import PythonModelContext

    from pigeon.config import dump_params
    from pigeon.serving import PigeonPyfunc, example_request

    root = tmp_path_factory.mktemp("served")
    shutil.copytree(base.foundation, root / "models" / "foundation")
    shutil.copytree(base.dpo, root / "models" / "dpo")
    (root / "params.yaml").write_text(dump_params(smoke_params(*OVERRIDES)))
    model = PigeonPyfunc()
    model.load_context(PythonModelContext(artifacts={"workspace": str(root)}, model_config={}))
    files = read_items(base.raw)["file"].tolist()[:6]
    images = [np.asarray(Image.open(image_path(base.raw, 32, f)).convert("RGB")) for f in files]
    return model, example_request(images, "grinning face", seed=3)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels with (almost) no pixel data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _real_bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (2000, 2000), 255).save(buf, format="PNG")  # 4 Mpx in a few kB
    return buf.getvalue()


SERVING_DEFECTS = {
    "malformed-json": (lambda r: json.dumps(r)[:-9], "request is not valid JSON"),
    "bad-base64": (lambda r: {**r, "reference": "%%% not base64 %%%"}, "'reference' is not valid base64"),
    "oversized-bytes": (lambda r: {**r, "reference": "A" * (2 << 20)}, "'reference' is larger than 1048576 bytes"),
    "bomb-header": (
        lambda r: {**r, "reference": _b64(_png_header(100_000, 100_000))},
        "'reference' has too many pixels (decompression bomb)",
    ),
    "bomb-real": (
        lambda r: {**r, "history": [_b64(_real_bomb()), *r["history"][1:]]},
        "'history[0]' is 2000x2000 pixels; at most 1048576",
    ),
    "too-many-history": (lambda r: {**r, "history": r["history"] + r["history"][:1]}, "exactly 5 images; got 6"),
}


@pytest.mark.parametrize("defect", list(SERVING_DEFECTS))
def test_served_model_answers_400_and_keeps_serving(served, defect):
    from mlflow.exceptions import MlflowException

    model, good = served
    change, message = SERVING_DEFECTS[defect]
    with pytest.raises(MlflowException) as err:
        model.predict(None, change(good))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE" and err.value.get_http_status_code() == 400
    assert message in err.value.message and "\n" not in err.value.message
    (image,) = model.predict(None, [good])  # still answers a good request
    assert Image.open(io.BytesIO(base64.b64decode(image))).size == (32, 32)


# --- `pigeon generate` (the CLI path to the same model) ------------------------------------------------


def _generate_args(ws: Workspace, history: list[Path], out: Path) -> list[str]:
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    reference = image_path(ws.raw, 32, read_items(ws.raw)["file"].iloc[9])
    return ["generate", "--workspace", str(ws.root), "--params", str(REPO / "params.yaml"), "--profile", "smoke",
            *sets, "--history", *map(str, history), "--reference", str(reference), "--caption", "grinning face",
            "--out", str(out)]


def _history_files(ws: Workspace, n: int) -> list[Path]:
    return [image_path(ws.raw, 32, f) for f in read_items(ws.raw)["file"].iloc[:n]]


def test_generate_with_a_corrupt_history_file_names_it(ws, capsys):
    history = _history_files(ws, 5)
    bad = ws.root / "not-an-image.png"
    bad.write_bytes(b"GIF89a but not really")
    out = ws.root / "out.png"
    fails(capsys, _generate_args(ws, [*history[:4], bad], out), f"{bad} (history[4]) is not a PNG or JPEG image")
    assert not out.exists() and not leftovers(ws)


def test_generate_with_too_many_history_files(ws, capsys):
    out = ws.root / "out.png"
    fails(capsys, _generate_args(ws, _history_files(ws, 6), out), "'history' must hold exactly 5 images; got 6")
    assert not out.exists()


def test_generate_into_a_path_under_a_file(ws, capsys):
    blocker = ws.root / "blocker"
    blocker.write_text("a file")
    out = blocker / "out.png"
    fails(capsys, _generate_args(ws, _history_files(ws, 5), out), f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "a file" and not leftovers(ws)
