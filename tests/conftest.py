"""Shared fixtures: the offline switches, and one smoke-profile pipeline run per test session.

``smoke`` runs the real stages on a small synthetic dataset (no network), each stage once, in
dependency order, the first time a test asks for it: ``smoke.run_until("dpo")`` returns the
workspace with every stage up to dpo done. Tests that change a workspace copy it first
(``smoke.copy(tmp_path)``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The offline switches (docs/design.md §8), for the test session (never at library import time).
from pigeon.runtime import OFFLINE_ENV  # noqa: E402

for _key, _value in OFFLINE_ENV.items():
    os.environ[_key] = _value
os.environ.pop("PIGEON_PROFILE", None)

SMOKE_STYLES = ("twemoji", "noto", "openmoji", "fluent-3d")
SMOKE_OVERRIDES = (f"data.styles={list(SMOKE_STYLES)}", "simulate.num_users=60")

# Stage order of the pipeline (docs/design.md §4); each entry's prerequisites are the ones before it.
from pigeon.stages import STAGES as ORDER  # the stage registry


def smoke_params(*extra: str):
    from pigeon.config import load_params

    return load_params(REPO / "params.yaml", profile="smoke", overrides=[*SMOKE_OVERRIDES, *extra])


def untrained_workspace(root: Path, params):
    """Synthetic raw data, simulated users, an untrained tiny foundation and an untrained Pigeon head
    saved as stage1 — the inputs of the later stages, without training anything."""
    from pigeon.artifacts import load_pigeon
    from pigeon.data.raw import read_items
    from pigeon.data.synthetic import build_synthetic_raw
    from pigeon.models.tiny import TinyBackbone
    from pigeon.paths import Workspace
    from pigeon.runtime import seed_everything
    from pigeon.stages import simulate

    ws = Workspace.at(root)
    build_synthetic_raw(ws.raw, styles=SMOKE_STYLES, sizes=params.data.sizes, seed=0)
    simulate.run(params, ws)
    seed_everything(0)
    captions = read_items(ws.raw)["name"].astype(str)
    TinyBackbone.create(params.backbone, captions, seed=0).save_pretrained(ws.foundation)
    load_pigeon(params, ws, None, "cpu").save_trainable(ws.stage1)
    return ws


class SmokePipeline:
    def __init__(self, root: Path):
        from pigeon.data.synthetic import build_synthetic_raw
        from pigeon.paths import Workspace

        self.ws = Workspace.at(root)
        self.params = smoke_params(f"tracking.uri=sqlite:///{root}/mlflow.db",
                                   f"tracking.artifact_location={root}/mlartifacts")
        build_synthetic_raw(self.ws.raw, styles=SMOKE_STYLES, sizes=self.params.data.sizes, seed=0)
        self.done: dict[str, dict] = {}

    def run_until(self, stage: str):
        from pigeon.runtime import seed_everything
        from pigeon.stages import run_stage

        for name in ORDER[: ORDER.index(stage) + 1]:
            if name not in self.done:
                seed_everything(self.params.seed)
                self.done[name] = run_stage(name, self.params, self.ws)
        return self.ws

    def copy(self, dest: Path):
        from pigeon.paths import Workspace

        shutil.copytree(self.ws.root, dest, dirs_exist_ok=True)
        return Workspace.at(dest)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> SmokePipeline:
    import torch

    # One thread: tests start subprocesses (servers, killed stages) that would oversubscribe two.
    torch.set_num_threads(1)
    return SmokePipeline(tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A small raw dataset in the real on-disk format, built without network."""
    from pigeon.data.synthetic import build_synthetic_raw

    out = tmp_path_factory.mktemp("raw") / "raw"
    build_synthetic_raw(out, styles=SMOKE_STYLES, sizes=(32, 64), seed=0)
    return out
