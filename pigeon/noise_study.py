"""The noise study: style and content accuracy of Pigeon and its two mask ablations against the share of
noise in the users' histories (``simulate.noise_rate``), one DVC experiment per rate.

:func:`run_study` queues ``dvc exp run --queue evaluate -S simulate.noise_rate=R -n noise-R`` for each
rate (with the ``-S`` overrides it is given, e.g. ``profile=smoke``) and runs the queue with
``dvc exp run --run-all``. DVC runs each experiment in a temporary copy of the last commit plus the
workspace's uncommitted changes to tracked files (untracked files stay behind: commit first), restores
from its cache every stage whose inputs are unchanged (``foundation`` and ``evaluators`` do not read the
users, so they are trained once for the whole study), and keeps the experiment's params, ``dvc.lock`` and
metrics as an experiment of the commit. ``register`` is not run: the study only needs the evaluation.

:func:`collect` reads the experiments back with ``dvc exp show --json``: the noise rate from each
experiment's params, the accuracies from the metrics file ``dvc.yaml`` declares for ``evaluate`` (the
``ground_truth`` protocol), the realised noise share from the one it declares for ``simulate``, and the
95 % bootstrap intervals from the experiment's own commit of that metrics file (``dvc exp show`` leaves
lists out). :func:`write_study` writes ``reports/noise_study.csv`` (one row per rate and method),
``reports/noise_study.md``, ``reports/noise_study_by_method.csv`` (one column per method: what the
``noise_study_*`` plots of ``dvc.yaml`` draw, ``dvc plots show``) and ``reports/noise_study.png``.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
import yaml

from pigeon.config import load_params
from pigeon.errors import ConfigError, PigeonError
from pigeon.io import atomic_write_bytes, atomic_write_text

PARAM = "simulate.noise_rate"
DEFAULT_RATES = (0.0, 0.2, 0.4)
METHODS = ("pigeon", "no_history_mask", "untrained_mask_generator")  # the model and its two mask ablations
METRICS = ("style_accuracy", "content_accuracy")
PROTOCOL = "ground_truth"
TARGET = "evaluate"  # each experiment reproduces the pipeline up to this stage
NAME_PREFIX = "noise-"
OUTPUTS = {"csv": "noise_study.csv", "md": "noise_study.md", "by_method": "noise_study_by_method.csv",
           "png": "noise_study.png"}


class ExperimentError(PigeonError):
    """An experiment of the study that DVC did not finish (its log names the stage that failed)."""

    exit_code = 1


def experiment_name(rate: float) -> str:
    """``noise-0.2``: the DVC experiment of one noise rate."""
    return f"{NAME_PREFIX}{float(rate)!r}"


# --- input checks -----------------------------------------------------------------------------------

def _profile_sets(profile: dict, key: str) -> bool:
    """Whether the profile file sets ``key`` (or a value above it), which it would merge over params.yaml."""
    node = profile
    for part in key.split("."):
        if not isinstance(node, dict):
            return True
        if part not in node:
            return False
        node = node[part]
    return True


def check_inputs(root: Path, rates: list[float], profile: str | None, overrides: list[str]) -> list[str]:
    """Check the rates, the profile and the overrides exactly as the experiments' stages will read them;
    return the ``-S`` overrides every experiment gets besides its rate (the profile first).

    ``-S`` writes into params.yaml and ``pigeon stage`` merges the profile over that file, so a key the
    profile sets cannot be varied by an experiment: that is refused here rather than silently ignored."""
    if not rates:
        raise ConfigError(f"{PARAM}: no noise rates given")
    if len(set(rates)) < len(rates):
        twice = next(rate for rate in rates if rates.count(rate) > 1)
        raise ConfigError(f"{PARAM}: rate {twice!r} given twice")
    keys = [text.split("=", 1)[0].strip() for text in overrides]
    for key in (PARAM, "profile"):
        if key in keys:
            raise ConfigError(f"--set {key}: give it with --{'rates' if key == PARAM else 'profile'}")
    for rate in rates:
        params = load_params(root / "params.yaml", profile, [*overrides, f"{PARAM}={rate!r}"])
    if params.profile != "default":
        profile_file = root / "profiles" / f"{params.profile}.yaml"
        merged_over = yaml.safe_load(profile_file.read_text(encoding="utf-8")) or {}
        for key in (PARAM, *keys):
            if _profile_sets(merged_over, key):
                raise ConfigError(f"{profile_file}: sets {key}, which it merges over params.yaml, so an "
                                  f"experiment's `-S {key}=…` would have no effect")
    return [*([f"profile={profile}"] if profile else []), *overrides]


# --- DVC --------------------------------------------------------------------------------------------

def _stderr():
    """Where DVC's progress goes when it is not captured: this process's stderr (stdout carries the table)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor
        return None


