"""The pipeline: each stage's wall time and peak memory in the last run (``.pigeon/timings.jsonl``, written
by every stage) and the no-op ``dvc repro`` in this workspace; a Prefect flow run in a fresh process, then
the same run fully cached, with a temporary server and against a running one (``--flow-profile``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import save, table

ROOT = Path(__file__).resolve().parents[1]


def stage_rows(root: Path = ROOT) -> list[dict]:
    path = root / ".pigeon" / "timings.jsonl"
    if not path.is_file():
        return []
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        latest[row["stage"]] = row
    rows = [{"stage": k, "seconds": v["seconds"], "peak_rss_mb": v["peak_rss_mb"]} for k, v in latest.items()]
    rows.append({"stage": "total", "seconds": round(sum(r["seconds"] or 0 for r in rows), 1),
                 "peak_rss_mb": max((r["peak_rss_mb"] or 0) for r in rows)})
    # The stages time their own work; the wall span adds each process's start-up (imports, the MLflow
    # run) and DVC's hashing between stages: what a user waits for after `make run` sets up.
    starts = [v["time"] - (v["seconds"] or 0) for v in latest.values()]
    rows.append({"stage": "wall (first stage start to last stage end)",
                 "seconds": round(max(v["time"] for v in latest.values()) - min(starts), 1), "peak_rss_mb": None})
    return rows


def timed(cmd: list[str], root: Path = ROOT, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(root), **(env or {})})
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def flow_rows(profile: str, workspace: Path) -> list[dict]:
    """A flow run in a fresh process, then the same run again (every stage a cache hit), each with a
    temporary Prefect server, then the cached run against a running server."""
    import shutil

    from tests.flows.conftest import PrefectServer

    workspace.mkdir(parents=True, exist_ok=True)
    if not (workspace / "data" / "raw").exists():
        shutil.copytree(ROOT / "data" / "raw", workspace / "data" / "raw")
    code = (f"from flows.retrain import retrain; retrain(params_path={str(ROOT / 'params.yaml')!r}, "
            f"profile={profile!r}, workspace={str(workspace)!r})")
    home = {"PREFECT_HOME": str(workspace / ".prefect-home")}
    rows = [{"what": f"flow run, first ({profile} profile, fresh process, temporary server)",
             "seconds": timed([sys.executable, "-c", code], env=home)},
            {"what": f"flow run, fully cached ({profile}, fresh process, temporary server)",
             "seconds": timed([sys.executable, "-c", code], env=home)}]
    server = PrefectServer(workspace / ".prefect-server")
    server.home.mkdir(parents=True, exist_ok=True)
    server.start()
    try:
        timed([sys.executable, "-c", code], env=server.env())  # its first run against this server's cache
        rows.append({"what": f"flow run, fully cached ({profile}, fresh process, running server)",
                     "seconds": timed([sys.executable, "-c", code], env=server.env())})
    finally:
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-flow", action="store_true", help="do not time the flow runs")
    parser.add_argument("--flow-profile", default="smoke",
                        help="profile of the flow runs (their first run trains it: smoke keeps that short)")
    parser.add_argument("--flow-workspace", type=Path, default=Path("/tmp/pigeon-bench-flow"),
                        help="workspace of the flow runs (data/raw is copied into it)")
    args = parser.parse_args()
    stages = stage_rows()
    print(table(stages, ["stage", "seconds", "peak_rss_mb"]) if stages else "no stage timings yet: run `make run`")
    rows = [{"what": "no-op dvc repro", "seconds": timed([str(Path(sys.executable).parent / "dvc"), "repro"])}]
    if not args.skip_flow:
        rows += flow_rows(args.flow_profile, args.flow_workspace.resolve())
    print(table(rows, ["what", "seconds"]))
    save("pipeline", stages + rows)


if __name__ == "__main__":
    main()
