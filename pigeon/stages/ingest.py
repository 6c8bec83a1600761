"""Stage ``ingest``: the interaction log grows to ``ingest.day`` (docs/design.md §3).

Reads ``data/raw`` and the log already in ``data/log`` (a persisted output: the log is a record, its
earlier days are never rewritten); simulates each missing day up to ``ingest.day``, audits it with the
log suite and replaces ``data/log`` atomically; writes ``reports/ingest.json``. A day that fails its
audit fails the stage (exit 2) with the log, and every other output, as it was.
"""

from __future__ import annotations

from pigeon.config import Params
from pigeon.data.ingest import ingest
from pigeon.io import ensure_folders
from pigeon.paths import Workspace


def run(params: Params, ws: Workspace) -> dict:
    ensure_folders(ws.reports)
    return ingest(params, ws)