def dvc(root: Path, *args: str, capture: bool = True) -> str:
    """Run ``dvc ARGS`` in ``root``; a failure raises with DVC's own last error line. Uncaptured, DVC
    writes its progress to stderr."""
    exe = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    done = subprocess.run([exe, *args], cwd=root, text=True, check=False,
                          stdout=subprocess.PIPE if capture else _stderr(), stderr=subprocess.PIPE if capture else None)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else "no message")
        raise PigeonError(f"`dvc {' '.join(args)}` failed (exit {done.returncode}): {reason.removeprefix('ERROR: ')}")
    return done.stdout or ""


def stage_metrics_file(root: Path, stage: str) -> str:
    """The (first) metrics file ``dvc.yaml`` declares for ``stage``, as DVC names it in ``exp show``."""
    try:
        stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
        entry = stages[stage]["metrics"][0]
    except (OSError, KeyError, IndexError, TypeError) as exc:
        raise PigeonError(f"{root / 'dvc.yaml'}: no metrics file declared for stage {stage!r}") from exc
    return str(PurePosixPath(next(iter(entry)) if isinstance(entry, dict) else entry))


@dataclass(frozen=True)
class Experiment:
    name: str
    rev: str
    state: str  # queued, running, success, failed (DVC's executor state)
    params: dict  # params.yaml as the experiment ran it
    metrics: dict  # metrics file path → its content (numbers only: DVC leaves lists out)


