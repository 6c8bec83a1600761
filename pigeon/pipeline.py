"""The stage registry: every pipeline stage, in pipeline order, with what it reads and writes (as
``dvc.yaml`` declares it; tests/unit/test_stage_registry.py fails when the two differ) and how it runs.

Pure data, importable without torch: the stages (:func:`pigeon.stages.run_stage`), the Prefect flow,
the MLflow tracking, ``accelerate launch`` (:mod:`pigeon.distributed`) and the test fixtures read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pigeon.errors import PigeonError


@dataclass(frozen=True)
class Stage:
    """One pipeline stage. ``params``, ``deps``, ``outs`` and ``metrics`` are its ``dvc.yaml`` lists as
    written there (``${profile}`` unfilled; an out's options such as ``persist``/``cache`` stay in
    ``dvc.yaml``); its ``dvc.yaml`` cmd is :attr:`cmd`."""

    name: str
    params: tuple[str, ...]  # params keys: a section ("dpo") or a dotted key ("model.history_len")
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...] = ()  # metrics files the stage writes (DVC outputs too)
    sharded: bool = False  # the flow fans it out over shards (module: shard_count, generate_shard, shard_outputs)
    gpu: bool = False  # the flow runs it under the `gpu` concurrency limit
    data_parallel: bool = False  # it may run under `accelerate launch` (pigeon.distributed)
    # It builds or loads the backbone: it lists the whole `backbone` section (kind, janus_path, …) and
    # the profile file (where a profile sets them), and the flow's cache key adds the Janus folder's
    # fingerprint (pigeon.hashing.stage_fingerprint).
    backbone: bool = False

    @property
    def cmd(self) -> str:
        return f"pigeon stage {self.name}"


PIPELINE: tuple[Stage, ...] = (
    Stage(
        "ingest",
        params=("profile", "seed", "simulate", "ingest"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "profiles/${profile}.yaml", "pigeon/data/raw.py",
              "pigeon/data/users.py", "pigeon/data/ingest.py", "pigeon/data/validation.py",
              "pigeon/stages/ingest.py"),
        outs=("data/log",),
        metrics=("reports/ingest.json",),
    ),
    Stage(
        "simulate",
        params=("profile", "seed", "simulate", "data"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/log", "profiles/${profile}.yaml",
              "pigeon/data/raw.py", "pigeon/data/users.py", "pigeon/data/ingest.py", "pigeon/stages/simulate.py"),
        outs=("data/users",),
        metrics=("reports/simulate.json",),
    ),
    Stage(
        "validate",
        params=("profile", "data", "simulate", "ingest.style_mix_tolerance", "model.history_len"),
        deps=("data/raw", "data/log", "data/users", "profiles/${profile}.yaml", "pigeon/data/raw.py",
              "pigeon/data/users.py", "pigeon/data/ingest.py", "pigeon/data/validation.py",
              "pigeon/stages/validate.py"),
        outs=("reports/validation.json",),
    ),
    Stage(
        "foundation",
        params=("profile", "seed", "backbone", "foundation", "model.history_len", "model.reference_views"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "profiles/${profile}.yaml", "pigeon/models",
              "pigeon/training/foundation.py", "pigeon/training/checkpoint.py", "pigeon/training/loop.py", "pigeon/seeds.py", "pigeon/stages/foundation.py"),
        outs=("models/foundation",),
        gpu=True,
        backbone=True,
    ),
    Stage(
        "evaluators",
        params=("profile", "seed", "backbone", "evaluators"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "models/foundation", "profiles/${profile}.yaml",
              "pigeon/models", "pigeon/artifacts.py", "pigeon/evaluation/evaluators.py", "pigeon/training/evaluators.py", "pigeon/training/loop.py", "pigeon/seeds.py",
              "pigeon/stages/evaluators.py"),
        outs=("models/evaluators",),
        metrics=("reports/evaluators.json",),
        backbone=True,
    ),
    Stage(
        "stage1",
        params=("profile", "seed", "backbone", "model", "stage1"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/users", "models/foundation",
              "reports/validation.json", "profiles/${profile}.yaml", "pigeon/models", "pigeon/artifacts.py",
              "pigeon/training/stage1.py", "pigeon/training/checkpoint.py", "pigeon/training/loop.py", "pigeon/seeds.py", "pigeon/stages/stage1.py"),
        outs=("models/stage1",),
        gpu=True,
        data_parallel=True,
        backbone=True,
    ),
    Stage(
        "candidates",
        params=("profile", "seed", "backbone", "model", "candidates"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/users", "models/foundation", "models/stage1",
              "profiles/${profile}.yaml", "pigeon/models", "pigeon/artifacts.py", "pigeon/training/candidates.py",
              "pigeon/shards.py", "pigeon/seeds.py", "pigeon/stages/candidates.py"),
        outs=("artifacts/candidates",),
        sharded=True,
        gpu=True,
        backbone=True,
    ),
    Stage(
        "rank",
        params=("profile", "seed", "backbone", "model.history_len", "candidates.reference", "rank"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/users", "artifacts/candidates",
              "models/foundation", "profiles/${profile}.yaml", "pigeon/models", "pigeon/artifacts.py",
              "pigeon/evaluation/reward.py", "pigeon/training/candidates.py", "pigeon/seeds.py", "pigeon/stages/rank.py"),
        outs=("artifacts/pairs",),
        backbone=True,
    ),
    Stage(
        "dpo",
        params=("profile", "seed", "backbone", "model", "candidates.reference", "dpo"),
        deps=("data/users", "models/foundation", "models/stage1", "data/raw/items.parquet", "data/raw/manifest.json",
              "artifacts/pairs", "profiles/${profile}.yaml", "pigeon/models", "pigeon/artifacts.py",
              "pigeon/training/dpo.py", "pigeon/training/candidates.py", "pigeon/training/checkpoint.py", "pigeon/training/loop.py", "pigeon/seeds.py",
              "pigeon/stages/dpo.py"),
        outs=("models/dpo",),
        gpu=True,
        data_parallel=True,
        backbone=True,
    ),
    Stage(
        "evaluate",
        params=("profile", "seed", "evaluate", "evaluators", "model", "backbone", "foundation.holdout_fraction",
                "stage1.lora", "rank.features"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/users", "models/foundation", "models/stage1",
              "models/dpo", "models/evaluators", "profiles/${profile}.yaml", "pigeon/models", "pigeon/artifacts.py",
              "pigeon/evaluation", "pigeon/training/foundation.py", "pigeon/shards.py", "pigeon/seeds.py", "pigeon/stages/evaluate.py"),
        outs=("artifacts/evaluate", "reports/samples", "reports/plots", "reports/grid_ground_truth.png",
              "reports/grid_paper.png", "reports/results.md"),
        metrics=("reports/metrics.json",),
        sharded=True,
        gpu=True,
        backbone=True,
    ),
    Stage(
        "register",
        params=("profile", "backbone", "model", "evaluate.alpha_ref", "evaluate.sampling", "register", "tracking"),
        deps=("data/raw/items.parquet", "data/raw/manifest.json", "data/log", "models/foundation", "models/dpo",
              "reports/metrics.json", "profiles/${profile}.yaml", "pigeon/data/ingest.py", "pigeon/models",
              "pigeon/artifacts.py", "pigeon/registry.py", "pigeon/serving.py", "pigeon/tracking.py",
              "pigeon/stages/register.py"),
        outs=("reports/registry.json",),
        backbone=True,
    ),
)
STAGE_SPECS: dict[str, Stage] = {stage.name: stage for stage in PIPELINE}
STAGES = tuple(STAGE_SPECS)  # pipeline order: each stage's inputs come from the ones before it
SHARDED_STAGES = tuple(stage.name for stage in PIPELINE if stage.sharded)
GPU_STAGES = tuple(stage.name for stage in PIPELINE if stage.gpu)
DATA_PARALLEL_STAGES = tuple(stage.name for stage in PIPELINE if stage.data_parallel)
BACKBONE_STAGES = tuple(stage.name for stage in PIPELINE if stage.backbone)


def stage_spec(name: str) -> Stage:
    if name not in STAGE_SPECS:
        raise PigeonError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    return STAGE_SPECS[name]
