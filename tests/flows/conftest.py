"""A real Prefect server for the flow tests: one per session, in a temporary PREFECT_HOME.

One server serves the in-process flow runs, the runs in fresh processes (they would otherwise each
start a temporary server) and the deployment test (schedules and workers need a real one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SERVER_START_TIMEOUT = 180  # seconds; a cold start takes 5–30 s depending on how busy the box is


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def stop_process_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


class PrefectServer:
    def __init__(self, home: Path):
        self.home = home
        self.url = f"http://127.0.0.1:{_free_port()}/api"
        self.log = home / "server.log"
        self.proc: subprocess.Popen | None = None

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a process that talks to this server."""
        from pigeon.runtime import OFFLINE_ENV

        repo = str(Path(__file__).resolve().parents[2])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PIGEON_"))}
        env.update(OFFLINE_ENV)
        env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.url,
                   PYTHONPATH=repo + os.pathsep + env.get("PYTHONPATH", ""))
        return {**env, **extra}

    def start(self) -> None:
        port = self.url.rsplit(":", 1)[1].split("/")[0]
        env = self.env()
        env.pop("PREFECT_API_URL")
        prefect = str(Path(sys.executable).parent / "prefect")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", port],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                pytest.fail(f"prefect server did not become healthy at {self.url}:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    started = time.perf_counter()
    server.start()
    server.start_seconds = round(time.perf_counter() - started, 1)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_api(prefect_server):
    """In-process Prefect client settings pointing at the session's server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        yield prefect_server
        # Send the queued logs and events while the server is up: at exit they would retry against a
        # stopped server for a minute.
        with contextlib.suppress(RuntimeError):  # the log worker never started
            APILogWorker.instance().drain()
        EventsWorker.drain_all()