def _dig(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def parse_exp_show(data: list) -> list[Experiment]:
    """The experiments of the commit ``dvc exp show --json`` was run at (its first baseline)."""
    found = []
    for baseline in data:
        if baseline.get("rev") == "workspace":
            continue
        for exp in baseline.get("experiments") or []:
            state = ((exp.get("executor") or {}).get("state")) or "success"
            for rev in exp.get("revs") or []:
                body = rev.get("data") or {}
                params = (body.get("params") or {}).get("params.yaml", {}).get("data") or {}
                metrics = {str(PurePosixPath(path)): (entry or {}).get("data") or {}
                           for path, entry in (body.get("metrics") or {}).items()}
                found.append(Experiment(rev.get("name") or exp.get("name") or rev["rev"][:7], rev["rev"],
                                        "failed" if rev.get("error") else state, params, metrics))
        break  # the current commit only: a study belongs to one baseline
    return found


def list_experiments(root: Path) -> list[Experiment]:
    return parse_exp_show(json.loads(dvc(root, "exp", "show", "--json")))


def run_study(root: Path, rates: list[float], overrides: list[str], jobs: int = 1, replace: bool = False) -> None:
    """Queue one experiment per rate and run the queue (every queued experiment, as ``--run-all`` does)."""
    names = [experiment_name(rate) for rate in rates]
    existing = [exp.name for exp in list_experiments(root) if exp.name in names]
    if existing and not replace:
        raise PigeonError(f"experiment {existing[0]} exists already at this commit (all: {', '.join(existing)}); "
                          "pass --replace to run it again, or --collect-only to read it")
    if existing:
        dvc(root, "exp", "remove", *existing)
    for rate, name in zip(rates, names):
        sets = [arg for text in [*overrides, f"{PARAM}={rate!r}"] for arg in ("-S", text)]
        print(dvc(root, "exp", "run", "--queue", TARGET, *sets, "-n", name).strip(), file=sys.stderr)
    dvc(root, "exp", "run", "--run-all", "--jobs", str(jobs), capture=False)
    done = {exp.name: exp for exp in list_experiments(root)}
    failed = [name for name in names if name not in done or done[name].state != "success"]
    if failed:
        raise ExperimentError(f"experiment {failed[0]} did not finish (all unfinished: {', '.join(failed)}); "
                              f"its log: `dvc queue logs {failed[0]}`")


# --- results ----------------------------------------------------------------------------------------

def _intervals(root: Path, rev: str, path: str) -> dict:
    """``ci95[protocol]`` of the metrics file as committed in the experiment; {} where it is not in git."""
    done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {}
    try:
        return json.loads(done.stdout).get("ci95", {}).get(PROTOCOL, {})
    except json.JSONDecodeError:
        return {}


def collect(root: Path, rates: list[float] | None = None) -> pd.DataFrame:
    """One row per (noise rate, method) from the finished ``noise-*`` experiments of the current commit
    (only those of ``rates`` when given), sorted by rate."""
    metrics_file, simulate_file = stage_metrics_file(root, TARGET), stage_metrics_file(root, "simulate")
    wanted = None if rates is None else {experiment_name(rate) for rate in rates}
    rows = []
    for exp in list_experiments(root):
        if not re.fullmatch(re.escape(NAME_PREFIX) + r"[0-9.e+-]+", exp.name) or exp.state != "success":
            continue
        if wanted is not None and exp.name not in wanted:
            continue
        results = exp.metrics.get(metrics_file, {}).get(PROTOCOL)
        if not results:
            raise PigeonError(f"experiment {exp.name}: {metrics_file} has no {PROTOCOL!r} results")
        intervals = _intervals(root, exp.rev, metrics_file)
        realised = exp.metrics.get(simulate_file, {}).get("realised_noise_rate", math.nan)
        for method in METHODS:
            if method not in results:
                raise PigeonError(f"experiment {exp.name}: {metrics_file} has no row {method!r}")
            row = {"noise_rate": float(_dig(exp.params, PARAM)), "realised_noise_rate": realised,
                   "experiment": exp.name, "rev": exp.rev[:7], "method": method}
            for metric in METRICS:
                low, high = intervals.get(method, {}).get(metric, [math.nan, math.nan])
                row |= {metric: results[method][metric], f"{metric}_low": low, f"{metric}_high": high}
            rows.append(row)
    if wanted is not None and (missing := wanted - {row["experiment"] for row in rows}):
        raise PigeonError(f"no finished experiment {min(missing)} at this commit (`dvc exp show`)")
    if not rows:
        raise PigeonError(f"no finished {NAME_PREFIX}* experiments at this commit (`dvc exp show`); "
                          "run `pigeon noise-study` first")
    frame = pd.DataFrame(rows)
    frame["method"] = pd.Categorical(frame["method"], categories=METHODS, ordered=True)
    return frame.sort_values(["noise_rate", "method"]).reset_index(drop=True).astype({"method": str})


def _cell(row: pd.Series, metric: str) -> str:
    from pigeon.evaluation.report import _fmt

    text = _fmt(row[metric], metric)
    if math.isfinite(row[f"{metric}_low"]):
        text += f" [{_fmt(row[f'{metric}_low'], metric)}, {_fmt(row[f'{metric}_high'], metric)}]"
    return text


def by_method(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per rate, one column per (method, metric): what the dvc.yaml plots draw, one line per method."""
    wide = frame.pivot(index="noise_rate", columns="method", values=list(METRICS))
    wide.columns = [f"{method}_{metric}" for metric, method in wide.columns]
    ordered = [f"{method}_{metric}" for metric in METRICS for method in METHODS if f"{method}_{metric}" in wide]
    return wide[ordered].reset_index()


def markdown(frame: pd.DataFrame) -> str:
    lines = ["# Noise study: accuracy against `simulate.noise_rate`", "",
             (f"Protocol `{PROTOCOL}`; one DVC experiment per rate (`dvc exp show`), each evaluated on its own "
              "simulated users; mean [95% bootstrap interval]. `realised` is the noise share of the simulated "
              "interactions (`reports/simulate.json`)."), "",
             "| noise rate | realised | experiment | method | style acc ↑ | content acc ↑ |", "|---|---|---|---|---|---|"]
    for _, row in frame.iterrows():
        lines.append(f"| {float(row['noise_rate'])!r} | {row['realised_noise_rate']:.3f} | {row['experiment']} | "
                     f"{row['method']} | {_cell(row, 'style_accuracy')} | {_cell(row, 'content_accuracy')} |")
    wide = by_method(frame)
    lines += ["", ("The mask generator's share: `pigeon` minus each ablation at each rate (positive: the trained "
                   "mask generator helps)."), "",
              "| noise rate | " + " | ".join(f"{metric.split('_')[0]}: − {method}" for metric in METRICS
                                          for method in METHODS[1:]) + " |",
              "|---" * (1 + len(METRICS) * (len(METHODS) - 1)) + "|"]
    for _, row in wide.iterrows():
        gaps = [row[f"pigeon_{metric}"] - row[f"{method}_{metric}"] for metric in METRICS for method in METHODS[1:]]
        lines.append(f"| {float(row['noise_rate'])!r} | " + " | ".join(f"{gap:+.3f}" for gap in gaps) + " |")
    return "\n".join(lines) + "\n"


def plot_png(frame: pd.DataFrame) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4), dpi=110)
    for ax, metric in zip(fig.subplots(1, len(METRICS)), METRICS):
        dodge = 0.01 * max(frame["noise_rate"].max() - frame["noise_rate"].min(), 0.1)  # overlapping lines stay visible
        for i, method in enumerate(METHODS):
            part = frame[frame["method"] == method]
            low = (part[metric] - part[f"{metric}_low"]).fillna(0).clip(lower=0)
            high = (part[f"{metric}_high"] - part[metric]).fillna(0).clip(lower=0)
            ax.errorbar(part["noise_rate"] + (i - 1) * dodge, part[metric], yerr=[low, high], marker="o", capsize=3,
                        label=method)
        ax.set_xlabel(PARAM)
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(f"Noise study ({PROTOCOL} protocol, 95% bootstrap intervals)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_study(frame: pd.DataFrame, reports: Path) -> dict[str, Path]:
    """Write the four files (each atomically) and return their paths."""
    from pigeon.evaluation.report import write_csv

    paths = {key: reports / name for key, name in OUTPUTS.items()}
    write_csv(paths["csv"], frame)
    write_csv(paths["by_method"], by_method(frame))
    atomic_write_text(paths["md"], markdown(frame))
    atomic_write_bytes(paths["png"], plot_png(frame))
    return paths
