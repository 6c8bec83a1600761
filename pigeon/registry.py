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
from dataclasses import asdict, dataclass, field
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
class Check:
    """One rule of the gate: passed is None when the rule does not apply (no champion to beat)."""

    rule: str
    passed: bool | None
    detail: str
    figures: dict = field(default_factory=dict)  # the numbers compared, for reports/registry.json


@dataclass(frozen=True)
class Decision:
    promote: bool
    why: str
    rule: str = ""  # the rule that decided: the first that failed, or "all rules passed"
    checks: tuple[Check, ...] = ()  # every rule, in the order checked

    def report(self) -> dict:
        return {"rule": self.rule, "checks": [asdict(c) for c in self.checks]}


# The generative baselines a candidate holds its semantics against: the models it is trained from (the
# zero-shot foundation and stage 1). The other generative rows (pigeon_select, no_history_mask,
# untrained_mask_generator, no_adapter, no_style_transfer) are the candidate itself used differently or with a part
# removed; reference_copy / nearest_history / tokenizer_ceiling / truth copy, retrieve or reconstruct.
BASELINE_ROWS = ("stage1", "foundation")
ZERO_SHOT_ROW = "foundation"
RULES = ("floors", "beats_zero_shot", "keeps_semantics", "beats_champion")
ALL_PASSED = "all rules passed"


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


def candidate_scores(metrics: dict, cfg, source: str | Path, method: str = METHOD) -> Scores:
    return Scores(headline_score(metrics, cfg.protocol, method, cfg.personalization_metric, source),
                  headline_score(metrics, cfg.protocol, method, cfg.semantic_metric, source))


def baseline_scores(metrics: dict, cfg, source: str | Path) -> dict[str, Scores]:
    """The same evaluation run's generative baselines (stage 1, the zero-shot foundation) that it holds."""
    rows = metrics.get(cfg.protocol, {})
    return {row: candidate_scores(metrics, cfg, source, row) for row in BASELINE_ROWS if row in rows}


def chance_levels(metrics: dict, cfg, source: str | Path) -> dict[str, float]:
    """The run's chance level of the gate metrics that have one (``metrics["chance"]``, accuracies only)."""
    chance = metrics.get("chance") or {}
    levels = {}
    for metric in (cfg.personalization_metric, cfg.semantic_metric):
        value = chance.get(metric)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise PigeonError(f"{source}: chance.{metric} is not a finite number (got {value!r})")
        levels[metric] = float(value)
    return levels


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


def decide(metrics: dict, cfg, champion: Scores | None = None, champion_version: str | None = None,
           source: str | Path = "reports/metrics.json") -> Decision:
    """The gate on one evaluation run: ``metrics`` in the layout of ``reports/metrics.json``, the
    champion's recorded scores (None with ``champion_version`` set: recorded under other metric names)."""
    return gate(candidate_scores(metrics, cfg, source), champion, cfg, champion_version,
                baseline_scores(metrics, cfg, source), chance_levels(metrics, cfg, source))


def gate(candidate: Scores, champion: Scores | None, cfg, champion_version: str | None = None,
         baselines: dict[str, Scores] | None = None, chance: dict[str, float] | None = None) -> Decision:
    """Promote only when no rule fails; the rules, checked in this order:

    1. ``floors``: personalization ≥ ``min_personalization`` and semantics ≥ ``min_semantic``, each also
       above the run's chance level when ``chance`` has it;
    2. ``beats_zero_shot``: personalization beats the same run's zero-shot ``foundation`` row by more
       than ``min_gain`` (a run without that row fails: nothing shows the training helped);
    3. ``keeps_semantics``: semantics within ``semantic_tolerance`` of the best generative baseline
       (:data:`BASELINE_ROWS`) of the same run (a run with none fails);
    4. ``beats_champion``: with a champion, personalization gains more than ``min_gain`` over it and
       semantics drop by at most ``semantic_tolerance``; without one it does not apply.

    Being the first version earns nothing: it must pass rules 1-3 like any other."""
    baselines = baselines or {}
    checks = (_floors(candidate, cfg, chance or {}), _beats_zero_shot(candidate, cfg, baselines),
              _keeps_semantics(candidate, cfg, baselines),
              _beats_champion(candidate, cfg, champion, champion_version))
    failed = next((c for c in checks if c.passed is False), None)
    if failed is not None:
        return Decision(False, f"not promoted ({failed.rule}): {failed.detail}", failed.rule, checks)
    first = "" if champion_version is not None else "no champion yet; "
    details = "; ".join(c.detail for c in checks if c.passed)
    return Decision(True, f"promoted: {first}{details}", ALL_PASSED, checks)


