"""The model registry: the promotion gate, ``promote`` and ``rollback``.

Each registered version of the model carries its gate scores as tags (``score.<protocol>.<metric>``).
The ``champion`` alias moves only through :func:`promote` (the gate or a person) and :func:`rollback`;
every move is recorded in the version tag ``pigeon.previous_champion`` (what rollback returns to)
and in the registered model's tag ``pigeon.champion_history`` (a JSON list, newest last).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pigeon.errors import PigeonError

CANDIDATE = "candidate"
CHAMPION = "champion"
METHOD = "pigeon"  # the row of reports/metrics.json that is registered
PREVIOUS_TAG = "pigeon.previous_champion"
HISTORY_TAG = "pigeon.champion_history"
HISTORY_KEEP = 50
EPS = 1e-9  # scores are means of finitely many windows: ignore float noise at the thresholds


@dataclass(frozen=True)
class Scores:
    personalization: float
    semantic: float


@dataclass(frozen=True)
class Decision:
    promote: bool
    why: str


# --- reading the evaluation's headline numbers ---------------------------------------------------


def headline_score(metrics: dict, protocol: str, method: str, metric: str, source: str | Path) -> float:
    """``metrics[protocol][method][metric]`` (optionally under ``headline``, or as a flat
    ``protocol/method/metric`` key); a ``{"mean": …}`` interval counts as its mean."""
    containers = [metrics] + [metrics[k] for k in ("headline", "protocols") if isinstance(metrics.get(k), dict)]
    for container in containers:
        value = _walk(container, (protocol, method, metric))
        for sep in ("/", "."):
            value = container.get(sep.join((protocol, method, metric)), value) if value is None else value
        if value is not None:
            if isinstance(value, dict):
                value = next((value[k] for k in ("mean", "value", "point") if k in value), None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
            raise PigeonError(f"{source}: {protocol}.{method}.{metric} is not a finite number (got {value!r})")
    raise PigeonError(f"{source}: no headline number {protocol}.{method}.{metric} "
                      "(check register.protocol / register.*_metric)")


def _walk(obj: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def candidate_scores(metrics: dict, cfg, source: str | Path) -> Scores:
    return Scores(headline_score(metrics, cfg.protocol, METHOD, cfg.personalization_metric, source),
                  headline_score(metrics, cfg.protocol, METHOD, cfg.semantic_metric, source))


def score_tags(cfg, scores: Scores) -> dict[str, str]:
    return {f"score.{cfg.protocol}.{cfg.personalization_metric}": repr(scores.personalization),
            f"score.{cfg.protocol}.{cfg.semantic_metric}": repr(scores.semantic)}


def version_scores(version, cfg) -> Scores | None:
    """The gate scores recorded on a model version under the current metric names, if any."""
    p_key, s_key = score_tags(cfg, Scores(0.0, 0.0))
    try:
        return Scores(float(version.tags[p_key]), float(version.tags[s_key]))
    except (KeyError, ValueError, TypeError):
        return None


# --- the gate ---------------------------------------------------------------------------------------


def gate(candidate: Scores, champion: Scores | None, cfg, champion_version: str | None = None) -> Decision:
    """Promote when there is no champion, or personalization gains more than ``min_gain`` and the
    semantic metric drops by at most ``semantic_tolerance``."""
    p_name, s_name = cfg.personalization_metric, cfg.semantic_metric
    if champion_version is None:
        return Decision(True, "no champion yet")
    if champion is None:
        return Decision(False, f"champion v{champion_version} has no recorded {cfg.protocol} {p_name}/{s_name}; "
                               "promote by hand with `pigeon promote --version N`")
    gain = candidate.personalization - champion.personalization
    drop = champion.semantic - candidate.semantic
    p_text = (f"{p_name} {candidate.personalization:.4f} vs champion v{champion_version} "
              f"{champion.personalization:.4f} (gain {gain:+.4f}, needs > {cfg.min_gain})")
    s_text = f"{s_name} {candidate.semantic:.4f} vs {champion.semantic:.4f} (drop {drop:+.4f}, " \
             f"allowed <= {cfg.semantic_tolerance})"
    if gain <= cfg.min_gain + EPS:
        return Decision(False, f"not promoted: {p_text}")
    if drop > cfg.semantic_tolerance + EPS:
        return Decision(False, f"not promoted: {s_text}")
    return Decision(True, f"promoted: {p_text}; {s_text}")


# --- aliases ----------------------------------------------------------------------------------------


def get_version(client, name: str, alias_or_version: str):
    """A model version by alias or number; None when the alias is unset."""
    from mlflow.exceptions import MlflowException

    try:
        if str(alias_or_version).isdigit():
            return client.get_model_version(name, str(alias_or_version))
        return client.get_model_version_by_alias(name, alias_or_version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in exc.message.lower():
            if str(alias_or_version).isdigit():
                raise PigeonError(f"model {name!r} has no version {alias_or_version}") from None
            return None
        raise


def champion_history(client, name: str) -> list[dict]:
    model = client.get_registered_model(name)
    try:
        return json.loads(model.tags.get(HISTORY_TAG, "[]"))
    except ValueError:
        return []


def _record(client, name: str, entry: dict) -> None:
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
    history = (champion_history(client, name) + [entry])[-HISTORY_KEEP:]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def promote(client, name: str, version: str | int, reason: str) -> str | None:
    """Point ``champion`` at ``version``; returns the previous champion's version (None if none)."""
    version = str(version)
    target = get_version(client, name, version)
    if target.status != "READY":
        raise PigeonError(f"model {name!r} version {version} is {target.status}, not READY")
    current = get_version(client, name, CHAMPION)
    previous = str(current.version) if current is not None else None
    if previous == version:
        return previous
    if previous is not None:
        client.set_model_version_tag(name, version, PREVIOUS_TAG, previous)
    client.set_registered_model_alias(name, CHAMPION, version)
    _record(client, name, {"action": "promote", "version": version, "previous": previous, "reason": reason})
    return previous


def rollback(client, name: str, reason: str = "rollback") -> tuple[str, str]:
    """Move ``champion`` back to the version it replaced; returns (from, to)."""
    current = get_version(client, name, CHAMPION)
    if current is None:
        raise PigeonError(f"model {name!r} has no champion to roll back")
    previous = current.tags.get(PREVIOUS_TAG)
    if not previous:
        raise PigeonError(f"model {name!r}: champion v{current.version} has no previous champion to roll back to")
    get_version(client, name, previous)  # still registered?
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current.version, "pigeon.rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    _record(client, name, {"action": "rollback", "version": previous, "previous": str(current.version),
                           "reason": reason})
    return str(current.version), previous


def registry_client(params, ws):
    """The checked MLflow client of the workspace's tracking store (also the registry)."""
    from pigeon.tracking import connect

    if not params.tracking.enabled:
        raise PigeonError("tracking.enabled is false: there is no model registry to use")
    return connect(params, ws).client
