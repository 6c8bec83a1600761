"""Stage ``validate``: Great Expectations suites over the raw items, images, users and windows.

Writes ``reports/validation.json`` (every expectation: success, unexpected count, sample values).
Any violated expectation prints one line to stderr and fails the stage with a ``DataError``.
"""

from __future__ import annotations

import sys

from pigeon.config import Params
from pigeon.data.validation import validate_data, validation_report
from pigeon.errors import DataError
from pigeon.io import write_json
from pigeon.paths import Workspace


def run(params: Params, ws: Workspace) -> dict:
    checks = validate_data(params, ws)
    report = validation_report(checks)
    path = write_json(ws.reports / "validation.json", report)
    failed = [c for c in checks if not c.success]
    for check in failed:
        print(check.line(), file=sys.stderr)
    if failed:
        raise DataError(
            f"validation failed: {len(failed)} of {len(checks)} expectations violated "
            f"(first: {failed[0].line()}); see {path}"
        )
    return {"stage": "validate", "success": True, "expectations": len(checks), "suites": report["suites"]}