def _floors(candidate: Scores, cfg, chance: dict[str, float]) -> Check:
    parts, figures, passed = [], {}, True
    for metric, value, floor in ((cfg.personalization_metric, candidate.personalization, cfg.min_personalization),
                                 (cfg.semantic_metric, candidate.semantic, cfg.min_semantic)):
        level = chance.get(metric)
        passed &= value >= floor - EPS and (level is None or value > level + EPS)
        figures[metric] = {"candidate": value, "floor": floor, "chance": level}
        above = "" if level is None else f", must exceed chance {level:.4f}"
        parts.append(f"{metric} {value:.4f} (floor {floor}{above})")
    return Check("floors", passed, ", ".join(parts), figures)


def _beats_zero_shot(candidate: Scores, cfg, baselines: dict[str, Scores]) -> Check:
    metric, zero_shot = cfg.personalization_metric, baselines.get(ZERO_SHOT_ROW)
    if zero_shot is None:
        return Check("beats_zero_shot", False, f"the evaluation has no {ZERO_SHOT_ROW} row to compare with")
    gain = candidate.personalization - zero_shot.personalization
    return Check("beats_zero_shot", gain > cfg.min_gain + EPS,
                 f"{metric} {candidate.personalization:.4f} vs zero-shot {zero_shot.personalization:.4f} "
                 f"(gain {gain:+.4f}, needs > {cfg.min_gain})",
                 {"metric": metric, "candidate": candidate.personalization, "row": ZERO_SHOT_ROW,
                  "zero_shot": zero_shot.personalization, "gain": gain, "min_gain": cfg.min_gain})


def _keeps_semantics(candidate: Scores, cfg, baselines: dict[str, Scores]) -> Check:
    metric = cfg.semantic_metric
    if not baselines:
        return Check("keeps_semantics", False,
                     f"the evaluation has none of the generative baseline rows ({', '.join(BASELINE_ROWS)})")
    row = max(baselines, key=lambda name: baselines[name].semantic)
    best = baselines[row].semantic
    drop = best - candidate.semantic
    return Check("keeps_semantics", drop <= cfg.semantic_tolerance + EPS,
                 f"{metric} {candidate.semantic:.4f} vs {row} {best:.4f} "
                 f"(drop {drop:+.4f}, allowed <= {cfg.semantic_tolerance})",
                 {"metric": metric, "candidate": candidate.semantic, "row": row, "baseline": best, "drop": drop,
                  "semantic_tolerance": cfg.semantic_tolerance})


def _beats_champion(candidate: Scores, cfg, champion: Scores | None, champion_version: str | None) -> Check:
    p_name, s_name = cfg.personalization_metric, cfg.semantic_metric
    if champion_version is None:
        return Check("beats_champion", None, "no champion yet: nothing to beat (does not apply)")
    if champion is None:
        return Check("beats_champion", False, f"champion v{champion_version} has no recorded {cfg.protocol} "
                     f"{p_name}/{s_name}; promote by hand with `pigeon promote --version N`",
                     {"champion_version": int(champion_version)})
    gain = candidate.personalization - champion.personalization
    drop = champion.semantic - candidate.semantic
    return Check("beats_champion", gain > cfg.min_gain + EPS and drop <= cfg.semantic_tolerance + EPS,
                 f"{p_name} {candidate.personalization:.4f} vs champion v{champion_version} "
                 f"{champion.personalization:.4f} (gain {gain:+.4f}, needs > {cfg.min_gain}); {s_name} "
                 f"{candidate.semantic:.4f} vs {champion.semantic:.4f} (drop {drop:+.4f}, allowed <= "
                 f"{cfg.semantic_tolerance})",
                 {"champion_version": int(champion_version),
                  p_name: {"candidate": candidate.personalization, "champion": champion.personalization,
                           "gain": gain, "min_gain": cfg.min_gain},
                  s_name: {"candidate": candidate.semantic, "champion": champion.semantic, "drop": drop,
                           "semantic_tolerance": cfg.semantic_tolerance}})


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
