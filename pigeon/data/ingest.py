"""The interaction log ``data/log/``: it grows by one simulated day at a time (docs/design.md §3).

```
data/log/
  users.parquet          user_id, split, first_day, preferred_groups
  interactions.parquet   user_id, day, position, item_id, is_noise, preferred_style
  references.parquet     user_id, position, reference_item   (the ground-truth protocol's reference)
  log.json               the simulator settings the log was made with, and one record per day
```

A new day is written, audited and only then published (write-audit-publish): the candidate log is
checked by the log suite of :mod:`pigeon.data.validation` (no duplicated interactions, contiguous
days, the new day's style mix within the earlier days' range); a day that fails is quarantined under
``.pigeon/rejected/day-NNNN/`` with its report and the published log stays as it was. The log's data
version is the md5 DVC records for the folder (``<md5>.dir``, as in ``dvc.lock``), with its last day.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from pigeon.config import Params
from pigeon.data.raw import read_items
from pigeon.data.users import (
    LOG_META as META,
)
from pigeon.data.users import (
    LOG_TABLES as TABLES,
)
from pigeon.data.users import (
    LogTables,
    append_day,
    log_dir,
    read_log,
    simulate_day,
)
from pigeon.errors import DataError
from pigeon.io import atomic_dir, file_md5, read_json, write_json
from pigeon.paths import Workspace


def rejected_dir(ws: Workspace, day: int) -> Path:
    return ws.root / ".pigeon" / "rejected" / f"day-{day:04d}"


def world(params: Params, ws: Workspace) -> dict:
    """What makes two logs the same simulated world: the seed, the user model and the items."""
    return {"seed": params.seed, "simulate": params.simulate.model_dump(mode="json"),
            "items_md5": file_md5(ws.raw / "items.parquet")}


def write_log(tables: LogTables, meta: dict, out_dir: Path) -> None:
    """Write the log folder (the caller wraps it in ``atomic_dir``)."""
    for name in TABLES:
        getattr(tables, name).to_parquet(out_dir / f"{name}.parquet", index=False)
    write_json(out_dir / META, meta)


def dvc_md5(folder: Path) -> str:
    """The md5 DVC records for a folder (``dvc add`` / ``dvc.lock``: ``<md5 of the file list>.dir``)."""
    entries = [{"md5": file_md5(p), "relpath": p.relative_to(folder).as_posix()}
               for p in sorted(folder.rglob("*")) if p.is_file()]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def log_version(ws: Workspace) -> dict | None:
    """The data version of the workspace's log: ``{"day": last day, "md5": DVC md5}``; None without a log."""
    folder = log_dir(ws)
    if not (folder / META).is_file():
        return None
    days = read_json(folder / META).get("days") or [{}]
    return {"day": int(days[-1].get("day", -1)), "md5": dvc_md5(folder), "path": "data/log"}


def last_day(ws: Workspace) -> int:
    """The last day the log holds; -1 without a log."""
    version = log_version(ws)
    return -1 if version is None else version["day"]


def _day_record(day: int, rows: LogTables, params: Params) -> dict:
    first = rows.users["first_day"] == day
    active = rows.interactions["user_id"].nunique()
    return {"day": day, "new_users": int(first.sum()), "returning_users": int(active - first.sum()),
            "interactions": len(rows.interactions),
            **({} if day == 0 else {"drift_share": params.ingest.drift_share,
                                    "drift_style": params.ingest.drift_style})}


def ingest(params: Params, ws: Workspace) -> dict:
    """Append the days after the log's last one up to ``params.ingest.day``, each audited before the log
    is replaced; returns the log's summary. A day that fails its audit raises DataError and leaves the
    log as it was."""
    from pigeon.data.validation import style_mix, style_mix_outliers, validate_log, validation_report

    items = read_items(ws.raw)
    folder = log_dir(ws)
    here = world(params, ws)
    log, meta = (None, {"world": here, "days": []})
    if (folder / META).is_file():
        log, meta = read_log(folder)
        if meta.get("world") != here:  # another seed, user model or item set: another simulated world
            print(f"pigeon: {folder} was simulated with other settings (seed, simulate.* or the items); "
                  "starting a new log at day 0", file=sys.stderr)
            log, meta = None, {"world": here, "days": []}
    first_new = len(meta["days"])
    for day in range(first_new, params.ingest.day + 1):
        rows = simulate_day(items, params.simulate, params.seed, day, log, params.ingest)
        candidate = append_day(log, rows)
        checks = validate_log(candidate, items, params, new_day=day)
        failed = [c for c in checks if not c.success]
        if failed:
            where = quarantine(ws, day, rows, validation_report(checks))
            for check in failed:
                print(check.line(), file=sys.stderr)
            mix = style_mix_outliers(style_mix(candidate.interactions, items, day,
                                               params.ingest.style_mix_tolerance)) if day else ""
            raise DataError(f"data/log: day {day} rejected, the log is unchanged (still up to day "
                            f"{first_new - 1}): {len(failed)} of {len(checks)} expectations violated (first: "
                            f"{failed[0].line()}){'; style mix: ' + mix if mix else ''}; the day's rows and "
                            f"report are in {where}")
        log = candidate
        meta["days"].append(_day_record(day, rows, params))
    if len(meta["days"]) > first_new:
        with atomic_dir(folder) as tmp:
            write_log(log, meta, tmp)
    version = log_version(ws)
    summary = {"stage": "ingest", **version, "days_added": len(meta["days"]) - first_new,
               "users": len(log.users), "interactions": len(log.interactions),
               "last_day_record": meta["days"][-1],
               "note": "users are simulated: no public log of interactions with multi-style images exists"}
    write_json(ws.reports / "ingest.json", summary)
    return summary


def quarantine(ws: Workspace, day: int, rows: LogTables, report: dict) -> Path:
    """Keep a rejected day's rows and its validation report out of the log, for a person to look at."""
    target = rejected_dir(ws, day)
    with atomic_dir(target) as tmp:
        write_log(rows, {"day": day, "rejected": True}, tmp)
        write_json(tmp / "validation.json", report)
    return target


def record_dvc_version(ws: Workspace) -> str | None:
    """Record the log in the DVC cache and ``dvc.lock`` (``dvc commit ingest``) when the workspace is a
    DVC project, so each ingested day is a DVC version (``dvc push`` sends it to the remote). Returns a
    warning when DVC refused, else None."""
    if not ((ws.root / ".dvc").is_dir() and (ws.root / "dvc.yaml").is_file()):
        return None
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    done = subprocess.run([dvc, "commit", "--force", "--quiet", "ingest"], cwd=ws.root, capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"`dvc commit ingest` failed ({reason}); the log is ingested but not in the DVC cache"
    return None
