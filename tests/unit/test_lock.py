"""One writer per workspace: real processes contend for the lock; a killed holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pigeon.errors import LockError
from pigeon.lock import LOCK_TOKEN_ENV, read_holder, workspace_lock
from pigeon.paths import Workspace

REPO = Path(__file__).resolve().parents[2]

# Takes the lock for stage sys.argv[2], prints the holder record, then holds until stdin closes.
HOLDER = """
import json, sys
from pigeon.lock import workspace_lock
from pigeon.paths import Workspace
with workspace_lock(Workspace.at(sys.argv[1]), sys.argv[2]) as info:
    print(json.dumps(info), flush=True)
    sys.stdin.read()
"""

# Tries the lock once; prints "acquired <holder json>" or "refused <message>".
TRY = """
import json, sys
from pigeon.errors import LockError
from pigeon.lock import workspace_lock
from pigeon.paths import Workspace
try:
    with workspace_lock(Workspace.at(sys.argv[1]), "second") as info:
        print("acquired", json.dumps(info), flush=True)
except LockError as exc:
    print("refused", exc, flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != LOCK_TOKEN_ENV}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def _start_holder(root: Path, stage: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), stage], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    line = proc.stdout.readline()
    assert line, "the holder process did not take the lock"
    return proc, json.loads(line)


def _try_lock(root: Path, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", TRY, str(root)], capture_output=True, text=True,
                          env=_env(**env), timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    holder, info = _start_holder(tmp_path, "dpo")
    try:
        assert info["pid"] == holder.pid and info["stage"] == "dpo"
        outcome = _try_lock(tmp_path)
        assert outcome.startswith("refused")
        assert f"pid {holder.pid}" in outcome and "stage 'dpo'" in outcome and info["started"] in outcome

        # `pigeon stage` (what `dvc repro` runs) refuses at once too, exit code 3, one line on stderr.
        cli = subprocess.run([sys.executable, "-m", "pigeon.cli", "stage", "validate", "--params",
                              str(REPO / "params.yaml"), "--profile", "smoke", "--workspace", str(tmp_path)],
                             capture_output=True, text=True, env=_env(), timeout=120, check=False)
        assert cli.returncode == 3, cli.stderr
        message = cli.stderr.strip().splitlines()
        assert len(message) == 1 and f"locked by pid {holder.pid}" in message[0], cli.stderr

        # In this process as well.
        with pytest.raises(LockError, match=f"pid {holder.pid}.*stage 'dpo'"), \
                workspace_lock(Workspace.at(tmp_path), "evaluate"):
            pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # Released on exit: the next writer gets it.
    assert _try_lock(tmp_path).startswith("acquired")


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, caplog):
    holder, info = _start_holder(tmp_path, "stage1")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    holder.stdin.close()
    assert read_holder(Workspace.at(tmp_path).lock)["pid"] == info["pid"]  # the dead holder's body is left

    with caplog.at_level(logging.WARNING, logger="pigeon.lock"), \
            workspace_lock(Workspace.at(tmp_path), "stage1") as mine:
        assert mine["pid"] == os.getpid()
        assert read_holder(Workspace.at(tmp_path).lock)["pid"] == os.getpid()
    assert f"pid {info['pid']}" in caplog.text and "stale" in caplog.text
    assert read_holder(Workspace.at(tmp_path).lock) is None  # released: empty body


def test_reentrant_within_a_process_and_joinable_by_token(tmp_path):
    ws = Workspace.at(tmp_path)
    errors: list[BaseException] = []

    def nested_stage(name: str) -> None:
        try:
            with workspace_lock(ws, name):
                pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with workspace_lock(ws, "flow retrain") as outer:
        with workspace_lock(ws, "dpo"):
            assert read_holder(ws.lock)["stage"] == "flow retrain/dpo"  # a refused writer sees the stage
        threads = [threading.Thread(target=nested_stage, args=(f"shard {i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert read_holder(ws.lock)["stage"] == "flow retrain"

        # Another process is refused, unless it carries the holder's token (a worker of this flow).
        assert _try_lock(tmp_path).startswith("refused")
        assert _try_lock(tmp_path, **{LOCK_TOKEN_ENV: "not-the-token"}).startswith("refused")
        joined = _try_lock(tmp_path, **{LOCK_TOKEN_ENV: outer["token"]})
        assert joined.startswith("acquired") and str(os.getpid()) in joined
        assert read_holder(ws.lock)["pid"] == os.getpid()  # a joiner leaves the hold as it was
    assert read_holder(ws.lock) is None
    assert _try_lock(tmp_path).startswith("acquired")


def test_a_worker_on_another_node_joins_with_the_token_only(tmp_path, monkeypatch):
    """A Dask worker on another host shares the workspace: it cannot see the holder's process, so the
    token alone admits it; without it the hold refuses it."""
    import pigeon.lock

    holder, info = _start_holder(tmp_path, "flow retrain")
    try:
        monkeypatch.setattr(pigeon.lock.socket, "gethostname", lambda: "another-node")
        ws = Workspace.at(tmp_path)
        with workspace_lock(ws, "candidates shard 0", token=info["token"]) as joined:
            assert joined["pid"] == info["pid"] and joined["host"] == info["host"]
        with pytest.raises(LockError, match="is locked by"):
            with workspace_lock(ws, "candidates shard 0", token="not-the-token"):
                pass
        assert read_holder(ws.lock)["pid"] == info["pid"]  # the joiner left the hold as it was
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
