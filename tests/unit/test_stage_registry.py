"""The stage registry (pigeon.pipeline.PIPELINE, read through pigeon.stages) says what dvc.yaml says, and its consumers read it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pigeon.stages import PIPELINE, STAGE_SPECS, STAGES

REPO = Path(__file__).resolve().parents[2]
DVC_STAGES: dict = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
KNOWN_KEYS = {"cmd", "deps", "params", "outs", "metrics"}  # the dvc.yaml stage keys the registry mirrors


def paths(entries) -> set[str]:
    """A dvc.yaml deps/outs/metrics list as paths: an entry is a path or {path: options}."""
    out = set()
    for entry in entries or ():
        if isinstance(entry, dict):
            assert len(entry) == 1, entry
            entry = next(iter(entry))
        out.add(str(entry))
    return out


def params_keys(entries) -> set[str]:
    """A dvc.yaml params list as keys: an entry is a key or {params file: [keys]}."""
    out = set()
    for entry in entries or ():
        if isinstance(entry, dict):
            out.update(str(key) for keys in entry.values() for key in keys or ())
        else:
            out.add(str(entry))
    return out


def test_same_stages_as_dvc_yaml():
    assert len(STAGES) == len(set(STAGES)) == len(PIPELINE)
    assert not set(DVC_STAGES) - set(STAGES), f"in dvc.yaml, not in the registry: {set(DVC_STAGES) - set(STAGES)}"
    assert not set(STAGES) - set(DVC_STAGES), f"in the registry, not in dvc.yaml: {set(STAGES) - set(DVC_STAGES)}"


@pytest.mark.parametrize("name", sorted(DVC_STAGES))
def test_stage_matches_dvc_yaml(name):
    body, spec = DVC_STAGES[name], STAGE_SPECS.get(name)
    assert spec is not None, f"{name}: in dvc.yaml, not in pigeon.stages.PIPELINE"
    assert set(body) <= KNOWN_KEYS, f"{name}: dvc.yaml keys the registry does not hold: {set(body) - KNOWN_KEYS}"
    assert " ".join(str(body["cmd"]).split()) == spec.cmd
    assert params_keys(body.get("params")) == set(spec.params)
    assert paths(body.get("deps")) == set(spec.deps)
    assert paths(body.get("outs")) == set(spec.outs)
    assert paths(body.get("metrics")) == set(spec.metrics)
    for field in ("params", "deps", "outs", "metrics"):
        assert len(getattr(spec, field)) == len(set(getattr(spec, field))), f"{name}.{field} repeats an entry"


def test_pipeline_order_puts_producers_first():
    """A stage's deps that another stage writes come from a stage before it (the order the flow and the
    test fixtures run)."""
    producer = {path: spec.name for spec in PIPELINE for path in (*spec.outs, *spec.metrics)}
    for index, spec in enumerate(PIPELINE):
        for dep in spec.deps:
            if dep in producer:
                assert STAGES.index(producer[dep]) < index, f"{spec.name} reads {dep} made by {producer[dep]}"


def test_params_keys_exist():
    from pigeon.config import load_params
    from pigeon.hashing import params_value

    params = load_params(REPO / "params.yaml", profile="smoke")
    for spec in PIPELINE:
        for key in spec.params:
            params_value(params, key)  # raises on a key the schema lacks


def test_flags():
    from pigeon.stages import BACKBONE_STAGES, DATA_PARALLEL_STAGES, GPU_STAGES, SHARDED_STAGES

    assert BACKBONE_STAGES == ("foundation", "evaluators", "stage1", "candidates", "rank", "dpo", "evaluate", "register")
    assert SHARDED_STAGES == ("candidates", "evaluate")
    assert DATA_PARALLEL_STAGES == ("stage1", "dpo")
    assert GPU_STAGES == ("foundation", "stage1", "candidates", "dpo", "evaluate")
    for name in SHARDED_STAGES:  # what the flow's fan-out calls
        source = (REPO / "pigeon" / "stages" / f"{name}.py").read_text(encoding="utf-8")
        for function in ("shard_count", "generate_shard", "shard_outputs"):
            assert f"def {function}(" in source, f"sharded stage {name} lacks {function}"


def test_consumers_read_the_registry():
    import flows.retrain as flow
    from pigeon import distributed, stages, tracking
    from tests.conftest import ORDER

    assert ORDER is stages.STAGES and flow.STAGES is stages.STAGES
    assert flow.GPU_STAGES is stages.GPU_STAGES and flow.SHARDED_STAGES is stages.SHARDED_STAGES
    assert distributed.DATA_PARALLEL_STAGES is stages.DATA_PARALLEL_STAGES
    assert tracking.LAST_STAGE == STAGES[-1] == "register"
    assert not hasattr(tracking, "STAGE_SECTIONS") and not hasattr(tracking, "STAGE_OUTPUTS")


def test_tracking_logs_the_params_keys_the_stage_lists():
    from pigeon.config import load_params
    from pigeon.tracking import stage_outputs, stage_params

    params = load_params(REPO / "params.yaml", profile="smoke")
    logged = stage_params("validate", params)  # [profile, data, simulate, ingest.style_mix_tolerance, model.history_len]
    assert logged["profile"] == "smoke" and logged["model.history_len"] == str(params.model.history_len)
    assert {k.split(".")[0] for k in logged} == {"profile", "data", "simulate", "ingest", "model"}
    assert not any(k.startswith("model.") and k != "model.history_len" for k in logged)
    assert [k for k in logged if k.startswith("ingest.")] == ["ingest.style_mix_tolerance"]
    for spec in PIPELINE:
        assert {k.split(".")[0] for k in stage_params(spec.name, params)} == {k.split(".")[0] for k in spec.params}
        assert stage_outputs(spec.name) == (*spec.outs, *spec.metrics)


def test_backbone_stages_are_the_stages_that_build_or_load_it():
    """A stage whose code reaches pigeon.artifacts (which loads the backbone) or builds the tiny backbone
    is flagged ``backbone``, and then lists the whole backbone section, the profile file and the model code."""
    from tests.unit.test_imports import import_graph

    edges = import_graph()[0]

    def reaches(module: str) -> set[str]:
        seen, todo = set(), [module]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for spec in PIPELINE:
        found = reaches(f"pigeon.stages.{spec.name}")
        assert spec.backbone == bool(found & {"pigeon.artifacts", "pigeon.models.tiny"}), spec.name
        if spec.backbone:
            assert {"backbone", "profile"} <= set(spec.params), spec.name
            assert {"profiles/${profile}.yaml", "pigeon/models"} <= set(spec.deps), spec.name
        if "pigeon.artifacts" in found:
            assert "pigeon/artifacts.py" in spec.deps, spec.name
