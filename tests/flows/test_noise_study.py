"""The noise study on the smoke profile: ``pigeon noise-study`` in a throwaway git + DVC project queues one
DVC experiment per ``simulate.noise_rate``, runs them with ``dvc exp run --run-all``, and writes a table,
a CSV, a PNG and the data of the ``dvc.yaml`` plots from what ``dvc exp show`` reports.

The project is this repository's code, ``dvc.yaml``, profiles and params (smoke profile, synthetic
images) committed after ``dvc repro foundation evaluators``: neither stage reads the users, so every
experiment restores them from the DVC cache instead of training them again. The stages run ``pigeon``
through a shim that runs ``python -m pigeon`` in the experiment's folder, i.e. the code committed there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pigeon.cli import main
from tests.conftest import REPO, SMOKE_STYLES

pytestmark = pytest.mark.slow
RATES = (0.0, 0.4)
METHODS = ("pigeon", "no_history_mask", "untrained_mask_generator")
ALPHA_REF = 0.4  # a `--set` passed to every experiment (the repo's params say 0.5)


class Project:
    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, check=False,
                              timeout=600)
        if check:
            assert done.returncode == 0, f"{' '.join(cmd)}: exit {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done

    def exp_show(self) -> dict[str, dict]:
        """name → the experiment's `dvc exp show --json` record (rev, params, metrics), read independently
        of pigeon.noise_study."""
        shown = json.loads(self.run("dvc", "exp", "show", "--json").stdout)
        baseline = next(entry for entry in shown if entry["rev"] != "workspace")
        return {rev["name"]: {"rev": rev["rev"], "params": rev["data"]["params"]["params.yaml"]["data"],
                              "metrics": {k: v["data"] for k, v in rev["data"]["metrics"].items()}}
                for exp in baseline["experiments"] or [] for rev in exp["revs"]}

    def committed(self, rev: str, path: str) -> str:
        return self.run("git", "show", f"{rev}:{path}").stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    from pigeon.config import load_params
    from pigeon.data.synthetic import build_synthetic_raw

    base = tmp_path_factory.mktemp("noise-study")
    root, shim = base / "project", base / "bin"
    shutil.copytree(REPO / "pigeon", root / "pigeon", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "profiles", root / "profiles")
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params.update(profile="smoke", threads=1)
    params["data"]["styles"] = list(SMOKE_STYLES)
    params["tracking"]["enabled"] = False  # an experiment's folder is temporary: no MLflow store there
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    build_synthetic_raw(root / "data" / "raw", styles=SMOKE_STYLES,
                        sizes=load_params(root / "params.yaml").data.sizes, seed=0)

    shim.mkdir()
    (shim / "pigeon").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pigeon "$@"\n', encoding="utf-8")
    (shim / "pigeon").chmod(0o755)
    env = {**os.environ, "PATH": os.pathsep.join([str(shim), str(Path(sys.executable).parent), os.environ["PATH"]]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1"}
    env.pop("PYTHONPATH", None)  # `python -m pigeon` in the project's folder: its own committed code
    proj = Project(root, env)
    started = time.perf_counter()
    proj.run("git", "init", "-q")
    proj.run("git", "config", "user.name", "test")  # experiments are commits (their folders copy this config)
    proj.run("git", "config", "user.email", "test@example.com")
    proj.run("dvc", "init", "-q")
    proj.run("dvc", "add", "-q", "data/raw")
    proj.run("dvc", "repro", "-q", "foundation", "evaluators")
    proj.run("git", "add", "-A")
    proj.run("git", "commit", "-q", "-m", "smoke project: foundation and evaluators trained")
    proj.baseline_seconds = time.perf_counter() - started

    started = time.perf_counter()
    done = proj.run("pigeon", "noise-study", "--rates", *map(str, RATES), "--profile", "smoke",
                    "--set", f"evaluate.alpha_ref={ALPHA_REF}", check=False)
    (base / "study.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    assert done.returncode == 0, f"noise-study: exit {done.returncode}\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    proj.study_seconds = time.perf_counter() - started
    proj.study_stdout = done.stdout
    print(f"\nnoise study: baseline {proj.baseline_seconds:.0f} s, two experiments {proj.study_seconds:.0f} s")
    return proj


def test_one_experiment_per_rate_with_its_own_data(project):
    exps = project.exp_show()
    names = {f"noise-{rate!r}": rate for rate in RATES}
    assert set(exps) == set(names), exps.keys()
    assert exps["noise-0.0"]["rev"] != exps["noise-0.4"]["rev"]
    locks = {}
    for name, rate in names.items():
        params, metrics = exps[name]["params"], exps[name]["metrics"]
        assert params["simulate"]["noise_rate"] == rate
        assert params["profile"] == "smoke" and params["evaluate"]["alpha_ref"] == ALPHA_REF  # the passthrough
        assert metrics["reports/metrics.json"]["alpha_ref"] == ALPHA_REF  # ... reached the evaluate stage
        simulated = metrics["reports/simulate.json"]
        assert simulated["noise_rate"] == rate
        assert abs(simulated["realised_noise_rate"] - rate) <= params["simulate"]["noise_tolerance"], simulated
        locks[name] = yaml.safe_load(project.committed(exps[name]["rev"], "dvc.lock"))["stages"]
        log = project.run("dvc", "queue", "logs", name).stdout
        # Foundation and evaluators came from the cache; everything that reads the users ran.
        for stage in ("foundation", "evaluators"):
            assert f"Stage '{stage}' didn't change, skipping" in log, log[-3000:]
        for stage in ("simulate", "stage1", "dpo", "evaluate"):
            assert f"Running stage '{stage}'" in log, log[-3000:]
    assert (realised := [exps[n]["metrics"]["reports/simulate.json"]["realised_noise_rate"] for n in names])[0] \
        < realised[1] - 0.2
    users = [locks[n]["simulate"]["outs"][0]["md5"] for n in names]
    assert users[0] != users[1], "both experiments simulated the same users"
    baseline = yaml.safe_load((project.root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    for stage in ("foundation", "evaluators"):
        assert [locks[n][stage]["outs"][0]["md5"] for n in names] == [baseline[stage]["outs"][0]["md5"]] * 2


def _check_table(project, frame: pd.DataFrame) -> None:
    exps = project.exp_show()
    assert len(frame) == len(RATES) * len(METHODS)
    assert sorted(zip(frame["noise_rate"], frame["method"])) == sorted((r, m) for r in RATES for m in METHODS)
    for _, row in frame.iterrows():
        exp = exps[row["experiment"]]
        assert exp["params"]["simulate"]["noise_rate"] == row["noise_rate"]
        shown = exp["metrics"]["reports/metrics.json"]["ground_truth"][row["method"]]
        committed = json.loads(project.committed(exp["rev"], "reports/metrics.json"))
        for metric in ("style_accuracy", "content_accuracy"):
            assert 0.0 <= row[metric] <= 1.0
            assert row[metric] == pytest.approx(shown[metric], abs=1e-12)
            low, high = committed["ci95"]["ground_truth"][row["method"]][metric]
            assert (row[f"{metric}_low"], row[f"{metric}_high"]) == pytest.approx((low, high), abs=1e-12)
            assert low - 1e-12 <= row[metric] <= high + 1e-12
        realised = exp["metrics"]["reports/simulate.json"]["realised_noise_rate"]
        assert row["realised_noise_rate"] == pytest.approx(realised, abs=1e-12)


def test_reports_come_from_each_experiment(project):
    reports = project.root / "reports"
    frame = pd.read_csv(reports / "noise_study.csv")
    _check_table(project, frame)
    table = (reports / "noise_study.md").read_text(encoding="utf-8")
    assert project.study_stdout.startswith(table)  # stdout: the table (DVC's progress went to stderr)
    for _, row in frame.iterrows():
        assert f"| {row['noise_rate']!r} | {row['realised_noise_rate']:.3f} | {row['experiment']} | {row['method']} | " \
            f"{row['style_accuracy']:.3f}" in table
    png = (reports / "noise_study.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    # `dvc plots show` draws one line per method from the dvc.yaml definitions.
    shown = json.loads(project.run("dvc", "plots", "show", "--json").stdout)["data"]
    for metric in ("style_accuracy", "content_accuracy"):
        values = shown[f"noise_study_{metric}"][0]["content"]["data"]["values"]
        lines = {(v["field"], float(v["noise_rate"])): float(v["dvc_inferred_y_value"]) for v in values}
        expected = {(f"{r['method']}_{metric}", r["noise_rate"]): r[metric] for _, r in frame.iterrows()}
        assert lines == pytest.approx(expected)


def test_collect_only_and_a_second_run(project):
    reports = project.root / "reports"
    before = pd.read_csv(reports / "noise_study.csv")
    for path in reports.glob("noise_study*"):
        path.unlink()
    done = project.run("pigeon", "noise-study", "--collect-only")
    print(done.stdout)
    pd.testing.assert_frame_equal(pd.read_csv(reports / "noise_study.csv"), before)
    _check_table(project, before)

    # The same rates again at the same commit: refused before anything is queued, naming the experiment.
    again = project.run("pigeon", "noise-study", "--rates", "0.4", "--profile", "smoke", check=False)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert again.stderr.startswith("pigeon: error: experiment noise-0.4 exists already"), again.stderr
    assert set(project.exp_show()) == {"noise-0.0", "noise-0.4"}  # nothing new queued


@pytest.mark.parametrize("args, names", [
    (["--rates", "1.5"], ["simulate.noise_rate", "1.5"]),
    (["--rates", "0.2", "0.2"], ["simulate.noise_rate", "0.2", "twice"]),
    (["--set", "simulate.noise_rate=0.3"], ["simulate.noise_rate", "--rates"]),
    (["--profile", "smoke", "--set", "stage1.max_steps=5"], ["smoke.yaml", "stage1.max_steps"]),
    (["--set", "stage1.lr=-1"], ["stage1.lr", "-1"]),
    (["--profile", "nope"], ["nope"]),
    (["--jobs", "0"], ["--jobs", "0"]),
])
def test_bad_input_is_one_line(args, names, capsys, tmp_path):
    """Refused before any DVC command runs."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    code = main(["noise-study", "--workspace", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("pigeon: error: ") and err.count("\n") == 1, err
    assert all(name in err for name in names), err
