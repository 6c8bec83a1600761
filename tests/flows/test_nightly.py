"""Three nights of the nightly loop on the smoke profile, against a real Prefect server: each night the
``retrain`` flow adds the next day to the interaction log, retrains on it and registers a model version
tagged with that data version; the gate alone moves the champion; a night whose new day fails the
log audit stops before training and leaves the champion and every output as they were.

Only the stages downstream of the log re-run on later nights: foundation and evaluators do not read
the log, so they are cache hits after the first night.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pigeon.io import read_json
from pigeon.stages import STAGES
from tests.conftest import REPO, SMOKE_STYLES
from tests.flows.test_flow import TRACKED_TREES, _overrides, _snapshot

pytestmark = pytest.mark.slow
NAME = "pigeon"
LOG_FREE = ("foundation", "evaluators")  # stages that do not read the log: cached after night 1
BAD_DAY = ("ingest.drift_share=1.0", "ingest.drift_style=twemoji")  # every user of the day switches style


def _night(root: Path, *extra: str):
    from flows.retrain import retrain, task_run_states

    state = retrain(params_path=str(REPO / "params.yaml"), profile="smoke", overrides=_overrides(root, *extra),
                    workspace=str(root), next_day=True, return_state=True)
    tasks = task_run_states(state.state_details.flow_run_id)
    return state, {name: tasks[name] for name in STAGES if name in tasks}


def _champion(client) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(NAME, "champion").version)
    except MlflowException:
        return None


def test_three_nights_then_a_rejected_one(prefect_api, tmp_path):
    from mlflow import MlflowClient

    from pigeon.config import load_params
    from pigeon.data.ingest import dvc_md5, log_dir, read_log
    from pigeon.data.synthetic import build_synthetic_raw
    from pigeon.paths import Workspace
    from pigeon.registry import promote

    root, ws = tmp_path, Workspace.at(tmp_path)
    build_synthetic_raw(root / "data" / "raw", styles=SMOKE_STYLES,
                        sizes=load_params(REPO / "params.yaml", "smoke").data.sizes, seed=0)
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    nights, splits = [], None
    for night in (1, 2, 3):
        champion_before = _champion(client) if night > 1 else None
        state, stages = _night(root)
        assert state.is_completed(), state.message
        report = read_json(root / "reports" / "registry.json")
        md5 = dvc_md5(log_dir(ws))
        log, _ = read_log(log_dir(ws))
        day = night - 1  # night 1 starts the log at day 0
        assert int(log.interactions["day"].max()) == day

        # Night 1 runs everything; later nights re-run only what reads the log.
        if night == 1:
            assert set(stages.values()) == {"Completed"}, stages
        else:
            assert {s for s, st in stages.items() if st == "Cached"} == set(LOG_FREE), stages
            assert {s for s, st in stages.items() if st == "Completed"} == set(STAGES) - set(LOG_FREE), stages

        # Lineage: the version, its stage runs and the pipeline run all name the data version.
        version = client.get_model_version(NAME, str(night))
        assert report["version"] == night and report["data"]["log_md5"] == md5 and report["data"]["day"] == str(day)
        assert version.tags["pigeon.data.log_md5"] == md5 and version.tags["pigeon.data.day"] == str(day)
        run = client.get_run(version.run_id)
        digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert digests[f"interaction-log-day-{day}"] == md5, digests
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["pigeon.data.log_md5"] == md5 and parent.data.params["ingest.day"] == str(day)

        # The gate alone moves the champion: to this version exactly when registry.json says promoted.
        champion_after = _champion(client)
        assert champion_after == (str(night) if report["promoted"] else champion_before), report["why"]
        assert report["champion_after"] == (None if champion_after is None else int(champion_after))
        if night == 1 and champion_after is None:
            # A smoke-sized model rarely clears the gate's floors: crown night 1 by hand, so the later nights
            # and the rejected one have a champion to keep or replace.
            promote(client, NAME, "1", reason="manual: baseline for the replay")

        # A user's split is drawn on its first day and kept: no test user ever trains.
        now = log.users.set_index("user_id")["split"]
        if splits is not None:
            assert (now.loc[splits.index] == splits).all()
        splits = now
        train_users = set(pd.read_parquet(ws.users / "windows_train.parquet")["user_id"])
        assert not train_users & set(now[now != "train"].index)
        nights.append({"night": night, "day": day, "log_md5": md5, "version": night, "decision": report["decision"],
                       "rule": report["rule"], "champion": f"v{_champion(client)}"
                       + (" (by hand)" if champion_after is None else "")})

    assert len({n["log_md5"] for n in nights}) == 3  # three versions, three data versions
    history = json.loads(client.get_registered_model(NAME).tags["pigeon.champion_history"])
    assert all(h["reason"].startswith(("gate:", "manual: baseline")) for h in history), history

    # Night 4: the new day's style mix is far outside the earlier days' range → rejected before training.
    champion, before = _champion(client), _snapshot(root)
    state, stages = _night(root, *BAD_DAY)
    assert state.is_failed() and "day 3 rejected" in state.message and "\n" not in state.message, state.message
    assert stages == {"ingest": "Failed"}, stages  # nothing after ingest ran
    assert _champion(client) == champion and len(client.search_model_versions(f"name='{NAME}'")) == 3
    assert _snapshot(root) == before, "a rejected night changed an output"
    assert dvc_md5(log_dir(ws)) == nights[-1]["log_md5"]
    assert (root / ".pigeon" / "rejected" / "day-0003" / "validation.json").is_file()

    print("\nregistry over the replayed nights (smoke profile):")
    print("| night | log day | log md5 (DVC) | version | gate | rule | champion after |")
    print("|---|---|---|---|---|---|---|")
    for n in nights:
        print(f"| {n['night']} | {n['day']} | {n['log_md5'][:12]}… | v{n['version']} | {n['decision']} | {n['rule']} "
              f"| {n['champion']} |")
    print(f"| 4 | 3 (rejected) | {nights[-1]['log_md5'][:12]}… (unchanged) | — | not run | — | v{champion} |")
    assert TRACKED_TREES  # the snapshot covers data, models, artifacts and reports
