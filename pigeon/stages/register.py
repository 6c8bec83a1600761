"""Stage ``register``: log the DPO model as an MLflow pyfunc, register it, gate the champion alias.

Reads ``models/dpo`` (+ ``models/foundation`` for the tiny backbone) and ``reports/metrics.json``;
creates a version of ``register.model_name`` aliased ``candidate``, tagged with its data version
(``pigeon.data.log_md5``, ``pigeon.data.day``, ``pigeon.data.raw_md5``); moves ``champion`` only when no
rule of the gate fails (:func:`pigeon.registry.decide`; the first version is not crowned for being
first); writes ``reports/registry.json``: ``decision``, the deciding ``rule`` and every rule's
``checks`` (passed true/false, or null where it does not apply, with the figures compared).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pigeon.config import Params, dump_params
from pigeon.errors import CheckpointError
from pigeon.io import read_json, write_json
from pigeon.paths import Workspace

# models-from-code: the logged model is this script plus files, never a pickle.
MODEL_SCRIPT = '''"""The Pigeon pyfunc model; the code is the installed ``pigeon`` package."""
import mlflow

from pigeon.serving import PigeonPyfunc

mlflow.models.set_model(PigeonPyfunc())
'''
REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "diffusers", "safetensors", "pillow", "numpy",
                "pandas", "pydantic", "pyyaml")
SKIPPED_SUFFIXES = (".png", ".csv", ".md")  # figures and curves stay in the stage runs, not the model


def pip_requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _copy_model_files(src: Path, dest: Path) -> None:
    if not src.is_dir():
        raise CheckpointError(f"{src}: model folder missing (run the pipeline up to this stage first)")
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and path.suffix not in SKIPPED_SUFFIXES and not any(p.startswith(".") for p in rel.parts):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)


def build_bundle(params: Params, ws: Workspace, dest: Path) -> Path:
    """The model's artifact folder: params.yaml + models/dpo (+ models/foundation for tiny)."""
    _copy_model_files(ws.dpo, dest / "models" / "dpo")
    if params.backbone.kind == "tiny":
        _copy_model_files(ws.foundation, dest / "models" / "foundation")
    # The janus backbone stays at backbone.janus_path (multi-GB): serving machines need that folder.
    (dest / "params.yaml").write_text(dump_params(params))
    return dest


def example_request(params: Params, ws: Workspace) -> dict:
    """A real request from the raw dataset: the first items as history, the next as reference."""
    from pigeon.data.raw import decode_png, image_path, read_items
    from pigeon.serving import example_request as build

    items = read_items(ws.raw).head(params.model.history_len + 1)
    size = params.backbone.image_size
    images = [decode_png(image_path(ws.raw, size, f), size) for f in items["file"]]
    return build(images, caption=str(items["name"].iloc[-1]), alpha_ref=params.evaluate.alpha_ref, seed=0)


@contextlib.contextmanager
def _no_download_bars():
    """log_model reloads the model to check the input example: keep its progress bars out of stage logs."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def log_and_register(params: Params, ws: Workspace, tracking_uri: str, run_id: str | None, tags: dict):
    """Log the pyfunc model into the stage run ``run_id``, register a new version; returns the ModelVersion."""
    import mlflow
    import pandas as pd

    from pigeon.serving import MODEL_ARTIFACT, model_signature

    mlflow.set_tracking_uri(tracking_uri)  # log_model and register_model use the process-wide URIs
    mlflow.set_registry_uri(tracking_uri)
    name = params.register.model_name
    run = mlflow.start_run(run_id=run_id, nested=True) if run_id else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="pigeon-register-") as tmp, run, _no_download_bars():
        bundle = build_bundle(params, ws, Path(tmp) / MODEL_ARTIFACT)
        script = Path(tmp) / "pigeon_model.py"
        script.write_text(MODEL_SCRIPT)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(script),
            artifacts={MODEL_ARTIFACT: str(bundle)},
            signature=model_signature(),
            input_example=pd.DataFrame([example_request(params, ws)]),
            pip_requirements=pip_requirements(),
            metadata={"history_len": params.model.history_len, "image_size": params.backbone.image_size,
                      "backbone": params.backbone.kind},
            tags=tags,
        )
    return mlflow.register_model(info.model_uri, name, tags=tags)


def run(params: Params, ws: Workspace) -> dict:
    from pigeon import registry
    from pigeon.tracking import connect, current_stage_run, data_version_tags

    cfg = params.register
    metrics_path = ws.reports / "metrics.json"
    metrics = read_json(metrics_path)
    scores = registry.candidate_scores(metrics, cfg, metrics_path)
    baselines = registry.baseline_scores(metrics, cfg, metrics_path)
    chance = registry.chance_levels(metrics, cfg, metrics_path)
    data = data_version_tags(ws)  # which data trained it: the version carries it as tags
    report = {"model_name": cfg.model_name, "protocol": cfg.protocol,
              "candidate": {cfg.personalization_metric: scores.personalization,
                            cfg.semantic_metric: scores.semantic},
              "data": {key.removeprefix("pigeon.data."): value for key, value in data.items()}}
    if not params.tracking.enabled:
        report.update(version=None, decision="skipped", promoted=False,
                      why="tracking.enabled is false: nothing registered")
        write_json(ws.reports / "registry.json", report)
        return {"promoted": False}

    tracker = connect(params, ws)
    stage_run = current_stage_run()
    run_id = stage_run.run_id if stage_run is not None else None
    client = tracker.client
    version = log_and_register(params, ws, tracker.uri, run_id, {**registry.score_tags(cfg, scores), **data})
    client.set_registered_model_alias(cfg.model_name, registry.CANDIDATE, version.version)

    champion = registry.get_version(client, cfg.model_name, registry.CHAMPION)
    champion_scores = registry.version_scores(champion, cfg) if champion is not None else None
    decision = registry.decide(metrics, cfg, champion_scores, champion.version if champion else None, metrics_path)
    if decision.promote:
        registry.promote(client, cfg.model_name, version.version, f"gate: {decision.why}")
    client.update_model_version(cfg.model_name, version.version, description=decision.why)
    client.set_model_version_tag(cfg.model_name, version.version, "pigeon.gate", decision.why[:5000])

    report.update(
        version=int(version.version),
        model_uri=f"models:/{cfg.model_name}/{version.version}",
        run_id=run_id,
        decision="promoted" if decision.promote else ("kept champion" if champion else "not promoted"),
        promoted=decision.promote,
        why=decision.why,
        **decision.report(),
        baselines={row: {cfg.personalization_metric: b.personalization, cfg.semantic_metric: b.semantic}
                   for row, b in baselines.items()},
        chance=chance,
        champion_before=None if champion is None else {
            "version": int(champion.version),
            **({cfg.personalization_metric: champion_scores.personalization,
                cfg.semantic_metric: champion_scores.semantic} if champion_scores else {})},
        champion_after=int(version.version) if decision.promote else (int(champion.version) if champion else None),
    )
    write_json(ws.reports / "registry.json", report)
    return {"version": int(version.version), "promoted": decision.promote,
            "personalization": scores.personalization, "semantic": scores.semantic}
