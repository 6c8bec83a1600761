"""Serving the registered champion: in process, through ``pigeon generate``, and with a real
``mlflow models serve`` on a loopback port (a valid request gets an image, a bad one a 4xx)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, SMOKE_OVERRIDES

pytestmark = pytest.mark.slow
CHAMPION = "models:/pigeon@champion"


@pytest.fixture(scope="module")
def served(smoke):
    """The smoke pipeline up to register + one test window. A 2-minute smoke model does not clear the
    promotion gate's floors, so version 1 is made champion by hand, as an operator would."""
    from pigeon import registry
    from pigeon.data.raw import image_path, read_items
    from pigeon.data.users import history_columns, read_windows
    from pigeon.tracking import connect

    ws = smoke.run_until("register")
    report = json.loads((ws.reports / "registry.json").read_text())
    if not report["promoted"]:
        client = connect(smoke.params, ws).client
        registry.promote(client, smoke.params.register.model_name, str(report["version"]), "manual: serving test")
    window = read_windows(ws, "test").iloc[0]
    items = read_items(ws.raw).set_index("item_id")
    size = smoke.params.backbone.image_size
    files = {"history": [image_path(ws.raw, size, items.at[int(window[c]), "file"]) for c in history_columns(smoke.params.model.history_len)],
             "reference": image_path(ws.raw, size, items.at[int(window["reference_item"]), "file"])}
    caption = str(items.at[int(window["reference_item"]), "name"])
    request = {"history": [b64_file(p) for p in files["history"]], "reference": b64_file(files["reference"]),
               "caption": caption, "alpha_ref": 0.5, "seed": 11}
    return ws, files, request


def b64_file(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def decode_png(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text)), formats=["PNG"]) as img:
        return np.asarray(img.convert("RGB"))


def test_champion_model_matches_the_workspace_model_and_the_cli(served, smoke, tmp_path):
    import mlflow
    import pandas as pd

    from pigeon.cli import main
    from pigeon.serving import PigeonGenerator

    ws, files, request = served
    assert json.loads((ws.reports / "registry.json").read_text())["version"] == 1
    mlflow.set_tracking_uri(smoke.params.tracking.uri)
    mlflow.set_registry_uri(smoke.params.tracking.uri)
    model = mlflow.pyfunc.load_model(CHAMPION)
    (served_png,) = model.predict(pd.DataFrame([request]))
    image = decode_png(served_png)
    size = smoke.params.backbone.image_size
    assert image.shape == (size, size, 3)

    generator = PigeonGenerator(smoke.params, ws)  # models/dpo straight from the workspace
    assert np.array_equal(generator.generate(generator.parse(request)), image)
    other_seed = generator.generate(generator.parse({**request, "seed": 12}))
    assert not np.array_equal(other_seed, image)  # the seed drives sampling

    out = tmp_path / "cli.png"
    overrides = [arg for o in SMOKE_OVERRIDES for arg in ("-s", o)]
    code = main(["generate", "--params", str(REPO / "params.yaml"), "--profile", "smoke", *overrides,
                 "-s", f"tracking.uri={smoke.params.tracking.uri}", "--workspace", str(ws.root),
                 "--history", *map(str, files["history"]), "--reference", str(files["reference"]),
                 "--caption", request["caption"], "--alpha-ref", "0.5", "--seed", "11",
                 "--model", CHAMPION, "--out", str(out)])
    assert code == 0 and np.array_equal(np.asarray(Image.open(out).convert("RGB")), image)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve not up after {limit:.0f} s: {log.read_text()[-2000:]}")


def test_mlflow_models_serve_answers_images_and_rejects_bad_requests_with_4xx(served, smoke, tmp_path):
    _, _, request = served
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": smoke.params.tracking.uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: uvicorn goes with it
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/ping", log)
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = post(url, {"dataframe_records": [request]})
        assert status == 200, body
        (image,) = body["predictions"]
        size = smoke.params.backbone.image_size
        assert decode_png(image).shape == (size, size, 3)

        bad = {
            "four history images": ({**request, "history": request["history"][:4]}, "exactly 5 images; got 4"),
            "reference not base64": ({**request, "reference": "%%%"}, "'reference' is not valid base64"),
            "alpha_ref out of range": ({**request, "alpha_ref": 2.0}, "'alpha_ref' must be in [0, 1]"),
            "history not a list": ({**request, "history": "abc"}, "history"),
        }
        for name, (payload, message) in bad.items():
            status, body = post(url, {"dataframe_records": [payload]})
            assert 400 <= status < 500 and message in body.get("message", ""), (name, status, body)
        assert proc.poll() is None  # still serving after the bad requests
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
