"""Stage ``simulate``: seeded users, interaction sequences and windows from the raw items.

Reads ``data/raw`` and ``params.simulate``; writes ``data/users/`` (replaced atomically) and
``reports/simulate.json``.
"""

from __future__ import annotations

from pigeon.config import Params
from pigeon.data.raw import read_items
from pigeon.data.users import simulate_users, write_simulation
from pigeon.io import atomic_dir, ensure_folders, write_json
from pigeon.paths import Workspace


def run(params: Params, ws: Workspace) -> dict:
    ensure_folders(ws.users.parent, ws.reports)  # both outputs must be writable before users are replaced
    items = read_items(ws.raw)
    sim = simulate_users(items, params.simulate, seed=params.seed)
    with atomic_dir(ws.users) as tmp:
        write_simulation(sim, tmp)
    summary = {
        "stage": "simulate",
        **sim.summary(),
        "noise_rate": params.simulate.noise_rate,
        "seed": params.seed,
        "note": "users are simulated: no public log of interactions with multi-style images exists",
    }
    write_json(ws.reports / "simulate.json", summary)
    return summary
