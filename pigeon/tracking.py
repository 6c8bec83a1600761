"""MLflow tracking: one parent run per pipeline execution, one nested run per stage.

DVC runs every stage in its own process, so each stage finds its pipeline's parent run:
- ``PIGEON_PARENT_RUN_ID`` when set (the Prefect flow sets it around its stages, see :func:`pipeline_run`);
- else the run recorded in ``<workspace>/.pigeon/parent_run.json``, reused while it is still running
  and the previous stage ended less than ``PARENT_REUSE_HOURS`` ago; otherwise a new parent starts.
  The last stage (register) ends that parent; a failed stage marks it failed.

A stage run holds the params keys its stage lists (:data:`pigeon.stages.PIPELINE`, as in ``dvc.yaml``),
the git commit, the raw dataset (``data.dvc`` md5) and the interaction log (its DVC md5 and last day,
also as ``pigeon.data.*`` tags, on the pipeline run too) as inputs, its result and ``metrics.json``-style
numbers, per-step curves (``*curves*.csv``) and the figures/tables of its outs and metrics files.
Everything is sent in batches: one ``log_metric`` costs ~22 ms on sqlite.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pigeon.config import Params
from pigeon.errors import PigeonError
from pigeon.hashing import params_value
from pigeon.paths import Workspace
from pigeon.pipeline import STAGE_SPECS, STAGES

PARENT_ENV = "PIGEON_PARENT_RUN_ID"
PARENT_REUSE_HOURS = 6.0
LAST_STAGE = STAGES[-1]  # register: it ends the pipeline run
STATE_FILE = Path(".pigeon") / "parent_run.json"

METRIC_FILES = ("metrics.json", "summary.json")
ARTIFACT_SUFFIXES = (".png", ".csv", ".md")
MAX_ARTIFACT_BYTES = 10 << 20
MAX_ARTIFACTS = 100
MAX_METRICS = 2000
# Numbers of these stages' files also go on the pipeline run (prefixed), so runs compare in one table.
PARENT_METRIC_PREFIX = {"evaluate": "", "register": "registry."}

_WRITE_LOCK = threading.RLock()  # sqlite takes one writer: serialise the threads of one process
_CURRENT_RUN: contextvars.ContextVar[StageRun | None] = contextvars.ContextVar("pigeon_stage_run",
                                                                                 default=None)


# --- where the store lives ----------------------------------------------------------------------


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """Relative sqlite/file URIs and plain paths are taken relative to the workspace root."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return uri if not path or Path(path).is_absolute() else f"sqlite:///{(root / path).resolve()}"
    if uri.startswith("file:") or "://" in uri:
        return uri
    return (root / uri).resolve().as_uri()


def resolve_artifact_location(location: str, root: Path) -> str:
    if "://" in location or location.startswith("file:"):
        return location
    return (root / location).resolve().as_uri()


