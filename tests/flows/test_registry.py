"""The register stage, the promotion gate, promote/rollback and the MLflow run layout, on a real
sqlite store in a temporary workspace. The registered model is a real tiny PigeonModel (a fresh
TinyBackbone saved with ``save_pretrained`` + an untrained Pigeon head saved with ``save_trainable``)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from pigeon.errors import PigeonError
from pigeon.io import file_md5, read_json, write_json
from tests.conftest import SMOKE_STYLES, smoke_params

pytestmark = pytest.mark.slow
NAME = "pigeon"


def build_tiny_model_workspace(root: Path):
    """Synthetic raw data + a real, untrained tiny Pigeon model in ``models/{foundation,dpo}``."""
    from pigeon.data.raw import read_items
    from pigeon.data.synthetic import build_synthetic_raw
    from pigeon.models.pigeon import PigeonModel
    from pigeon.models.tiny import TinyBackbone
    from pigeon.paths import Workspace

    ws = Workspace.at(root)
    params = smoke_params()
    build_synthetic_raw(ws.raw, styles=SMOKE_STYLES, sizes=params.data.sizes, seed=0)
    backbone = TinyBackbone.create(params.backbone, read_items(ws.raw)["name"].tolist(), seed=0)
    backbone.save_pretrained(ws.foundation)
    model = PigeonModel(backbone, params.model)
    model.add_lora(params.stage1.lora)
    model.save_trainable(ws.dpo)
    return ws


def workspace_params(ws, *extra: str):
    return smoke_params(f"tracking.uri=sqlite:///{ws.root}/mlflow.db",
                        f"tracking.artifact_location={ws.root}/mlartifacts", *extra)


def write_metrics(ws, personalization: float, semantic: float, zero_shot: float = 0.2) -> None:
    # The layout the evaluate stage writes: metrics[protocol][method][metric], and the chance levels.
    write_json(ws.reports / "metrics.json", {
        "ground_truth": {"pigeon": {"style_accuracy": personalization, "content_accuracy": semantic},
                         "stage1": {"style_accuracy": 0.3, "content_accuracy": 0.3},
                         "foundation": {"style_accuracy": zero_shot, "content_accuracy": 0.1},
                         "untrained_mask_generator": {"style_accuracy": 0.1, "content_accuracy": 0.9}},
        "chance": {"style_accuracy": 1 / len(SMOKE_STYLES), "content_accuracy": 0.001},
        "ci95": {"ground_truth": {"pigeon": {"style_accuracy": [0.0, 1.0]}}}})


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A tiny-model workspace with an already created (migrated) MLflow database, copied per test."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry-template")
    build_tiny_model_workspace(root)
    MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db").search_experiments()  # creates the tables
    return root


@pytest.fixture
def ws(template, tmp_path):
    from pigeon.paths import Workspace

    shutil.copytree(template, tmp_path / "ws")
    return Workspace.at(tmp_path / "ws")


def client_for(ws):
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws.root}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register(ws, personalization, semantic, *extra, zero_shot: float = 0.2):
    from pigeon.stages import run_stage

    write_metrics(ws, personalization, semantic, zero_shot)
    run_stage("register", workspace_params(ws, *extra), ws)
    return read_json(ws.reports / "registry.json")


def champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def test_gate_promotes_a_better_candidate_and_keeps_the_champion_otherwise(ws):
    client = client_for(ws)
    first = register(ws, 0.50, 0.50)
    assert (first["version"], first["promoted"], first["rule"]) == (1, True, "all rules passed")
    assert first["why"].startswith("promoted: no champion yet") and first["baselines"]["foundation"]
    assert set(first["baselines"]) == {"stage1", "foundation"}  # not the ablation rows
    assert [(c["rule"], c["passed"]) for c in first["checks"]] == [
        ("floors", True), ("beats_zero_shot", True), ("keeps_semantics", True), ("beats_champion", None)]
    assert first["chance"] == {"style_accuracy": 0.25, "content_accuracy": 0.001}
    assert first["checks"][1]["figures"]["zero_shot"] == 0.2 and first["champion_after"] == 1

    better = register(ws, 0.60, 0.49)  # +0.10 personalization, -0.01 semantic (tolerance 0.02)
    assert better["promoted"] and better["decision"] == "promoted" and champion(client) == "2"
    assert better["champion_before"] == {"version": 1, "style_accuracy": 0.5, "content_accuracy": 0.5}
    assert client.get_model_version(NAME, "2").tags["pigeon.previous_champion"] == "1"

    worse = register(ws, 0.55, 0.90)  # personalization below the champion's
    assert not worse["promoted"] and worse["decision"] == "kept champion" and worse["rule"] == "beats_champion"
    assert worse["checks"][-1]["figures"]["style_accuracy"]["champion"] == 0.6
    semantic_drop = register(ws, 0.95, 0.40)  # personalization up, semantic down 0.09
    assert not semantic_drop["promoted"] and semantic_drop["rule"] == "beats_champion"
    assert "content_accuracy" in semantic_drop["why"]
    assert champion(client) == "2" and semantic_drop["champion_after"] == 2
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "4"
    tags = client.get_model_version(NAME, "4").tags
    assert float(tags["score.ground_truth.style_accuracy"]) == 0.95


def test_rollback_and_promote_by_hand_are_recorded(ws):
    from pigeon.cli import main

    client = client_for(ws)
    for scores in ((0.5, 0.5), (0.6, 0.5), (0.7, 0.5)):
        register(ws, *scores)
    assert champion(client) == "3"
    args = ["--params", str(Path(__file__).parents[2] / "params.yaml"), "--profile", "smoke",
            "--workspace", str(ws.root), "-s", f"tracking.uri=sqlite:///{ws.root}/mlflow.db"]
    assert main(["rollback", *args]) == 0 and champion(client) == "2"
    assert main(["rollback", *args]) == 0 and champion(client) == "1"
    assert main(["rollback", *args]) == 2  # v1 replaced nobody: a one-line error, exit code 2
    assert main(["promote", *args, "--version", "3", "--reason", "hotfix"]) == 0 and champion(client) == "3"
    assert main(["promote", *args, "--version", "9"]) == 2
    history = json.loads(client.get_registered_model(NAME).tags["pigeon.champion_history"])
    assert [(h["action"], h["version"]) for h in history] == [
        ("promote", "1"), ("promote", "2"), ("promote", "3"), ("rollback", "2"), ("rollback", "1"),
        ("promote", "3")]
    assert history[-1]["reason"] == "manual: hotfix" and history[-1]["previous"] == "1"
    assert "pigeon.rolled_back_at" in client.get_model_version(NAME, "2").tags


def test_a_model_worse_than_zero_shot_is_never_promoted(ws):
    """The register stage on a real tiny model whose style accuracy is below the zero-shot row's: no
    champion, however many such versions come, and registry.json says which rule decided."""
    client = client_for(ws)
    for version, (scores, rule) in enumerate([
            ((0.30, 0.30), "beats_zero_shot"),  # passes the floors, loses to the zero-shot row
            ((0.1375, 0.0), "floors"),  # the version once crowned for being first
            ((0.38, 0.25), "keeps_semantics")], start=1):  # beats zero-shot (0.35), loses content vs stage1
        report = register(ws, *scores, zero_shot=0.35)
        assert (report["version"], report["promoted"], report["rule"]) == (version, False, rule)
        assert report["decision"] == "not promoted" and report["champion_after"] is None
        assert next(c for c in report["checks"] if c["rule"] == rule)["passed"] is False
        assert str(client.get_model_version_by_alias(NAME, "candidate").version) == str(version)
        assert client.get_model_version(NAME, str(version)).tags["pigeon.gate"].startswith(f"not promoted ({rule})")
    with pytest.raises(Exception, match="(?i)alias|not found|does not exist"):
        client.get_model_version_by_alias(NAME, "champion")
    assert register(ws, 0.40, 0.30, zero_shot=0.35)["promoted"] and champion(client) == "4"  # the gate can pass


def test_stage_runs_nest_under_one_pipeline_run_with_lineage(ws):
    from pigeon.stages import run_stage

    params = workspace_params(ws)
    run_stage("simulate", params, ws)
    assert (ws.root / ".pigeon" / "parent_run.json").is_file()  # the next stage's process finds it
    write_metrics(ws, 0.5, 0.5)
    run_stage("register", params, ws)
    assert not (ws.root / ".pigeon" / "parent_run.json").exists()  # register ends the pipeline run

    client = client_for(ws)
    experiment = client.get_experiment_by_name("pigeon")
    assert experiment.artifact_location == (ws.root / "mlartifacts").as_uri()
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = next(r for name, r in runs.items() if name.startswith("pipeline"))
    assert len(runs) == 3 and parent.info.status == "FINISHED"
    assert parent.data.params["simulate.num_users"] == "60"
    simulate, registered = runs["simulate"], runs["register"]
    for run in (simulate, registered):
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.digest == file_md5(ws.raw / "manifest.json")  # no data.dvc in a tmp workspace
    assert simulate.data.params["simulate.num_users"] == "60" and simulate.data.metrics["users"] == 60
    assert registered.data.metrics["promoted"] == 1.0 and parent.data.metrics["registry.promoted"] == 1.0
    assert {a.path for a in client.list_artifacts(registered.info.run_id)} == {"reports", "result.json"}
    (output,) = registered.outputs.model_outputs
    assert client.get_logged_model(output.model_id).name == NAME
    version = client.get_model_version(NAME, "1")
    assert version.run_id == registered.info.run_id


def test_the_flow_sets_the_parent_run(ws):
    from pigeon.stages import run_stage
    from pigeon.tracking import PARENT_ENV, pipeline_run

    params = workspace_params(ws)
    write_metrics(ws, 0.5, 0.5)
    with pipeline_run(params, ws) as parent_id:
        run_stage("register", params, ws)
    client = client_for(ws)
    (child,) = client.search_runs([client.get_experiment_by_name("pigeon").experiment_id],
                                  filter_string="tags.`pigeon.stage` = 'register'")
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    import os

    assert PARENT_ENV not in os.environ


def test_unreachable_store_fails_before_the_stage_works(ws, tmp_path):
    from pigeon.stages import run_stage

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    write_metrics(ws, 0.5, 0.5)
    for uri in (f"sqlite:///{tmp_path}/no/such/folder/mlflow.db", f"http://127.0.0.1:{closed_port}"):
        with pytest.raises(PigeonError, match="cannot be reached") as err:
            run_stage("register", workspace_params(ws, f"tracking.uri={uri}"), ws)
        assert uri in str(err.value) and "\n" not in str(err.value)
    assert not (ws.reports / "registry.json").exists()


def test_tracking_disabled_registers_nothing(ws):
    (ws.root / "mlflow.db").unlink()
    report = register(ws, 0.5, 0.5, "tracking.enabled=false")
    assert report["decision"] == "skipped" and report["version"] is None
    assert not (ws.root / "mlflow.db").exists()
