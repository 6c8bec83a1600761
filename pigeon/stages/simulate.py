"""Stage ``simulate``: users, interaction sequences and windows derived from the interaction log.

Reads ``data/raw`` and ``data/log`` (the log up to its last day, :mod:`pigeon.data.ingest`); writes
``data/users/`` (replaced atomically) and ``reports/simulate.json``. A workspace without a log (one where
``ingest`` never ran) gets the users of day 0, simulated in memory: the same users the log starts with.
"""

from __future__ import annotations

from pigeon.config import Params
from pigeon.data.ingest import log_dir, log_version, read_log
from pigeon.data.raw import read_items
from pigeon.data.users import derive_simulation, simulate_day, write_simulation
from pigeon.io import atomic_dir, ensure_folders, write_json
from pigeon.paths import Workspace


def run(params: Params, ws: Workspace) -> dict:
    ensure_folders(ws.users.parent, ws.reports)  # both outputs must be writable before users are replaced
    items = read_items(ws.raw)
    version = log_version(ws)
    log = read_log(log_dir(ws))[0] if version else simulate_day(items, params.simulate, params.seed)
    sim = derive_simulation(items, params.simulate, log)
    with atomic_dir(ws.users) as tmp:
        write_simulation(sim, tmp)
    summary = {
        "stage": "simulate",
        **sim.summary(),
        "noise_rate": params.simulate.noise_rate,
        "seed": params.seed,
        "log": version or {"day": 0, "md5": None, "path": None},
        "note": "users are simulated: no public log of interactions with multi-style images exists",
    }
    write_json(ws.reports / "simulate.json", summary)
    return summary