def _check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            reply = requests.get(uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException as exc:
            raise PigeonError(f"MLflow tracking server {uri} cannot be reached ({type(exc).__name__})") from None
        if reply.status_code != 200:
            raise PigeonError(f"MLflow tracking server {uri} cannot be reached (HTTP {reply.status_code})")
    elif uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise PigeonError(f"MLflow tracking store {uri} cannot be reached (folder {folder} does not exist)")


@dataclass
class Tracker:
    """A checked connection to the tracking store and the project's experiment."""

    uri: str
    client: Any
    experiment_id: str


def connect(params: Params, ws: Workspace) -> Tracker:
    """Open the store and the experiment; a store that cannot be reached fails here, in one line."""
    cfg = params.tracking
    uri = resolve_tracking_uri(cfg.uri, ws.root)
    return _connect(uri, cfg.experiment, resolve_artifact_location(cfg.artifact_location, ws.root))


@lru_cache(maxsize=8)
def _connect(uri: str, experiment: str, artifact_location: str) -> Tracker:
    from mlflow import MlflowClient

    _check_reachable(uri)
    try:
        with _WRITE_LOCK:
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
            elif found.lifecycle_stage == "deleted":
                raise PigeonError(f"MLflow experiment {experiment!r} in {uri} is deleted; restore it "
                                  "or set tracking.experiment")
            else:
                experiment_id = found.experiment_id
    except PigeonError:
        raise
    except Exception as exc:  # noqa: BLE001 - any store failure becomes one line naming the URI
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PigeonError(f"MLflow tracking store {uri} cannot be reached ({reason})") from None
    return Tracker(uri, client, experiment_id)


# --- what every run records -----------------------------------------------------------------------


@lru_cache(maxsize=4)
def git_commit(root: str) -> tuple[str | None, bool]:
    """(commit, dirty) of the repository holding ``root``; (None, False) outside git."""
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit or None, bool(status.strip())


def _code_commit(ws: Workspace) -> tuple[str | None, bool]:
    package_root = Path(__file__).resolve().parents[1]  # the code that runs, wherever the workspace is
    commit, dirty = git_commit(str(package_root))
    return (commit, dirty) if commit else git_commit(str(ws.root))


def raw_dataset(ws: Workspace):
    """The raw dataset as an MLflow dataset: its md5 from ``data.dvc`` (else manifest.json's md5)."""
    import yaml
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    digest = None
    dvc_file = ws.root / "data.dvc"
    if dvc_file.is_file():
        with contextlib.suppress(Exception):
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
            digest = str(outs[0]["md5"])
    if digest is None and (ws.raw / "manifest.json").is_file():
        from pigeon.io import file_md5

        digest = file_md5(ws.raw / "manifest.json")
    if digest is None:
        return None
    return MetaDataset(LocalArtifactDatasetSource(str(ws.raw)), name="emoji-raw", digest=digest[:36])


def data_version_tags(ws: Workspace) -> dict[str, str]:
    """The data a run or model version comes from, as tags: the raw dataset's md5 and the interaction
    log's DVC md5 and last day (``pigeon.data.*``; no log: raw only)."""
    from pigeon.data.ingest import log_version

    tags = {}
    raw = raw_dataset(ws)
    if raw is not None:
        tags["pigeon.data.raw_md5"] = raw.digest
    version = log_version(ws)
    if version is not None:
        tags.update({"pigeon.data.log_md5": version["md5"], "pigeon.data.day": str(version["day"])})
    return tags


def log_dataset(ws: Workspace, tags: dict[str, str]):
    """The interaction log as an MLflow dataset (digest: its DVC md5), or None without a log."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    from pigeon.data.ingest import log_dir

    if "pigeon.data.log_md5" not in tags:
        return None
    return MetaDataset(LocalArtifactDatasetSource(str(log_dir(ws))),
                       name=f"interaction-log-day-{tags['pigeon.data.day']}", digest=tags["pigeon.data.log_md5"][:36])


def flatten_numbers(obj: Any, prefix: str = "", out: dict[str, float] | None = None) -> dict[str, float]:
    """Numeric leaves of nested dicts as ``a.b.c`` → float (lists and strings are skipped)."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for key, value in obj.items():
            flatten_numbers(value, f"{prefix}{key}.", out)
    elif isinstance(obj, (bool, int, float)) and prefix:
        value = float(obj)
        if math.isfinite(value) and len(out) < MAX_METRICS:
            out[_metric_key(prefix[:-1])] = value
    return out


def _metric_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", key)[:250]


def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten_params(value, f"{prefix}{key}."))
    else:
        text = json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj)
        out[prefix[:-1]] = text[:6000]
    return out


def _log_batch(client, run_id: str, metrics=(), params=(), tags=()) -> None:
    metrics, params, tags = list(metrics), list(params), list(tags)
    with _WRITE_LOCK:
        while metrics or params or tags:
            client.log_batch(run_id, metrics=metrics[:1000], params=params[:100], tags=tags[:100])
            metrics, params, tags = metrics[1000:], params[100:], tags[100:]


# --- runs -------------------------------------------------------------------------------------


@dataclass
class StageRun:
    """The nested run of one stage; a disabled tracker gives one with ``run_id`` None."""

    name: str
    run_id: str | None = None
    parent_id: str | None = None
    tracker: Tracker | None = None
    result: dict = field(default_factory=dict)

    def log_result(self, result: dict) -> None:
        self.result = dict(result)


def current_stage_run() -> StageRun | None:
    """The stage run open in this thread (register logs its model into it)."""
    return _CURRENT_RUN.get()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _start_parent(tracker: Tracker, params: Params, ws: Workspace, entrypoint: str,
                  execution: str) -> str:
    from mlflow.entities import Param
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    commit, dirty = _code_commit(ws)
    tags = {"pigeon.kind": "pipeline", "pigeon.execution": execution, "pigeon.profile": params.profile,
            "pigeon.entrypoint": entrypoint, "pigeon.workspace": str(ws.root), "pigeon.git_dirty": str(dirty)}
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    with _WRITE_LOCK:
        run = tracker.client.create_run(
            tracker.experiment_id, tags=tags,
            run_name=f"pipeline {params.profile} {time.strftime('%Y-%m-%d %H:%M:%S')}")
    flat = flatten_params(params.model_dump(mode="json"))
    _log_batch(tracker.client, run.info.run_id, params=[Param(k, v) for k, v in sorted(flat.items())])
    _log_datasets(tracker, run.info.run_id, ws, "training")
    return run.info.run_id


