"""The pipeline: each stage's wall time and peak memory in the last run (``.pigeon/timings.jsonl``, written
by every stage), the no-op ``dvc repro``, and a fully cached Prefect flow run, in this workspace."""

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
    return rows


def timed(cmd: list[str], root: Path = ROOT) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=root, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(root)})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-flow", action="store_true", help="do not time the cached flow run")
    args = parser.parse_args()
    stages = stage_rows()
    print(table(stages, ["stage", "seconds", "peak_rss_mb"]) if stages else "no stage timings yet: run `make run`")
    noop = {"what": "no-op dvc repro", "seconds": timed([str(Path(sys.executable).parent / "dvc"), "repro"])}
    rows = [noop]
    if not args.skip_flow:
        code = "from flows.retrain import retrain; retrain()"
        rows.append({"what": "cached flow run (fresh process, temporary server)",
                     "seconds": timed([sys.executable, "-c", code])})
    print(table(rows, ["what", "seconds"]))
    save("pipeline", stages + rows)


if __name__ == "__main__":
    main()
