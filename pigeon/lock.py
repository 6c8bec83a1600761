"""One writer per workspace: an OS file lock at ``ws.lock`` whose JSON body names the holder.

``workspace_lock(ws, stage)`` is taken by every stage run (``pigeon stage``, ``dvc repro``, the
Prefect flow). A second writer is refused at once with a :class:`LockError` naming the holder.
The kernel drops a ``flock`` when its process dies, so a lock left by a killed process is taken
over. The hold is re-entrant within a process (the flow runs many stages in one process), and a
helper process of the holder (a Dask worker running a shard) may join it with the holder's token.
The lock relies on ``flock``: it protects a workspace on a local filesystem.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pigeon.errors import LockError
from pigeon.io import write_error
from pigeon.paths import Workspace

LOCK_TOKEN_ENV = "PIGEON_LOCK_TOKEN"

log = logging.getLogger(__name__)


@dataclass
class _Hold:
    fd: int | None  # None: joined the hold of a parent process (no flock of our own)
    info: dict[str, Any]
    depth: int = 1


_holds: dict[Path, _Hold] = {}
_holds_guard = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse(body: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and "pid" in info else None


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """The JSON body of a lock file (pid, stage, started, host), or None when empty or absent."""
    try:
        return _parse(Path(path).read_bytes())
    except OSError:
        return None


def describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (no holder recorded yet)"
    text = f"pid {info.get('pid')} on {info.get('host')}, stage {info.get('stage')!r}, since {info.get('started')}"
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", 0))):
        text += " (that process is gone; a child of it still holds the lock)"
    return text


def _write_body(fd: int, info: dict[str, Any]) -> None:
    data = json.dumps(info, sort_keys=True).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder_patiently(path: Path) -> dict[str, Any] | None:
    # The holder truncates then writes its body: give a just-started holder a moment to finish.
    for _ in range(5):
        info = read_holder(path)
        if info:
            return info
        time.sleep(0.02)
    return None


def _open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # e.g. `.pigeon` is a file, or the workspace is read-only
        raise write_error(path, exc) from None


def _acquire(path: Path, stage: str) -> _Hold:
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = _read_holder_patiently(path)
            raise LockError(
                f"workspace {path.parent.parent} is locked by {describe_holder(info)}; "
                f"wait for it to finish or stop it (lock file {path})"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the file was removed or replaced while we waited: lock the current one

    previous = _parse(os.pread(fd, 65536, 0))
    if previous and previous.get("pid") != os.getpid():
        log.warning("taking over the stale workspace lock of %s", describe_holder(previous))
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "stage": stage,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "token": secrets.token_hex(16),
    }
    _write_body(fd, info)
    return _Hold(fd=fd, info=info)


def _join(path: Path, token: str) -> _Hold | None:
    """Join a live hold whose token we were given (a helper process of the holder: a thread, a local
    Dask worker, or a Dask worker on another node sharing the workspace). On the holder's host the
    holder must be alive; from another host its process cannot be checked, and the token, which the
    holder hands only to its own tasks, is what admits the worker."""
    info = read_holder(path)
    if not info or not secrets.compare_digest(str(info.get("token", "")), token):
        return None
    if info.get("host") != socket.gethostname() or _pid_alive(int(info["pid"])):
        return _Hold(fd=None, info=info)
    return None


def _release(path: Path, hold: _Hold) -> None:
    if hold.fd is None:
        return
    try:
        os.ftruncate(hold.fd, 0)  # an empty body means "free"; the file itself stays (no unlink race)
    finally:
        fcntl.flock(hold.fd, fcntl.LOCK_UN)
        os.close(hold.fd)


@contextlib.contextmanager
def workspace_lock(ws: Workspace, stage: str, token: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold the workspace for ``stage``; yields the holder record (pid, host, stage, started, token).

    ``token`` (or ``$PIGEON_LOCK_TOKEN``) lets a helper process join the hold of the process that
    owns it instead of being refused; the flow passes its token to the tasks it farms out.
    """
    path = ws.lock
    with _holds_guard:
        hold = _holds.get(path)
        nested = hold is not None
        if nested:
            hold.depth += 1
            _show_stage(hold, stage)
        else:
            token = token or os.environ.get(LOCK_TOKEN_ENV)
            hold = (_join(path, token) if token else None) or _acquire(path, stage)
            _holds[path] = hold
    try:
        yield hold.info
    finally:
        with _holds_guard:
            hold.depth -= 1
            if hold.depth == 0:
                del _holds[path]
                _release(path, hold)
            elif nested:
                _show_stage(hold, hold.info["stage"])


def _show_stage(hold: _Hold, stage: str) -> None:
    """Name the stage now running in the lock body, so a refused writer learns what is going on."""
    if hold.fd is not None:
        label = hold.info["stage"] if stage == hold.info["stage"] else f"{hold.info['stage']}/{stage}"
        _write_body(hold.fd, {**hold.info, "stage": label})