def _read_state(ws: Workspace) -> dict:
    try:
        return json.loads((ws.root / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(ws: Workspace, state: dict) -> None:
    from pigeon.io import write_json

    write_json(ws.root / STATE_FILE, state)


def _parent_for_stage(tracker: Tracker, params: Params, ws: Workspace) -> tuple[str, bool]:
    """(parent run id, whether this module owns its lifetime)."""
    from mlflow.exceptions import MlflowException

    if os.environ.get(PARENT_ENV):
        run_id = os.environ[PARENT_ENV]
        try:
            tracker.client.get_run(run_id)
        except MlflowException:
            raise PigeonError(f"{PARENT_ENV}={run_id}: no such run in {tracker.uri}") from None
        return run_id, False
    state = _read_state(ws)
    fresh = time.time() - float(state.get("updated", 0)) < PARENT_REUSE_HOURS * 3600
    if state.get("uri") == tracker.uri and state.get("experiment_id") == tracker.experiment_id and fresh:
        with contextlib.suppress(MlflowException, KeyError):
            run = tracker.client.get_run(state["run_id"])
            if run.info.status == "RUNNING" and run.data.tags.get("pigeon.execution") == state["execution"]:
                return run.info.run_id, True
    execution = uuid.uuid4().hex  # one pipeline execution: the stages of one `dvc repro`
    run_id = _start_parent(tracker, params, ws, "stage", execution)
    _write_state(ws, {"execution": execution, "run_id": run_id, "uri": tracker.uri,
                      "experiment_id": tracker.experiment_id, "updated": time.time()})
    return run_id, True


def _end_owned_parent(tracker: Tracker, ws: Workspace, run_id: str, status: str) -> None:
    with _WRITE_LOCK:
        tracker.client.set_terminated(run_id, status=status)
    if _read_state(ws).get("run_id") == run_id:
        (ws.root / STATE_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def pipeline_run(params: Params, ws: Workspace, entrypoint: str = "flow") -> Iterator[str | None]:
    """A parent run around a whole pipeline in this process; stages run inside it nest under it."""
    if not params.tracking.enabled:
        yield None
        return
    tracker = connect(params, ws)
    run_id = _start_parent(tracker, params, ws, entrypoint, uuid.uuid4().hex)
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous
        with _WRITE_LOCK:
            tracker.client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def track_stage(name: str, params: Params, ws: Workspace) -> Iterator[StageRun]:
    """Open the stage's nested run before the stage works; log its outputs when it ends."""
    if not params.tracking.enabled:
        yield StageRun(name)
        return
    tracker = connect(params, ws)
    parent_id, owned = _parent_for_stage(tracker, params, ws)
    run = _start_stage_run(tracker, name, parent_id, params, ws)
    token = _CURRENT_RUN.set(run)
    try:
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception), _WRITE_LOCK:  # report the stage's error, not ours
            tracker.client.set_tag(run.run_id, "pigeon.error", f"{type(exc).__name__}: {exc}"[:5000])
        with contextlib.suppress(Exception), _WRITE_LOCK:
            tracker.client.set_terminated(run.run_id, status=status)
        if owned:
            with contextlib.suppress(Exception):
                _end_owned_parent(tracker, ws, parent_id, status)
        raise
    finally:
        _CURRENT_RUN.reset(token)
    try:
        _log_stage_outputs(run, ws)
        with _WRITE_LOCK:
            tracker.client.set_terminated(run.run_id, status="FINISHED")
        if owned and name == LAST_STAGE:
            _end_owned_parent(tracker, ws, parent_id, "FINISHED")
        elif owned:
            _write_state(ws, {**_read_state(ws), "updated": time.time()})
    except Exception as exc:  # noqa: BLE001 - the stage's outputs are on disk: do not throw its work away
        print(f"pigeon: warning: MLflow logging of stage {name} failed ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''})", file=sys.stderr)


def stage_params(name: str, params: Params) -> dict[str, str]:
    """The params keys the stage lists in dvc.yaml (whole sections and dotted keys), flattened for MLflow."""
    flat: dict[str, str] = {}
    for key in STAGE_SPECS[name].params if name in STAGE_SPECS else ():
        flat.update(flatten_params(params_value(params, key), f"{key}."))
    return flat


def stage_outputs(name: str) -> tuple[str, ...]:
    """Workspace-relative outputs whose numbers, curves and figures go to the stage run: its dvc.yaml
    outs and metrics."""
    spec = STAGE_SPECS.get(name)
    return (*spec.outs, *spec.metrics) if spec else ()


def _start_stage_run(tracker: Tracker, name: str, parent_id: str, params: Params, ws: Workspace) -> StageRun:
    from mlflow.entities import Param
    from mlflow.utils import mlflow_tags

    commit, dirty = _code_commit(ws)
    tags = {mlflow_tags.MLFLOW_PARENT_RUN_ID: parent_id, mlflow_tags.MLFLOW_SOURCE_NAME: f"pigeon stage {name}",
            "pigeon.kind": "stage", "pigeon.stage": name, "pigeon.profile": params.profile,
            "pigeon.git_dirty": str(dirty)}
    if commit:
        tags[mlflow_tags.MLFLOW_GIT_COMMIT] = commit
    flat = stage_params(name, params)
    with _WRITE_LOCK:
        created = tracker.client.create_run(tracker.experiment_id, tags=tags, run_name=name)
        run_id = created.info.run_id
        _log_batch(tracker.client, run_id, params=[Param(k, v) for k, v in sorted(flat.items())])
    context = "evaluation" if name in ("evaluate", "register") else "training"
    # The log is ingest's output, not its input: every later stage (and the pipeline run) records it.
    _log_datasets(tracker, run_id, ws, context, with_log=name != STAGES[0])
    if name != STAGES[0]:
        _log_datasets(tracker, parent_id, ws, "training", with_log=True, with_raw=False)
    return StageRun(name, run_id, parent_id, tracker)


def _log_datasets(tracker: Tracker, run_id: str, ws: Workspace, context: str, with_log: bool = False,
                  with_raw: bool = True) -> None:
    """The raw dataset and (``with_log``) the interaction log as the run's dataset inputs, and the data
    version as its ``pigeon.data.*`` tags."""
    from mlflow.entities import DatasetInput, InputTag, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    tags = data_version_tags(ws) if with_log else {}
    datasets = [raw_dataset(ws)] if with_raw else []
    datasets.append(log_dataset(ws, tags))
    inputs = [DatasetInput(d._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
              for d in datasets if d is not None]
    with _WRITE_LOCK:
        if inputs:
            tracker.client.log_inputs(run_id, datasets=inputs)
    _log_batch(tracker.client, run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _log_stage_outputs(run: StageRun, ws: Workspace) -> None:
    from mlflow.entities import Metric

    client, now = run.tracker.client, _now_ms()
    numbers = flatten_numbers(run.result)
    metric_files, curve_files, artifacts = [], [], []
    for path in (ws.root / rel for rel in stage_outputs(run.name)):
        if path.is_file():
            metric_files += [path] if path.suffix == ".json" else []
            artifacts.append(path)
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            metric_files += [p for p in files if p.name in METRIC_FILES]
            curve_files += [p for p in files if p.suffix == ".csv" and "curves" in p.stem]
            artifacts += [p for p in files if p.suffix in ARTIFACT_SUFFIXES or p.name in METRIC_FILES]
    file_numbers: dict[str, float] = {}
    for path in metric_files:
        with contextlib.suppress(OSError, ValueError):
            flatten_numbers(json.loads(path.read_text()), "", file_numbers)
    numbers.update(file_numbers)
    metrics = [Metric(key, value, now, 0) for key, value in numbers.items()]
    for path in curve_files:
        metrics += _curve_metrics(path)
    _log_batch(client, run.run_id, metrics=metrics)
    if run.name in PARENT_METRIC_PREFIX:
        prefix = PARENT_METRIC_PREFIX[run.name]
        _log_batch(client, run.parent_id, metrics=[Metric(_metric_key(prefix + k), v, now, 0)
                                                   for k, v in file_numbers.items()])
    with _WRITE_LOCK:
        client.log_dict(run.run_id, run.result, "result.json")
        for path in artifacts[:MAX_ARTIFACTS]:
            if path.stat().st_size <= MAX_ARTIFACT_BYTES:
                client.log_artifact(run.run_id, str(path), str(path.parent.relative_to(ws.root)))


def _curve_metrics(path: Path) -> list:
    """One metric per numeric cell of a curves CSV: ``step`` is the step, a ``phase`` column (e.g.
    foundation's vq / lm) prefixes the name, empty cells are skipped."""
    import pandas as pd
    from mlflow.entities import Metric

    try:
        table = pd.read_csv(path)
    except Exception:  # noqa: BLE001 - a malformed curves file only loses its curves
        return []
    prefix = path.stem.replace("curves", "").strip("_-")
    prefix = f"{prefix}/" if prefix else ""
    if "step" not in table:
        table["step"] = range(len(table))
    phases = table.groupby("phase", sort=False) if "phase" in table else [(None, table)]
    now, out = _now_ms(), []
    for phase, part in phases:
        for column in part.columns:
            if column == "step" or not pd.api.types.is_numeric_dtype(part[column]):
                continue
            key = _metric_key(prefix + (f"{phase}/" if phase is not None else "") + str(column))
            for step, value in zip(part["step"].to_numpy(), part[column].to_numpy(dtype=float)):
                if math.isfinite(value) and len(out) < 50 * MAX_METRICS:
                    out.append(Metric(key, float(value), now, int(step)))
    return out
